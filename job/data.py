"""Fetch the training and evaluation data, check every row, and keep the rows in Arrow.

A row is ``{"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}``,
the layout of the Hugging Face ``squad`` datasets. Files may be nested SQuAD JSON (v1.1/v2.0),
JSON Lines, Parquet or CSV, on local disk or in ``s3://``; without a file the hub dataset is used.
A folder, or an ``s3://`` prefix ending in ``/``, is its supported files in key order, read as one
split (data that grows night by night); ``QA_TRAIN_SELECT`` picks tonight's files, and the files
a run read are pinned in its run.json for its retries (``job.store.listing``).

Files are read, checked and written to the split's Arrow file chunk by chunk (``job.rows``), so
a split is a memory-mapped table and never a list of dicts. Every problem is a ``DataError``
naming the file and the row. Each row is checked as it is read, so the first bad one stops the
load; repeated ids are found once every file is read (a sort of 8-byte hashes: no set of
millions of ids), and named with both their files.
"""
from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import shutil
from array import array
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

from job.errors import ConfigError, DataError, StorageUnavailable
from job.formats import FORMATS, from_flat, iter_file_rows, read_rows, validated
from job.observe.redaction import MASK, redact_text
from job.rows import CHUNK, RowWriter, head, open_rows
from job.settings import Settings
from job.store import listing
from job.store.locations import UnsafeName, confine, join, local_path
from job.store.scratch import temp_path
from job.store.storage import NotFound, RetryPolicy, open_storage, sha256_file, split_s3

log = logging.getLogger(__name__)
__all__ = ["Split", "load_splits", "load_split", "read_rows", "validate_rows", "is_prefix", "fetch"]


@dataclass(frozen=True)
class Split:
    name: str  # "train" or "eval"
    source: str  # URI or hub id, for messages and the manifest
    sha256: str  # of the file, of every file under a prefix, or of the hub rows
    rows: object  # datasets.Dataset: the checked rows, memory-mapped (job.rows); None once released
    examples: int
    files: tuple = ()  # under a prefix: each file read (job.store.listing.DataFile), in order
    pin: dict | None = None  # under a prefix: what run.json pins, so a retry reads exactly these files

    def released(self) -> "Split":
        """The same split without its rows: once they are in the features, their file need not stay mapped."""
        return replace(self, rows=None)


def load_splits(settings: Settings, policy: RetryPolicy, pinned: dict | None = None) -> tuple[Split, Split]:
    """Both splits; ``pinned`` is run.json's ``data_files`` from this run's first attempt, if any."""
    return load_split("train", settings, policy, pinned), load_split("eval", settings, policy, pinned)


def load_split(name: str, settings: Settings, policy: RetryPolicy, pinned: dict | None = None) -> Split:
    """The ``train`` or ``eval`` split as the settings name it: a file, a folder / prefix, or the hub.

    ``QA_MAX_*_SAMPLES`` keeps the first rows in reading order (files in key order, rows in file
    order); every row is checked all the same.
    """
    uri = settings.train_uri if name == "train" else settings.eval_uri
    hub_split = settings.train_split if name == "train" else settings.eval_split
    limit = settings.max_train_samples if name == "train" else settings.max_eval_samples
    if name == "train" and settings.train_select != "all" and not (uri and is_prefix(uri)):
        raise ConfigError(f"QA_TRAIN_SELECT={settings.train_select}: selects files of a folder or prefix, "
                          f"and QA_TRAIN_URI={uri or '(unset)'} is not one")
    files, pin = (), None
    work = Path(settings.work_dir) / settings.run_id
    rows = _SplitRows(work / "rows" / f"{name}.arrow", settings.squad_v2)
    try:
        if uri and is_prefix(uri):
            with _downloads(work / "data" / name) as private:
                digest, files, pin = _read_prefix(rows, name, uri, private, settings, policy, (pinned or {}).get(name))
        elif uri:
            with _downloads(work / "data" / name) as private:
                path = fetch(uri, private, settings, policy)
                rows.add(iter_file_rows(path, uri), uri)
                digest = sha256_file(path)  # the very bytes just read: nobody else writes this folder
        else:
            rows.fingerprint, rows.fingerprint_rows = hashlib.sha256(), limit  # the hub has no file to hash
            rows.add(_hub_rows(settings, hub_split), f"{settings.dataset}[{hub_split}]")
            digest = rows.fingerprint.hexdigest()
        table = rows.finish()
    except OSError as exc:
        rows.abort()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc):  # Arrow's errors carry no errno
            raise StorageUnavailable(f"QA_WORK_DIR={settings.work_dir}: no space left for the {name} rows") from None
        raise
    except BaseException:
        rows.abort()
        raise
    if limit:
        table = head(table, limit)
    if len(table) == 0:
        raise DataError(f"{uri or settings.dataset}: no {name} examples left after filtering (QA_MAX_{name.upper()}_SAMPLES, format)")
    log.info("data loaded", extra={"event": "data", "split": name, "source": uri or settings.dataset, "examples": len(table),
                                   **({"files": len(files)} if files else {})})
    return Split(name, uri or settings.dataset, digest, table, len(table), files, pin)


