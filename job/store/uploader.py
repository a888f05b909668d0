"""A background thread that uploads checkpoint folders; training never waits for it.

Newer checkpoints supersede queued older ones, so an outage costs uploads, not training time.
Transient failures are retried with backoff until ``close``'s deadline. What an upload does is
the ``commit`` callable's business (``job.store.checkpoints.CheckpointSync``).
"""
from __future__ import annotations

import logging
import os
import queue
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
        self._queue.put((step, folder))

    def _latest(self, item, taken: list[int]):
        # drop queued older checkpoints: only the newest one is worth uploading
        while True:
            try:
                newer = self._queue.get_nowait()
            except queue.Empty:
                return item
            if newer is None:
                self._queue.put(None)
                return item
            taken[0] += 1
            item = newer

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
