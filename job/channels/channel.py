"""Channels: a named pointer to the model to serve, moved only by compare-and-swap, with full history.

Layout under ``QA_OUTPUT_URI`` (object storage only, no other service):

- ``channels/<name>.json``: the pointer, one small JSON object naming a complete run (``run_id``,
  ``model_uri``, ``metrics``, fingerprints, ``seq``, ``previous``, ``rollback_to``, ``held``, ...).
  It is only ever replaced by a conditional write against the ETag it was read with
  (``IfMatch``; ``IfNoneMatch`` for the first one), so of two writers exactly one wins and a
  kill leaves either the old or the new object, never half of one.
- ``channels/<name>/history/<seq>.json``: every pointer version, byte for byte, created once
  (``IfNoneMatch``) after the pointer moved. A kill between the two writes is repaired by the
  next mover, which writes the history entry of the version it is about to replace before it
  replaces it: every version that was ever the pointer ends up in the history.
- ``channels/<name>/runs/<run_id>.json``: one record per run gated for the channel (its recipe and
  decision), for skip-if-unchanged and retention.
- ``channels/<name>/starts/<run_id>.json``: a warm-started run of the channel that is not complete
  yet names the run whose model it starts from, so no retention deletes that model under a retry.

Nothing read here is trusted: a pointer or history entry of the wrong shape is a ``CorruptPointer``
(exit 3) and nothing moves. ``python -m job.channel`` is the operator's command line (``job.channels.cli``).
"""
from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass

from job import safe_json
from job.channels.pointer import encode
from job.channels.pointer import problem as pointer_problem
from job.errors import ConfigError, DataError, StorageUnavailable
from job.observe.redaction import artifact_json
from job.store.locations import UnsafeName, check_channel_name, is_run_id
from job.store.storage import LocalStorage, NotFound, NotImplementedByStore, PreconditionFailed, Storage

log = logging.getLogger(__name__)
PREFIX = "channels/"
MAX_TRIES = 5  # compare-and-swap attempts before giving up (exit 75: a rerun tries again)


# What this job names a history entry: <seq>.json, ASCII digits, no leading zero. str.isdigit() took
# "²" for a digit, and int("²") then failed every command of the channel with exit 1.
_HISTORY_ENTRY = re.compile(r"(0|[1-9][0-9]{0,17})\.json")


class CorruptPointer(DataError):
    """A pointer or history entry in storage is not what this job writes: nothing is moved (exit 3)."""


class UnknownChannel(ConfigError):
    pass


class ConditionalWritesUnsupported(ConfigError):
    pass


class ChannelBusy(StorageUnavailable):
    """The pointer kept changing under us for MAX_TRIES attempts; a rerun tries again (exit 75)."""


def channel_names(store: Storage) -> list[str]:
    """Every channel on an output: each ``channels/<name>.json`` whose name is a channel name."""
    names = []
    for key in store.list(PREFIX):
        name = key[len(PREFIX):].removesuffix(".json")
        if "/" not in name and key.endswith(".json"):
            try:
                names.append(check_channel_name(name))
            except UnsafeName:
                continue  # not a pointer this job writes (a probe, a stray file)
    return sorted(names)


def open_channel(settings) -> "Channel":
    """The channel ``QA_CHANNEL`` in storage rooted at ``QA_OUTPUT_URI``, with the job's retry policy."""
    from job.store.storage import RetryPolicy, open_storage

    policy = RetryPolicy(settings.storage_attempts, settings.storage_backoff_seconds, settings.storage_timeout_seconds)
    return Channel(open_storage(settings.output_uri, policy, settings.s3_endpoint_url, settings.s3_region), settings.channel)


@dataclass(frozen=True)
class Version:
    """One pointer version as read or written: the parsed object, its exact bytes and ETag."""

    pointer: dict
    raw: bytes
    etag: str