@contextlib.contextmanager
def _downloads(folder: Path):
    """A folder of this process's own for the split's downloads, removed afterwards.

    Runs sharing a work dir once downloaded into one ``<work>/data/<split>/`` under one ``.part``
    name: one crashed, the other trained on its own file and recorded the other's sha256. The
    folder is a temporary name of this process's (``job.store.scratch``): a killed run's
    downloads are swept by the next start in the work dir.
    """
    private = temp_path(folder / "downloads")
    try:
        yield private
    finally:
        shutil.rmtree(private, ignore_errors=True)


def is_prefix(uri: str) -> bool:
    """An ``s3://`` URI ending in '/', or a local folder: read every supported file under it."""
    if uri.startswith("s3://"):
        return uri.endswith("/")
    return uri.endswith("/") or local_path(uri).is_dir()


def _read_prefix(rows: "_SplitRows", name: str, uri: str, dest_dir: Path, settings: Settings, policy: RetryPolicy,
                 pinned_record) -> tuple[str, tuple, dict]:
    """Tonight's files under a folder or prefix (or the ones this run pinned), in key order, into ``rows``.

    Files of other kinds (``_SUCCESS`` markers, ``.crc`` files, hidden temporary files) are
    skipped and logged. The digest covers each file's key and sha256, so a file added, removed,
    renamed or changed is new data. A pinned file that is gone or changed is a data error: the
    run cannot go on with the data it started with.
    """
    s3 = uri.startswith("s3://")
    store = open_storage(uri, policy, settings.s3_endpoint_url, settings.s3_region) if s3 else None
    root = None if s3 else local_path(uri)
    if root is not None and not root.is_dir():
        raise DataError(f"{uri}: data folder not found")
    # run.json keeps a credential in the URI or a key masked (job.observe.redaction); rank 0's pin is as read
    chosen = listing.pinned(pinned_record, uri) or listing.pinned(pinned_record, redact_text(uri))
    if chosen is not None and any(MASK in f.key for f in chosen):
        everything = listing.list_store(store) if store is not None else listing.list_local(root)
        chosen = listing.unmask(chosen, everything, redact_text, MASK)
    if chosen is not None:
        selection = pinned_record["select"]
        log.info("reading the data files pinned for this run (by its first attempt, or by rank 0)", extra={
            "event": "data_pinned", "split": name, "source": uri, "files": len(chosen), "select": selection})
    else:
        chosen, selection = _choose(name, uri, store, root, settings)
    digest, read = hashlib.sha256(), []
    for f in chosen:
        source = join(uri, f.key)
        try:
            path = confine(dest_dir if s3 else root, f.key)
        except UnsafeName as exc:
            raise DataError(f"{source}: unusable key ({exc})") from None
        if s3:
            try:
                store.get_file(f.key, path)
            except NotFound:
                raise DataError(f"{source}: data object vanished while reading the prefix"
                                f"{_PINNED_HINT if f.sha256 else ''}") from None
        elif not path.is_file():
            raise DataError(f"{source}: data file vanished while reading the folder{_PINNED_HINT if f.sha256 else ''}")
        sha = sha256_file(path)
        if f.sha256 and sha != f.sha256:
            raise DataError(f"{source}: changed since this run's first attempt read it{_PINNED_HINT}")
        rows.add(iter_file_rows(path, source), source)
        if s3:
            path.unlink(missing_ok=True)  # its rows are in the split's Arrow file now: keep the scratch disk small
        digest.update(f"{f.key}\0{sha}\n".encode())
        read.append(replace(f, sha256=sha))
    return digest.hexdigest(), tuple(read), listing.pin(uri, selection, read)


