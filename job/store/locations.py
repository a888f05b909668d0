"""Where things are: ``s3://`` URIs parsed without surprises, and names from storage confined to a folder.

Two rules every other module relies on:

- An ``s3://bucket/key`` URI is split on the first ``/`` after the bucket and nowhere else. URL
  parsers treat ``?`` and ``#`` as the start of a query or fragment, which silently dropped the
  run id from the key (two runs then shared one folder); here such characters are refused when the
  settings are read, and never reinterpreted.
- A key or file name read from storage (a checkpoint marker, a listing, a model folder) is only
  ever turned into a local path by ``confine``, which refuses absolute names, ``..``, empty
  segments and control characters. A name it refuses makes the thing that listed it unusable; it is
  never written.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

# S3 bucket naming rules (AWS "Bucket naming rules"): 3-63 lowercase letters, digits, '.', '-',
# starting and ending with a letter or digit, not shaped like an IP address. Stricter than some
# S3-compatible stores, which is fine for names a job writes to.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP = re.compile(r"\d+\.\d+\.\d+\.\d+")
_BAD_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f?#\\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
# Run ids and channel names become one key segment each (``<output>/<run_id>/``,
# ``channels/<name>.json``): the settings and the channel store check them with the same rules.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CHANNEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class UnsafeName(ValueError):
    """A name from storage that would leave its folder, or a URI that cannot be used safely."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    """The path a local URI names: ``file://`` is accepted and dropped."""
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def parse_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; raises UnsafeName on anything odd."""
    if not is_s3(uri):
        raise UnsafeName(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if "@" in bucket:  # never echo it: what precedes '@' is a credential
        raise UnsafeName("credentials in an s3:// URI are not supported: use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a role")
    check_bucket(bucket)
    if _BAD_KEY_CHARS.search(key):
        raise UnsafeName("the key must not contain '?', '#', '\\' or control characters")
    if any(part in (".", "..") for part in key.split("/")):
        raise UnsafeName("the key must not contain '.' or '..' segments")
    return bucket, key


def check_bucket(bucket: str) -> None:
    if not bucket:
        raise UnsafeName("an s3:// URI needs a bucket: s3://bucket/key")
    if not _BUCKET.fullmatch(bucket) or _IP.fullmatch(bucket) or ".." in bucket:
        raise UnsafeName(f"invalid bucket name {bucket[:70]!r}: 3-63 lowercase letters, digits, '.' or '-'")


def join(base: str, *parts: str) -> str:
    """Join a local path or ``s3://`` prefix with key parts, with exactly one '/' between them."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def check_name(name) -> str:
    """``name`` if it is a safe '/'-separated relative name; raises UnsafeName otherwise (no I/O)."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise UnsafeName(f"unusable name {str(name)[:80]!r}")
    if _CONTROL.search(name):
        raise UnsafeName(f"control character or backslash in name {name[:80]!r}")
    if name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")):
        raise UnsafeName(f"name leaves its folder: {name[:80]!r}")
    return name


def confine(root: Path, name: str) -> Path:
    """The local path of ``name`` (a '/'-separated relative name from storage) inside ``root``.

    Refuses absolute names, ``.``/``..`` and empty segments, backslashes and control characters,
    and names that a symlink already inside ``root`` would carry elsewhere, so nothing read from
    storage can choose where on the host a file goes.
    """
    path = Path(root).joinpath(*PurePosixPath(check_name(name)).parts)
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise UnsafeName(f"name leaves its folder: {name[:80]!r}")
    return path


def is_run_id(value) -> bool:
    """Whether ``value`` is a run id the job could have written (a safe single key segment)."""
    return isinstance(value, str) and _RUN_ID.fullmatch(value) is not None


def check_channel_name(name) -> str:
    """A channel name is one safe key segment; raises UnsafeName (a ValueError) otherwise.

    A channel keeps ``channels/<name>.json`` (its pointer) and ``channels/<name>/`` (history, run
    records). Those two never collide between two names unless one name is the other plus
    ``.json`` (``prod`` and ``prod.json``): on a local disk one would need a file and a folder of
    the same name. So a name ending in ``.json`` (in any case, for case-insensitive disks) is refused.
    """
    if not isinstance(name, str) or not _CHANNEL.fullmatch(name) or ".." in name:
        raise UnsafeName(f"invalid channel name {str(name)[:70]!r}: 1-63 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit, no '/' or '..'")
    if name.lower().endswith(".json"):
        raise UnsafeName(f"invalid channel name {name!r}: it must not end in '.json' (channels/<name>.json is "
                         "another channel's pointer)")
    return name