class Channel:
    def __init__(self, store: Storage, name: str):
        try:
            self.name = check_channel_name(name)
        except UnsafeName as exc:
            raise ConfigError(str(exc)) from None
        self.store = store
        self.key = f"{PREFIX}{name}.json"
        self.where = f"{store.uri}/{self.key}"
        self._probed = False
        self._stray_said = False  # channel_history_ignored: once per command or night, not once per listing

    # ------------------------------------------------------------------ reading
    def read(self) -> Version | None:
        """The current pointer, or None when the channel has none yet; CorruptPointer if unusable."""
        try:
            raw, etag = self.store.get_bytes(self.key)
        except NotFound:
            return None
        return Version(self.parse(raw, self.where), raw, etag)

    def require(self) -> Version:
        current = self.read()
        if current is None:
            raise UnknownChannel(f"channel {self.name!r} does not exist under {self.store.uri} (no {self.key}); "
                                 "nothing was moved")
        return current

    def parse(self, raw: bytes, where: str) -> dict:
        try:
            pointer = safe_json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise CorruptPointer(f"{where} is not JSON; nothing was moved (restore it from the channel's history, "
                                 "see README 'Nightly retraining and channels')") from None
        problem = pointer_problem(pointer, self.name)
        if problem:
            raise CorruptPointer(f"{where} is not a valid channel pointer ({problem}); nothing was moved "
                                 "(restore it from the channel's history, see README 'Nightly retraining and channels')")
        return pointer

    def history(self) -> list[dict]:
        """Every pointer version, oldest first."""
        return [self.parse(self.store.get_bytes(self._history_key(seq))[0], f"{self.store.uri}/{self._history_key(seq)}")
                for seq in self.history_seqs()]

    def history_seqs(self) -> list[int]:
        """The seqs of the history entries, in order; any other file in the history folder is ignored, and said once."""
        prefix = f"{PREFIX}{self.name}/history/"
        seqs, stray = [], []
        for key in self.store.list(prefix):
            match = _HISTORY_ENTRY.fullmatch(key[len(prefix):])
            if match:
                seqs.append(int(match[1]))
            else:
                stray.append(key[len(prefix):])
        if stray and not self._stray_said:
            self._stray_said = True
            log.warning("files that are not history entries ignored in a channel's history folder", extra={
                "event": "channel_history_ignored", "channel": self.name, "count": len(stray), "files": stray[:20]})
        return sorted(seqs)

    def next_seq(self, current: dict | None) -> int:
        """The seq of the version to follow ``current``: past it and past every history entry.

        Usually ``current["seq"] + 1``. But a pointer restored from an older history entry, or
        deleted by hand, is behind its history; reusing a seq whose entry exists would skip the
        new entry (history entries are created once) and the history would name the wrong holder.
        """
        return max([current["seq"] if current else 0, *self.history_seqs()]) + 1

    def history_entry(self, seq: int) -> dict | None:
        try:
            raw, _ = self.store.get_bytes(self._history_key(seq))
        except NotFound:
            return None
        return self.parse(raw, f"{self.store.uri}/{self._history_key(seq)}")

    def _history_key(self, seq: int) -> str:
        return f"{PREFIX}{self.name}/history/{seq}.json"

    # ------------------------------------------------------------------ moving
    def ensure_history(self, version: Version) -> None:
        """Write the history entry of ``version`` if it is missing (a mover killed before writing it)."""
        try:
            self.store.put_bytes(self._history_key(version.pointer["seq"]), version.raw, if_none_match=True)
        except PreconditionFailed:
            return
        log.info("channel history entry written", extra={"event": "channel_history", "channel": self.name,
                                                         "seq": version.pointer["seq"]})

    def swap(self, pointer: dict, current: Version | None) -> Version:
        """Replace ``current`` by ``pointer``; PreconditionFailed when someone else moved it first."""
        self.check_conditional_writes()
        raw = encode(pointer)
        try:
            if current is None:
                etag = self.store.put_bytes(self.key, raw, if_none_match=True)
            else:
                etag = self.store.put_bytes(self.key, raw, if_match=current.etag)
        except PreconditionFailed:
            # A write that landed but whose reply was lost is retried by the storage layer, and the
            # retry's condition then fails against our own write: the pointer holding our exact bytes
            # is this move done, not a lost race (moving again would promote the same run twice).
            now = self.read()
            if now is None or now.raw != raw:
                raise
            etag = now.etag
        return Version(pointer, raw, etag)

    def record_history(self, version: Version) -> None:
        self.ensure_history(version)

    def move(self, build, before_swap=None) -> Version:
        """The compare-and-swap loop: read, ``build(current) -> new pointer``, swap, record history.

        ``build`` runs again on every lost race, against the pointer as it is then.
        """
        for attempt in range(1, MAX_TRIES + 1):
            current = self.read()
            if current is not None:
                self.ensure_history(current)
            pointer = build(current.pointer if current else None)
            if before_swap is not None:
                before_swap()
            try:
                version = self.swap(pointer, current)
            except PreconditionFailed:
                log.warning("channel moved meanwhile; reading it again", extra={"event": "channel_conflict",
                                                                                "channel": self.name, "attempt": attempt})
                continue
            self.record_history(version)
            return version
        raise ChannelBusy(f"channel {self.name!r} under {self.store.uri} changed {MAX_TRIES} times while we tried to "
                          "move it; rerun to try again")

    def check_conditional_writes(self) -> None:
        """Once per process and channel: refuse a store that ignores IfNoneMatch / IfMatch.

        A store that accepts conditional writes but does not honour them would let two writers
        both "win"; the pointer would be last-writer-wins again, silently. A local disk honours
        them by construction (``O_EXCL``, and a compare under a file lock).
        """
        if self._probed or isinstance(self.store, LocalStorage):
            return
        key = f"{PREFIX}.probe-{uuid.uuid4().hex}"
        try:
            self.store.put_bytes(key, b"probe", if_none_match=True)
            try:
                for condition in ({"if_none_match": True}, {"if_match": '"00000000000000000000000000000000"'}):
                    try:
                        self.store.put_bytes(key, b"probe again", **condition)
                    except PreconditionFailed:
                        continue
                    raise ConditionalWritesUnsupported(
                        f"storage {self.store.uri} does not honour conditional writes ({next(iter(condition))} was ignored); "
                        "channels need them: nothing was moved")
            finally:
                self.store.delete(key)
        except NotImplementedByStore as exc:  # refused outright (501): as permanent as ignored
            raise ConditionalWritesUnsupported(f"{exc}: nothing was moved") from None
        self._probed = True

    # ------------------------------------------------------------------ runs gated for the channel
    def record_run(self, run_id: str, record: dict) -> None:
        self.store.put_bytes(f"{PREFIX}{self.name}/runs/{run_id}.json", artifact_json(record, indent=1, sort_keys=True))

    # Models that runs not complete yet still need: starts/<run>.json names a warm-started run's start
    # model (a run of this channel's), students/<run>.json the teacher run a distilled run pinned from
    # this channel. Retention keeps those models while the run is in flight (job.channels.retention).
    def record_start(self, run_id: str, from_run: str) -> None:
        """Run ``run_id`` (not complete yet) starts from ``from_run``'s model: retention keeps that model."""
        self._record_need("starts", run_id, from_run)

    def forget_start(self, run_id: str) -> None:
        self.store.delete(f"{PREFIX}{self.name}/starts/{run_id}.json")

    def starts(self) -> dict[str, str]:
        """``{run id: the run whose model it starts from}`` for every start record (unusable ones skipped)."""
        return self._needs("starts")

    def record_student(self, run_id: str, teacher_run: str) -> None:
        """Run ``run_id`` (not complete yet) learns from ``teacher_run``'s model: retention keeps that model."""
        self._record_need("students", run_id, teacher_run)

    def forget_student(self, run_id: str) -> None:
        self.store.delete(f"{PREFIX}{self.name}/students/{run_id}.json")

    def students(self) -> dict[str, str]:
        """``{run id: the teacher run it pinned}`` for every student record (unusable ones skipped)."""
        return self._needs("students")

    def _record_need(self, folder: str, run_id: str, model_run: str) -> None:
        self.store.put_bytes(f"{PREFIX}{self.name}/{folder}/{run_id}.json",
                             artifact_json({"run_id": run_id, "from_run": model_run}))

    def _needs(self, folder: str) -> dict[str, str]:
        prefix, out = f"{PREFIX}{self.name}/{folder}/", {}
        for key in self.store.list(prefix):
            run_id = key[len(prefix):].removesuffix(".json")
            try:
                record = safe_json.loads(self.store.get_bytes(key)[0])
            except (NotFound, ValueError, UnicodeDecodeError):
                continue
            if is_run_id(run_id) and isinstance(record, dict) and is_run_id(record.get("from_run")):
                out[run_id] = record["from_run"]
        return out

    def run_record(self, run_id: str) -> dict | None:
        """The channel's record of one gated run, or None (missing or unusable)."""
        try:
            record = safe_json.loads(self.store.get_bytes(f"{PREFIX}{self.name}/runs/{run_id}.json")[0])
        except (NotFound, ValueError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) and record.get("run_id") == run_id else None

    def gated_runs(self) -> list[dict]:
        """Records of every run gated for this channel (unusable ones skipped), oldest decision first."""
        prefix = f"{PREFIX}{self.name}/runs/"
        out = []
        for key in self.store.list(prefix):
            run_id = key[len(prefix):].removesuffix(".json")
            if not is_run_id(run_id):
                continue
            try:
                record = safe_json.loads(self.store.get_bytes(key)[0])
            except (NotFound, ValueError, UnicodeDecodeError):
                continue
            if isinstance(record, dict) and record.get("run_id") == run_id and isinstance(record.get("decided_at"), str):
                out.append(record)
        return sorted(out, key=lambda r: (r["decided_at"], r["run_id"]))