_PINNED_HINT = ("; this run's first attempt pinned it (run.json, data_files): restore it, or start over "
                "with a new QA_RUN_ID")


def _choose(name: str, uri: str, store, root: Path | None, settings: Settings) -> tuple[list, str]:
    """List the prefix once and pick tonight's files: every data file, or ``QA_TRAIN_SELECT``'s (train only)."""
    everything = listing.list_store(store) if store is not None else listing.list_local(root)
    use, skipped = listing.data_files(everything, FORMATS)
    if skipped:
        log.info("files skipped under a data prefix", extra={"event": "data_files_skipped", "source": uri,
                                                              "count": len(skipped), "files": [f.key for f in skipped[:20]]})
    if not use:
        raise DataError(f"{uri}: no data files under this prefix (supported: .json, .jsonl, .ndjson, .parquet, .csv"
                        f"{'; skipped ' + ', '.join(f.key for f in skipped[:3]) if skipped else ''})")
    selection = listing.parse_selection(settings.train_select) if name == "train" else listing.ALL
    now = dt.datetime.now(dt.timezone.utc)
    ahead = listing.dated_ahead(use, selection, now)
    if ahead:  # a date after today is a mistake, not the newest data: never chosen, always said
        log.warning("data files dated in the future skipped", extra={
            "event": "data_files_future", "source": uri, "select": str(selection), "count": len(ahead),
            "today": now.date().isoformat(), "files": [f.key for f in ahead[:20]]})
        skip = {f.key for f in ahead}
        use = [f for f in use if f.key not in skip]
    chosen = listing.select(use, selection, now.date(), uri)
    if selection != listing.ALL:
        log.info("data files selected", extra={"event": "data_selected", "split": name, "source": uri, "select": str(selection),
                                               "files": len(chosen), "of": len(use),
                                               "first": chosen[0].key if chosen else None, "last": chosen[-1].key if chosen else None})
    if not chosen:
        raise DataError(f"{uri}: QA_TRAIN_SELECT={selection} left none of its {len(use) + len(ahead)} data files "
                        f"({f'newest by key: {use[-1].key}' if use else 'every one'}"
                        f"{f'; {len(ahead)} dated after today' if ahead else ''})")
    return chosen, str(selection)


def fetch(uri: str, dest_dir: Path, settings: Settings, policy: RetryPolicy) -> Path:
    """Return a local path for ``uri``, downloading ``s3://`` objects into ``dest_dir``."""
    if not uri.startswith("s3://"):
        path = local_path(uri)
        if not path.is_file():
            raise DataError(f"{uri}: data file not found")
        return path
    bucket, key = split_s3(uri)
    store = open_storage(f"s3://{bucket}", policy, settings.s3_endpoint_url, settings.s3_region)
    local = dest_dir / Path(key).name
    try:
        store.get_file(key, local)
    except NotFound:
        raise DataError(f"{uri}: data object not found (a prefix of several files must end with '/')") from None
    return local


