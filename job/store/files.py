"""Local files written whole and durably, and per-file locks that leave nothing behind.

What the local storage (``job.store.storage.LocalStorage``) and the work dir build on:

- ``create_new``: create a file that must not exist yet (a lease, a channel's first pointer, a
  history entry). The bytes go to a hidden temporary file, are fsynced, and the file is then
  *linked* to its name, which fails if the name exists: a reader, a racing writer or a kill at
  any moment sees either no file or the whole file, never an empty or half-written one.
- ``atomic_write``: the same for a file that may exist (temporary file, fsync, rename over it).
  Both fsync the folder after the rename or link, so a decision written this way (a pointer, a
  lease, a commit marker) survives a power loss once the call returns.
- ``writing``: a temporary path for a writer that produces a file itself (Parquet, tar), renamed
  into place on success and removed on any failure: a full disk must not leave a half-written
  temporary file eating the space the next attempt needs.
- ``file_lock``: an exclusive lock for one file, held on a hidden ``.<name>.lock`` beside it that
  the holder removes when done, so no lock file outlives an operation (and keeps a folder from
  being removed). A waiter that gets the lock of a file its holder already removed looks again.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path

from job.store.scratch import temp_path

# where a filesystem has no hard links (FAT, some FUSE and SMB mounts), create_new falls back
# to a check and a rename under the file's lock, which all of this job's writers take
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def create_new(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``; FileExistsError if it exists. All or nothing, durable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_copy(path, data)
    try:
        try:
            os.link(tmp, path)
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            with file_lock(path):
                if path.exists():
                    raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
                os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file and rename, so a reader never sees half a file; durable once it returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_copy(path, data)
    try:
        os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(path: Path, durable: bool = False):
    """Yield a temporary path beside ``path``; rename it into place on success, remove it on failure.

    ``durable``: fsync the file and the folder too (a file a commit marker will vouch for).
    """
    tmp = temp_path(path)  # this process's own name (ranks of a node may race), swept if it dies (job.store.scratch)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        if durable:
            _sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def writing_folder(path: Path):
    """Yield a temporary folder beside ``path``, renamed into its place (replacing it) on success, removed on failure:
    a folder filled file by file (staged results) is there whole or not at all, whenever the process dies."""
    tmp = temp_path(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def reserved_array(path: Path, shape: tuple[int, ...], dtype):
    """A new ``.npy`` file at ``path``, memory-mapped for writing, with every block of it reserved on disk first.

    A store into a page of a sparse file that the disk has no room for is not an error a call can
    return: the kernel sends SIGBUS and the process dies (exit 135, no error line, no ``failed``
    event). ``posix_fallocate`` takes the blocks up front, so a full disk is an ``OSError``
    (ENOSPC, exit 75) here, before any page is touched.
    """
    import numpy as np

    dtype = np.dtype(dtype)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                 "shape": tuple(int(n) for n in shape)})
        _reserve(f, f.tell() + int(np.prod(shape)) * dtype.itemsize, path)
    return np.lib.format.open_memmap(path, mode="r+")


def _reserve(f, size: int, path: Path) -> None:
    try:
        os.posix_fallocate(f.fileno(), 0, size)
        return
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
            raise
    # no fallocate on this filesystem: write the zeros, which reserves the blocks as surely (ENOSPC on write)
    f.seek(0, os.SEEK_END)
    zeros = bytes(1 << 20)
    while f.tell() < size:
        f.write(zeros[:size - f.tell()])
    f.flush()


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold the exclusive lock of ``path`` (its folder must exist); the lock file is gone afterwards."""
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)  # its holder removed that file when done: lock the one there now
    try:
        yield
    finally:
        try:
            lock.unlink(missing_ok=True)  # still holding it: nobody can have locked a newer file
        finally:
            os.close(fd)


def _temp_copy(path: Path, data: bytes) -> Path:
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _sync_folder(folder: Path) -> None:
    """fsync a folder: a new or renamed name in it is durable only then."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a folder; the rename itself stays atomic
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
