"""Storage behind one small interface: a local directory or an S3-compatible bucket.

Every botocore error is translated here, at the boundary, into one of four outcomes the rest of
the job understands: ``NotFound``, ``PreconditionFailed`` (a conditional write lost),
``StorageDenied`` (credentials or bucket wrong: exit 2, retrying will not help) and
``StorageUnavailable`` (still failing after bounded retries: exit 75).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar
from job.errors import StorageDenied, StorageUnavailable
from job.store.files import atomic_write, create_new, file_lock, writing
from job.store.locations import UnsafeName, confine, local_path, parse_s3

log = logging.getLogger(__name__)
T = TypeVar("T")


class NotFound(Exception):
    pass


class PreconditionFailed(Exception):
    """A conditional write (IfNoneMatch / IfMatch) found the object not as expected."""


class NotImplementedByStore(StorageDenied):
    """The store answered 501 NotImplemented: it lacks the feature, so retrying cannot help (exit 2)."""


class Storage(Protocol):
    """Keys are '/'-separated and relative to the storage's root URI."""

    uri: str

    def put_file(self, local: Path, key: str) -> None: ...
    def get_file(self, key: str, local: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str: ...
    def get_bytes(self, key: str) -> tuple[bytes, str]: ...
    def size(self, key: str) -> int: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    backoff_seconds: float = 1.0
    timeout_seconds: float = 20.0


# the command lines (job.answer, job.channel): a person is waiting, so fail within a minute or so
COMMAND_LINE_POLICY = RetryPolicy(attempts=3, backoff_seconds=0.5, timeout_seconds=20)


def split_s3(uri: str) -> tuple[str, str]:
    try:
        return parse_s3(uri)
    except UnsafeName as exc:
        raise StorageDenied(f"cannot use {uri[:200]}: {exc}") from None


def open_storage(uri: str, policy: RetryPolicy, endpoint_url: str | None = None, region: str | None = None) -> Storage:
    if uri.startswith("s3://"):
        bucket, prefix = split_s3(uri)
        return S3Storage(bucket, prefix, policy, endpoint_url, region)
    return LocalStorage(local_path(uri))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _local_errors(what: str):
    """A local disk's errors in the storage vocabulary: full is transient (exit 75), forbidden is not (exit 2)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageUnavailable(f"{what}: no space left on {exc.filename or 'the output disk'}") from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise StorageDenied(f"{what}: cannot write {exc.filename or ''} ({exc.strerror}); check QA_OUTPUT_URI") from None
        raise


def _copy_atomically(src: Path, dest: Path, what: str, durable: bool = False) -> None:
    """Copy to a hidden temp name, then rename; the temp file never outlives a failure."""
    with _local_errors(what):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with writing(dest, durable) as tmp:
            shutil.copyfile(src, tmp)


class LocalStorage:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        try:
            return confine(self.root, key)
        except UnsafeName as exc:
            raise StorageDenied(f"refusing key outside {self.root}: {exc}") from None

    def put_file(self, local: Path, key: str) -> None:
        # durable before a commit marker (itself written durably) can vouch for it after a power loss
        _copy_atomically(local, self._path(key), f"upload {key}", durable=True)

    def get_file(self, key: str, local: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(key)
        _copy_atomically(src, local, f"download {key}")

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        with _local_errors(f"write {key}"):
            return self._put_bytes(key, data, if_none_match=if_none_match, if_match=if_match)

    def _put_bytes(self, key: str, data: bytes, *, if_none_match: bool, if_match: str | None) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if if_none_match:
            try:  # whole or absent at every moment: a temp file linked to the name, failing if it exists
                create_new(path, data)
            except FileExistsError:
                raise PreconditionFailed(key) from None
        elif if_match is not None:
            # compare-and-swap under an exclusive lock, so racing processes see one winner
            with file_lock(path):
                try:
                    _, etag = self.get_bytes(key)
                except NotFound:
                    raise PreconditionFailed(key) from None
                if etag != if_match:
                    raise PreconditionFailed(key)
                atomic_write(path, data)
        else:
            atomic_write(path, data)
        return hashlib.md5(data).hexdigest()

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(key) from None
        return data, hashlib.md5(data).hexdigest()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFound(key) from None

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return []
        keys = []
        for p in start.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            with _local_errors(f"delete {key}"), file_lock(path):  # not in the middle of a compare-and-swap
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            return  # no folder, so nothing to delete
        # S3 has no folders; here an emptied one (the root included) is removed so listings look
        # the same and a run that wrote nothing lasting leaves nothing behind. Writes recreate it.
        for parent in path.parents:
            if not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break


_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket", "AllAccessDisabled", "403",
           "InvalidBucketName", "AuthorizationHeaderMalformed", "InvalidToken", "ExpiredToken", "PermanentRedirect"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


_loader = None


def _session():
    """A fresh boto3 session (credentials resolved anew) sharing botocore's parsed service models.

    Parsing the S3 model takes ~0.2 s per client; a night with nothing new to learn opens four
    storages and would spend most of its time there.
    """
    import boto3
    import botocore.loaders
    import botocore.session

    global _loader
    if _loader is None:
        _loader = botocore.loaders.create_loader(os.environ.get("AWS_DATA_PATH"))
    core = botocore.session.Session()
    core.register_component("data_loader", _loader)
    return boto3.session.Session(botocore_session=core)


class S3Storage:
    def __init__(self, bucket: str, prefix: str, policy: RetryPolicy, endpoint_url: str | None, region: str | None):
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.policy = policy
        # Retries are ours (bounded, with backoff, and aware of which errors are permanent),
        # so botocore's own are off. Checksums only when required: several S3-compatible
        # stores reject the CRC headers boto3 >= 1.36 sends by default.
        config = Config(
            retries={"total_max_attempts": 1},
            connect_timeout=policy.timeout_seconds,
            read_timeout=policy.timeout_seconds,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        try:
            self.client = _session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        except Exception as exc:  # invalid endpoint or region: botocore says so when the client is made
            raise StorageDenied(f"cannot create the S3 client for {self.uri}: {str(exc).splitlines()[0][:200]} "
                                "(check QA_S3_ENDPOINT_URL and QA_S3_REGION)") from None

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Callable[[], T], attempts: int | None = None) -> T:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ParamValidationError

        attempts = attempts or self.policy.attempts
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except NoCredentialsError:
                raise StorageDenied(f"no S3 credentials found for {self.uri} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a role)") from None
            except ParamValidationError as exc:  # a request botocore will not even send: retrying cannot help
                raise StorageDenied(f"storage rejected {what} on {self.uri}: {str(exc).splitlines()[0][:200]}") from None
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code in _NOT_FOUND or status == 404 and code not in _DENIED:
                    raise NotFound(what) from None
                if code in _PRECONDITION or status == 412:
                    raise PreconditionFailed(what) from None
                if code in _DENIED or status in (401, 403):
                    raise StorageDenied(f"storage refused {what} on {self.uri}: {code or status} (check credentials and bucket)") from None
                if code == "NotImplemented" or status == 501:  # a 5xx, but a missing feature is not an outage
                    raise NotImplementedByStore(f"storage {self.uri} does not implement {what} ({code or status})") from None
                if status and status < 500 and code not in ("SlowDown", "RequestTimeout", "RequestTimeTooSkewed"):
                    raise StorageDenied(f"storage rejected {what} on {self.uri}: {code or status}") from None
                error = f"{code or status}"
            except BotoCoreError as exc:  # connection refused/reset, timeouts, DNS
                error = type(exc).__name__
            if attempt < attempts:
                delay = min(self.policy.backoff_seconds * 2 ** (attempt - 1), 30.0)
                log.warning("storage call failed, retrying", extra={"event": "storage_retry", "call": what, "error": error,
                                                                   "attempt": attempt, "delay_seconds": delay})
                time.sleep(delay)
        raise StorageUnavailable(f"storage {self.uri} unreachable: {what} failed {attempts} times ({error})")

    def put_file(self, local: Path, key: str) -> None:
        self._call(f"upload {key}", lambda: self.client.upload_file(str(local), self.bucket, self._key(key)))

    def get_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: two processes fetching to one path once shared ".<name>.part"
        with writing(local) as tmp:
            self._call(f"download {key}", lambda: self.client.download_file(self.bucket, self._key(key), str(tmp)))

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        extra = {}
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        if if_match is not None:
            extra["IfMatch"] = if_match
        try:
            resp = self._call(f"write {key}", lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra))
        except NotImplementedByStore:
            if not extra:
                raise
            raise NotImplementedByStore(
                f"storage {self.uri} does not support conditional writes ({' / '.join(extra)} answered NotImplemented); "
                "the run lease and channels need them: use a store that honours them (AWS S3, MinIO, SeaweedFS...)") from None
        return resp.get("ETag", "")

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        def fetch():
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read(), resp.get("ETag", "")

        return self._call(f"read {key}", fetch)

    def size(self, key: str) -> int:
        return self._call(f"stat {key}", lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])

    def list(self, prefix: str) -> list[str]:
        def fetch():
            keys, strip = [], len(self.prefix) + 1 if self.prefix else 0
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
            return sorted(keys)

        return self._call(f"list {prefix or '/'}", fetch)

    def list_info(self, prefix: str) -> list[dict]:
        """``list``, with each object's ``size``, ``etag`` and ``modified`` (seconds since the epoch), by key."""
        def fetch():
            out, strip = [], len(self.prefix) + 1 if self.prefix else 0
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                out.extend({"key": obj["Key"][strip:], "size": int(obj.get("Size", 0)), "etag": str(obj.get("ETag", "")),
                            "modified": obj["LastModified"].timestamp()} for obj in page.get("Contents", []))
            return sorted(out, key=lambda o: o["key"])

        return self._call(f"list {prefix or '/'}", fetch)

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def check_access(self) -> None:
        """Fail fast at start on wrong credentials or a missing bucket (exit 2), or an outage (75)."""
        self._call("access check", lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), MaxKeys=1))