class _SplitRows:
    """A split's rows on their way to its Arrow file: checked, hashed for the duplicate test, written."""

    def __init__(self, path: Path, squad_v2: bool):
        self.writer, self.squad_v2 = RowWriter(path, temp_path(path)), squad_v2
        self.hashes = array("q")  # hash(id) of every row: 8 bytes a row, sorted once at the end
        self.sources: list[tuple[int, str]] = []  # (first row, file) for naming a duplicate's files
        self.fingerprint, self.fingerprint_rows = None, None  # the hub's digest, over the rows kept
        self.pending: list[dict] = []  # written CHUNK at a time, across files: a prefix of small files is not a table of tiny chunks

    def add(self, raw: Iterable[dict], source: str) -> None:
        self.sources.append((len(self.hashes), source))
        for row in validated(raw, source, self.squad_v2):
            if self.fingerprint is not None and (self.fingerprint_rows is None or len(self.hashes) < self.fingerprint_rows):
                self.fingerprint.update(json.dumps(row, sort_keys=True).encode())
            self.hashes.append(hash(row["id"]))
            self.pending.append(row)
            if len(self.pending) == CHUNK:
                self.writer.write(self.pending)
                self.pending = []

    def finish(self):
        self.writer.write(self.pending)
        self.pending = []
        table = open_rows(self.writer.close())
        repeat = first_duplicate(self.hashes, lambda at: table.with_format("arrow")[at]["id"].to_pylist())
        if repeat is not None:
            first, second = repeat
            rid = table.with_format("arrow")[[second]]["id"][0].as_py()
            earlier, later = self._source(first), self._source(second)
            raise DataError(f"{later}: row {rid[:80]!r}: duplicate id" + (f", also in {earlier}" if earlier != later else ""))
        return table

    def abort(self) -> None:
        self.writer.abort()

    def _source(self, position: int) -> str:
        starts = [start for start, _ in self.sources]
        return self.sources[bisect.bisect_right(starts, position) - 1][1]


def first_duplicate(hashes, ids_at) -> tuple[int, int] | None:
    """``(earlier, later)`` row positions of the repeated id whose repeat comes first, or None.

    Rows are compared by ``hash(id)`` (sorted once: 8 bytes a row, not a set of millions of
    strings); only rows whose hashes collide are read back (``ids_at(positions)``) and compared
    by their ids, so a hash collision is never taken for a duplicate.
    """
    import numpy as np

    values = np.frombuffer(hashes, dtype=np.int64) if len(hashes) else np.zeros(0, np.int64)
    order = np.argsort(values, kind="stable")
    same = np.flatnonzero(values[order][1:] == values[order][:-1])
    if not same.size:
        return None
    candidates = np.unique(np.concatenate([order[same], order[same + 1]])).tolist()  # ascending: reading order
    seen: dict[str, int] = {}
    for position, rid in zip(candidates, ids_at(candidates)):
        if rid in seen:
            return seen[rid], position
        seen[rid] = position
    return None


def validate_rows(rows: Iterable[dict], source: str, squad_v2: bool) -> list[dict]:
    """Check a list of rows (the whole file's, in memory: tests and benchmarks); the first problem raises."""
    out = list(validated(rows, source, squad_v2))
    repeat = first_duplicate(array("q", (hash(r["id"]) for r in out)), lambda at: [out[i]["id"] for i in at])
    if repeat is not None:
        raise DataError(f"{source}: row {out[repeat[1]]['id'][:80]!r}: duplicate id")
    return out


def _hub_rows(settings: Settings, split: str) -> Iterator[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(settings.dataset, settings.dataset_config, split=split)
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise StorageUnavailable(f"QA_DATASET={settings.dataset}: hub unreachable ({str(exc).splitlines()[0][:160]})") from None
    except Exception as exc:
        raise DataError(f"QA_DATASET={settings.dataset} split {split!r}: {str(exc).splitlines()[0][:200]}") from None
    for row in ds:  # the hub's own memory-mapped table, a row at a time
        yield from_flat(row)
