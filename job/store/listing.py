"""The files of a data prefix: listed with size, ETag and modification time, chosen for tonight, pinned for retries.

A folder or ``s3://`` prefix that grows a file a night is listed once per attempt, in one pass
(``data_files``: a listing of 100,000 keys takes as long as reading it). ``QA_TRAIN_SELECT``
chooses the files to train on (``select``): all of them, the newest N, or those of the last D
days, each file dated by the date in its key or by its modification time. The files a run read
are pinned in its ``run.json`` on the first attempt (``pin``: key, size, ETag, modification time,
sha256), and a retry reads exactly those (``pinned``), whatever landed or was selected since:
the same data, the same fingerprint, so a preempted night resumes.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import stat
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable

from job.errors import DataError

_KEY_DATE = re.compile(r"(?<!\d)(\d{4})([-_/]?)(\d{2})\2(\d{2})(?!\d)")  # 2026-11-30, 2026_11_30, 2026/11/30, 20261130
# A file dated after today is a typo or a producer's bug (2099-01-01/...), not tonight's data: kept,
# it would be "the newest" every night for decades. But clocks disagree by minutes: in the last
# hour before midnight UTC a producer whose clock runs ahead may already date its file tomorrow,
# so "after today" means after the UTC date an hour from now.
CLOCK_SLACK = dt.timedelta(hours=1)
_SELECT_HELP = "must be all, newest:N or days:D, optionally followed by :key or :modified (e.g. newest:7, days:30:modified)"


@dataclass(frozen=True)
class DataFile:
    key: str  # relative to the prefix
    size: int
    etag: str  # the store's ETag; "" on local disk, which has none
    modified: float  # seconds since the epoch
    sha256: str = ""  # known once the file was read


@dataclass(frozen=True)
class Selection:
    mode: str = "all"  # "all", "newest" (count files) or "days" (count days)
    count: int = 0
    by: str = "key"  # what dates a file: "key" (its key's order or date) or "modified"

    def __str__(self) -> str:
        return "all" if self.mode == "all" else f"{self.mode}:{self.count}" + (":modified" if self.by == "modified" else "")


ALL = Selection()


def parse_selection(text: str) -> Selection:
    """``QA_TRAIN_SELECT``: ``all``, ``newest:N[:key|:modified]``, ``days:D[:key|:modified]``; ValueError otherwise."""
    parts = text.strip().lower().split(":")
    if parts == ["all"]:
        return ALL
    if parts[0] in ("newest", "days") and len(parts) in (2, 3) and parts[1].isdigit():
        count, by = int(parts[1]), parts[2] if len(parts) == 3 else "key"
        limit = 10_000_000 if parts[0] == "newest" else 36_500
        if by in ("key", "modified") and 1 <= count <= limit:
            return Selection(parts[0], count, by)
    raise ValueError(_SELECT_HELP)


def list_local(root: Path) -> list[DataFile]:
    """Every regular file under ``root`` (symlinks to files followed, as a reader would), by key."""
    out = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            try:
                info = path.stat()
            except OSError:  # a dangling symlink, or gone since the walk saw it
                continue
            if stat.S_ISREG(info.st_mode):
                out.append(DataFile(path.relative_to(root).as_posix(), info.st_size, "", info.st_mtime))
    return sorted(out, key=lambda f: f.key)


def list_store(store) -> list[DataFile]:
    return [DataFile(o["key"], o["size"], o["etag"], o["modified"]) for o in store.list_info("")]


def data_files(files: Iterable[DataFile], suffixes) -> tuple[list[DataFile], list[DataFile]]:
    """``(data, skipped)`` in one pass: a supported suffix and no hidden part (``.tmp/``, ``.x.crc``) is data."""
    data, skipped = [], []
    for f in files:
        ok = Path(f.key).suffix.lower() in suffixes and not any(part.startswith(".") for part in f.key.split("/"))
        (data if ok else skipped).append(f)
    return data, skipped


def key_date(key: str) -> dt.date | None:
    """The last date written in ``key`` (the file name is the most specific part), or None."""
    for match in reversed(list(_KEY_DATE.finditer(key))):
        try:
            return dt.date(int(match[1]), int(match[3]), int(match[4]))
        except ValueError:  # 20261345: digits, not a date
            continue
    return None


def modified_date(f: DataFile) -> dt.date:
    try:
        return dt.datetime.fromtimestamp(f.modified, dt.timezone.utc).date()
    except (OverflowError, OSError, ValueError):  # a modification time past year 9999: as far ahead as dates go
        return dt.date.max if f.modified > 0 else dt.date.min


def file_date(f: DataFile, by: str) -> dt.date | None:
    """What dates ``f`` for a selection: its key's date (None without one), or its modification's UTC date."""
    return key_date(f.key) if by == "key" else modified_date(f)


def dated_ahead(files: list[DataFile], selection: Selection, now: dt.datetime) -> list[DataFile]:
    """The files a selection must not choose: dated after the UTC date of ``now`` + ``CLOCK_SLACK``.

    Only a selection dates files (``all`` takes every file as it is); a key without a date has no
    age to be wrong about, and ``newest:N`` by key then ranks it by its key as before.
    """
    if selection.mode == "all":
        return []
    latest = (now + CLOCK_SLACK).date()
    return [f for f in files if (d := file_date(f, selection.by)) is not None and d > latest]


def select(files: list[DataFile], selection: Selection, today: dt.date, source: str) -> list[DataFile]:
    """The files ``selection`` keeps, in key order. ``days:D`` keeps the last D UTC days, ``today`` included."""
    if selection.mode == "all":
        return list(files)
    if selection.mode == "newest":
        ranked = files if selection.by == "key" else sorted(files, key=lambda f: (f.modified, f.key))
        chosen = ranked[-selection.count:]
    else:
        first = today - dt.timedelta(days=selection.count - 1)
        if selection.by == "key":
            undated = [f.key for f in files if key_date(f.key) is None]
            if undated:
                raise DataError(f"{source}: QA_TRAIN_SELECT={selection} dates each file by the date in its key, and "
                                f"{len(undated)} have none ({', '.join(undated[:3])}); name them by date, or use "
                                f"QA_TRAIN_SELECT={selection}:modified")
        chosen = [f for f in files if file_date(f, selection.by) >= first]
    return sorted(chosen, key=lambda f: f.key)


def pin(uri: str, selection: str, files: Iterable[DataFile]) -> dict:
    """What run.json records for one split read from ``uri``: enough to read exactly the same files again."""
    return {"uri": uri, "select": selection,
            "files": [{**asdict(f), "modified": _iso(f.modified)} for f in files]}


def pinned(record, uri: str) -> list[DataFile] | None:
    """The files a run.json pin lists for ``uri``, parsed strictly; None when it is absent, for another URI or malformed."""
    try:
        if not isinstance(record, dict) or record.get("uri") != uri or not isinstance(record.get("files"), list):
            return None
        out = []
        for f in record["files"]:
            if set(f) != {"key", "size", "etag", "modified", "sha256"}:
                return None
            if not (isinstance(f["key"], str) and f["key"] and isinstance(f["size"], int) and f["size"] >= 0
                    and isinstance(f["etag"], str) and re.fullmatch(r"[0-9a-f]{64}", str(f["sha256"]))):
                return None
            out.append(DataFile(f["key"], f["size"], f["etag"], _epoch(f["modified"]), f["sha256"]))
        return out or None
    except (TypeError, ValueError, AttributeError):
        return None


def unmask(pinned_files: list[DataFile], listed: Iterable[DataFile], mask, masked: str) -> list[DataFile]:
    """Pinned files whose key run.json keeps masked (it held a credential) back to the key they stand for.

    ``mask`` is the redaction artifacts went through and ``masked`` its mark: a pinned key with the
    mark in it matches the listed file whose key masks to it, with the pinned size (and ETag, on
    S3). Anything else, or a match that is not unique, stays as pinned: reading it then fails as a
    pinned file that is gone does, and the sha256 the pin holds is checked on every file read.
    """
    todo = [f for f in pinned_files if masked in f.key]
    if not todo:
        return list(pinned_files)
    by_mask: dict[str, list[DataFile]] = {}
    for f in listed:
        by_mask.setdefault(mask(f.key), []).append(f)
    out = []
    for f in pinned_files:
        found = [g for g in by_mask.get(f.key, []) if g.size == f.size and (not f.etag or g.etag == f.etag)]
        out.append(replace(f, key=found[0].key) if masked in f.key and len(found) == 1 else f)
    return out


def _iso(seconds: float) -> str:
    try:
        return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (OverflowError, OSError, ValueError):  # past year 9999 (a local file's mtime can be): the seconds as they are
        return f"@{seconds!r}"


def _epoch(text) -> float:
    if text.startswith("@"):
        return float(text[1:])
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()
