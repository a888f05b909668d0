"""Checkpoints synced to storage in the background, committed by a marker, and found again on resume.

Layout under the run: ``checkpoints/checkpoint-<step>/<files>`` plus ``COMMIT.json`` (every file
with its size and sha256), written only after all files are confirmed in storage. A checkpoint
without a valid marker does not exist as far as resume is concerned, so a process killed in the
middle of an upload can never be resumed from half a checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from job.errors import StorageUnavailable
from job.storage import NotFound, Storage, sha256_file

log = logging.getLogger(__name__)
PREFIX = "checkpoints/"
MARKER = "COMMIT.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def remote_dir(step: int) -> str:
    return f"{PREFIX}checkpoint-{step}/"


def describe(folder: Path) -> dict:
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"files": files}


def committed_steps(store: Storage) -> list[int]:
    """Steps whose checkpoint has a commit marker, newest first."""
    steps = set()
    for key in store.list(PREFIX):
        parts = key[len(PREFIX):].split("/")
        match = _NAME.match(parts[0])
        if match and len(parts) == 2 and parts[1] == MARKER:
            steps.add(int(match.group(1)))
    return sorted(steps, reverse=True)


class Uploader:
    """Uploads checkpoint folders on a background thread; training never waits for it.

    Newer checkpoints supersede queued older ones, so an outage costs uploads, not training
    time. Transient failures are retried with backoff until ``close``'s deadline.
    """

    def __init__(self, store: Storage, keep: int, backoff_seconds: float):
        self.store, self.keep, self.backoff = store, keep, max(backoff_seconds, 0.1)
        self._queue: "queue.Queue[tuple[int, Path] | None]" = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._submitted = self._finished = 0  # idle exactly when every submitted folder is handled
        self._thread = threading.Thread(target=self._loop, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, step: int, folder: Path) -> None:
        with self._lock:
            self._submitted += 1
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
            item = self._latest(item, taken)
            attempt = 0
            while True:
                try:
                    self._commit(*item)
                    break
                except StorageUnavailable as exc:
                    attempt += 1
                    log.warning("checkpoint upload failed, will retry", extra={"event": "checkpoint_retry", "step": item[0], "error": str(exc)})
                    if self._closing.wait(min(self.backoff * 2 ** min(attempt, 5), 30.0)):
                        break  # close() gave up waiting: the job is exiting
                    item = self._latest(item, taken)
                except Exception:  # never kill training over a checkpoint; the next one may work
                    log.exception("checkpoint upload error", extra={"event": "checkpoint_error", "step": item[0]})
                    break
            with self._lock:
                self._finished += taken[0]
                if self._finished == self._submitted:
                    self._idle.set()

    def _commit(self, step: int, folder: Path) -> None:
        started = time.monotonic()
        manifest = describe(folder)
        base = remote_dir(step)
        for name, meta in manifest["files"].items():
            self.store.put_file(folder / name, base + name)
        for name, meta in manifest["files"].items():
            if self.store.size(base + name) != meta["size"]:
                raise StorageUnavailable(f"checkpoint-{step}/{name}: size mismatch after upload")
        manifest.update(step=step, committed_at=time.time())
        self.store.put_bytes(base + MARKER, json.dumps(manifest, indent=1).encode())
        log.info("checkpoint committed", extra={"event": "checkpoint_committed", "step": step,
                                                 "files": len(manifest["files"]), "upload_seconds": round(time.monotonic() - started, 2)})
        self._prune(step, folder.parent)

    def _prune(self, newest: int, local_root: Path) -> None:
        """Keep the newest committed checkpoints; delete older ones only now that a newer one is committed."""
        keep = set(committed_steps(self.store)[: self.keep])
        by_step: dict[int, list[str]] = {}
        for key in self.store.list(PREFIX):
            match = _NAME.match(key[len(PREFIX):].split("/")[0])
            if match:
                by_step.setdefault(int(match.group(1)), []).append(key)
        for step, keys in by_step.items():
            if step < newest and step not in keep:
                # the marker goes first, so a half-deleted checkpoint is never seen as committed
                for key in sorted(keys, key=lambda k: not k.endswith(MARKER)):
                    self.store.delete(key)
        for path in local_root.glob("checkpoint-*"):
            match = _NAME.match(path.name)
            if match and int(match.group(1)) < newest:
                shutil.rmtree(path, ignore_errors=True)

    def wait(self, timeout: float) -> bool:
        """Wait until everything submitted is committed; False if the deadline passed first."""
        return self._idle.wait(timeout)

    def close(self, timeout: float) -> bool:
        done = self.wait(timeout)
        self._closing.set()
        self._queue.put(None)
        self._thread.join(timeout=5)
        return done


class CheckpointCallback(TrainerCallback):
    """Decides when to checkpoint (steps, minutes, stop request, last step) and hands saves to the uploader."""

    def __init__(self, every_steps: int, every_minutes: float, stop, uploader: Uploader | None, lease=None):
        self.every_steps, self.every_seconds = every_steps, every_minutes * 60
        self.stop, self.uploader, self.lease = stop, uploader, lease
        self._last = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        stopping = self.stop.requested or (self.lease is not None and self.lease.lost.is_set())
        timely = bool(self.every_seconds) and time.monotonic() - self._last >= self.every_seconds
        if args.world_size > 1:
            stopping, timely = _agree(args.device, stopping, timely)
        if stopping or timely or step >= state.max_steps or (self.every_steps and step % self.every_steps == 0):
            control.should_save = True
        if stopping:
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last = time.monotonic()
        if args.world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank has written its RNG state before rank 0 hashes the folder
        if self.uploader is not None:
            self.uploader.submit(state.global_step, Path(args.output_dir) / f"checkpoint-{state.global_step}")


def _agree(device, *flags: bool) -> list[bool]:
    """Every rank must stop and save at the same step, or DDP deadlocks: any rank's yes is everyone's."""
    import torch
    import torch.distributed as dist

    votes = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return [bool(v) for v in votes.tolist()]


def restore(store: Storage, local_root: Path, only_step: int | None = None) -> Path | None:
    """Download and verify the newest committed checkpoint (or ``only_step``); skip partial or corrupt ones."""
    for step in [only_step] if only_step is not None else committed_steps(store):
        target = local_root / f"checkpoint-{step}"
        try:
            manifest = json.loads(store.get_bytes(remote_dir(step) + MARKER)[0])
            for name, meta in manifest["files"].items():
                path = target / name
                if not (path.is_file() and path.stat().st_size == meta["size"] and sha256_file(path) == meta["sha256"]):
                    store.get_file(remote_dir(step) + name, path)
                    if sha256_file(path) != meta["sha256"]:
                        raise ValueError(f"{name}: sha256 mismatch")
        except (NotFound, ValueError, KeyError, TypeError) as exc:
            log.warning("skipping unusable checkpoint", extra={"event": "checkpoint_skipped", "step": step, "reason": str(exc)})
            shutil.rmtree(target, ignore_errors=True)
            continue
        # anything else in the local folder is uncommitted or stale: never resume from it
        for other in local_root.glob("checkpoint-*"):
            if other != target:
                shutil.rmtree(other, ignore_errors=True)
        log.info("resuming from checkpoint", extra={"event": "resume", "step": step})
        return target
    return None
