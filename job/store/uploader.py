"""A background thread that uploads checkpoint folders; training never waits for it.

Newer checkpoints supersede queued older ones, so an outage costs uploads, not training time.
Transient failures are retried with backoff until ``close``'s deadline. What an upload does is
the ``commit`` callable's business (``job.store.checkpoints.CheckpointSync``).

A folder that will never be uploaded (superseded by a newer one, or failed for good) is deleted
at once: it can never be resumed from (only committed checkpoints count), and during a storage
outage with frequent saves such folders would otherwise fill the scratch volume. So at most
four checkpoint folders exist locally at any moment: the newest committed one, the one being
uploaded, one waiting, and the one the Trainer is writing.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import Callable

from job.errors import RunLocked, StorageDenied, StorageUnavailable

log = logging.getLogger(__name__)


class Uploader:
    def __init__(self, commit: Callable[[int, Path], None], backoff_seconds: float):
        self.commit, self.backoff = commit, max(backoff_seconds, 0.1)
        self._queue: "queue.Queue[tuple[int, Path] | None]" = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._submitted = self._finished = 0  # idle exactly when every submitted folder is handled
        self.newest_submitted: int | None = None
        self.last_committed: int | None = None
        self._thread = threading.Thread(target=self._loop, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, step: int, folder: Path) -> None:
        with self._lock:
            self._submitted += 1
            self.newest_submitted = step
            self._idle.clear()
            waiting = self._take_waiting()  # never uploaded now: this one supersedes them
            self._finished += len(waiting)
            self._queue.put((step, folder))
        for _, old in waiting:
            _discard(old)

    def _take_waiting(self) -> list:
        """Everything queued and not yet picked up (the close marker stays queued)."""
        waiting = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return waiting
            if item is None:
                self._queue.put(None)
                return waiting
            waiting.append(item)

    def _latest(self, item, taken: list[int]):
        # drop queued older checkpoints: only the newest one is worth uploading
        with self._lock:
            newer = self._take_waiting()
        for superseded in ([item] + newer)[:-1] if newer else []:
            _discard(superseded[1])
        taken[0] += len(newer)
        return newer[-1] if newer else item

    def _loop(self) -> None:
        try:  # on Linux a thread is a task with its own nice value; threads it starts inherit it
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass  # training first, uploads with what is left: where it fails, uploads just compete
        while True:
            item = self._queue.get()
            if item is None:
                return
            taken = [1]
            item = self._upload(self._latest(item, taken), taken)
            with self._lock:
                self._finished += taken[0]
                if self._finished == self._submitted:
                    self._idle.set()

    def _upload(self, item, taken: list[int]):
        attempt = 0
        while True:
            try:
                self.commit(*item)
                self.last_committed = item[0]
                return item
            except StorageUnavailable as exc:
                attempt += 1
                log.warning("checkpoint upload failed, will retry", extra={"event": "checkpoint_retry", "step": item[0], "error": str(exc)})
                if self._closing.wait(min(self.backoff * 2 ** min(attempt, 5), 30.0)):
                    break  # close() gave up waiting: the job is exiting
                item = self._latest(item, taken)
            except RunLocked as exc:  # the lease is lost: nothing more may be written, ever
                log.error("checkpoint not committed: lease lost", extra={"event": "checkpoint_error", "step": item[0], "error": str(exc)})
                break
            except (StorageDenied, Exception) as exc:  # never kill training over a checkpoint; the next one may work
                log.error("checkpoint upload error", extra={"event": "checkpoint_error", "step": item[0],
                                                           "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                break
        if self.last_committed != item[0] and not self._closing.is_set():
            _discard(item[1])  # given up on: never resumed from (a closing job's last one stays for the record)
        return item

    def wait(self, timeout: float) -> bool:
        """Wait until everything submitted is handled; False if the deadline passed first."""
        return self._idle.wait(max(0.0, timeout))

    def close(self, timeout: float) -> bool:
        """Wait for the uploads, then stop the thread; True when the newest submitted checkpoint is committed."""
        done = self.wait(timeout)
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout=max(0.0, min(timeout, 5.0)))
        return done and self.newest_submitted in (None, self.last_committed)


def _discard(folder: Path) -> None:
    """Delete a local checkpoint folder that will never be uploaded."""
    shutil.rmtree(folder, ignore_errors=True)
