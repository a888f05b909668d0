"""The work dir's temporary files: named for the live process that owns them, swept once it is dead.

A SIGKILL (OOM, node loss, ``kill -9``) runs no cleanup: a half-written rows file, the teacher's
logits being scored, a download's ``.part``, half a staged model stayed in ``QA_WORK_DIR`` for good,
and with several runs sharing a work dir, nothing could tell them from a live process's files.

So every temporary file or folder the job makes is named ``.<name>.<owner>.<pid>-<n>.tmp``
(``temp_path``), ``<owner>`` a token of the process that made it (its forked workers share it,
and the lock below: they live no longer than it does). The process holds an exclusive
``flock`` on ``<work>/.owners/<owner>`` from start to exit (``hold``); the kernel drops it when
the process dies, however it dies. The next start of any run in that work dir (``sweep``) deletes
every temporary file whose owner's lock is free: a live process's files, another run's included,
are never touched. The owner file records this kernel's boot id, and a free lock counts as death
only on the same kernel: a work dir on a network volume whose locks are local to each node, or
copied from elsewhere, is never swept on that evidence (its files stay, as before).
"""
from __future__ import annotations

import fcntl
import itertools
import os
import re
import shutil
import uuid
from pathlib import Path

OWNERS = ".owners"
# ".<name>.<owner>.<pid>-<n>.tmp", and what boto3 appends to a download's target while it writes it
_TEMP = re.compile(r"\..+\.(?P<owner>[0-9a-f]{16})\.\d+-\d+\.tmp(\.[0-9A-Za-z]{1,16})?")
_OWNER = uuid.uuid4().hex[:16]  # this process's; a forked worker inherits it, and the lock that marks it alive
_count = itertools.count()
_held: dict[str, object] = {}  # work dir -> the open owner file whose flock marks this process alive


def owner() -> str:
    return _OWNER


def temp_path(path: Path) -> Path:
    """A temporary name beside ``path``, this process's own: ``.<name>.<owner>.<pid>-<n>.tmp``."""
    return path.with_name(f".{path.name}.{_OWNER}.{os.getpid()}-{next(_count)}.tmp")


def hold(work: Path) -> None:
    """Mark this process alive in ``work`` until it exits: an flock on ``<work>/.owners/<owner>``."""
    key = f"{owner()}:{work}"
    if key in _held:
        return
    folder = work / OWNERS
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / owner(), "w")
    fcntl.flock(f, fcntl.LOCK_EX)  # a fresh name: only a sweeper looking at it can hold it, for a moment
    f.write(_boot_id() or "")
    f.flush()
    _held[key] = f


def sweep(work: Path) -> list[tuple[str, int]]:
    """Delete the temporary files and folders under ``work`` whose owner is dead; ``(relative path, bytes)`` of each."""
    verdict: dict[str, object] = {owner(): None}  # owner -> its owner file, locked by us, when dead; else None
    gone: list[tuple[str, int]] = []
    try:
        for folder, dirs, names in os.walk(work):
            here = Path(folder)
            if here == work:
                dirs[:] = [d for d in dirs if d != OWNERS]
            for name in [*dirs, *names]:
                match = _TEMP.fullmatch(name)
                if match is None:
                    continue
                who = match["owner"]
                if who not in verdict:
                    verdict[who] = _dead(work / OWNERS / who)
                if verdict[who] is None:
                    continue
                path = here / name
                gone.append((path.relative_to(work).as_posix(), _size(path)))
                if name in dirs:
                    dirs.remove(name)
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        # the records of owners that left nothing behind (every process that exited, killed or not)
        for record in sorted((work / OWNERS).iterdir()) if (work / OWNERS).is_dir() else []:
            if record.name not in verdict:
                verdict[record.name] = _dead(record)
    finally:
        for who, lock in verdict.items():
            if lock is not None:  # still holding the dead owner's lock: nobody else sweeps it meanwhile
                (work / OWNERS / who).unlink(missing_ok=True)
                lock.close()
    return gone


def _dead(path: Path):
    """The owner file at ``path``, open and locked by us, when its owner is provably dead; else None."""
    try:
        f = open(path, "r+")
    except FileNotFoundError:  # swept already, or never held here: no process can still own such a file
        return open(os.devnull)
    except OSError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: alive
        f.close()
        return None
    boot = f.read().strip()
    if not boot or boot != _boot_id():  # another kernel's lock (a node-local lock on a network volume): unknown
        f.close()
        return None
    return f


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:  # the same for every container of a node
            return f.read().strip() or None
    except OSError:
        return None
