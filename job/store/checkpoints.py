"""Checkpoints synced to storage in the background, committed by a marker, and found again on resume.

Layout under the run: ``checkpoints/checkpoint-<step>/<files>`` plus ``COMMIT.json`` (every file
with its size and sha256), written only after all files are confirmed in storage. A checkpoint
without a valid marker does not exist as far as resume is concerned, so a process killed in the
middle of an upload can never be resumed from half a checkpoint.

Under several nodes each node holds files no other node has (the RNG state of its own ranks).
The first process of every other node uploads them and writes ``nodes/<node>.json``; rank 0
commits only once every node's part is in storage, and its marker lists every rank's files.

Nothing in a marker is trusted: ``read_marker`` checks its shape, every file name is confined to
the checkpoint folder by ``job.store.locations.confine``, and any checkpoint that fails is skipped.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from job import safe_json
from job.errors import StorageUnavailable
from job.runtime.ranks import StepVote
from job.store.locations import UnsafeName, check_name, confine
from job.store.models import MODEL_FILE_SUFFIXES
from job.store.storage import NotFound, Storage, sha256_file
from job.store.uploader import Uploader

log = logging.getLogger(__name__)
PREFIX = "checkpoints/"
MARKER = "COMMIT.json"
NODES = "nodes/"  # per-node parts of a multi-node checkpoint, inside its folder
_NAME = re.compile(r"checkpoint-(0|[1-9][0-9]{0,17})")  # ASCII digits only: \d also matches "١" (int() reads it as 1)
_SHA256 = re.compile(r"[0-9a-f]{64}")
PART_WAIT_SECONDS = 300.0  # how long rank 0 waits for the other nodes' parts of one checkpoint
_STATE = ("trainer_state.json", "training_args.bin")  # training state among the model-looking files
# QA_CHECKPOINT_STEPS / QA_CHECKPOINT_MINUTES "auto". On CPU a step takes a second or more: every
# 500 steps or 30 minutes. On CUDA 500 steps are seconds (a 2-epoch DistilBERT run is ~15,000
# steps of a few ms to tens of ms), so the cadence is time only. Measured (bench/RESULTS.md): a
# save stalls training for the local write (0.7-0.9 s for MiniLM's 272 MB, 2.8 s with an upload
# competing; DistilBERT's ~0.8 GB scales to 2-8 s on such a disk); the upload runs beside training.
# Every 10 minutes keeps that stall at about 1% of the time even on a slow scratch disk, and
# bounds what a hard kill (node loss, OOM) can lose to 10 minutes; SIGTERM preemptions lose
# nothing (the stop's own checkpoint).
CPU_CADENCE = (500, 30.0)
CUDA_CADENCE = (0, 10.0)

__all__ = ["Uploader", "CheckpointCallback", "CheckpointSync", "committed_steps", "fetch_model_files", "restore", "read_marker"]


def cadence(settings, cuda: bool) -> tuple[int, float]:
    """``(every_steps, every_minutes)``: the settings, with "auto" resolved for the device."""
    steps, minutes = CUDA_CADENCE if cuda else CPU_CADENCE
    return (steps if settings.checkpoint_steps == "auto" else settings.checkpoint_steps,
            minutes if settings.checkpoint_minutes == "auto" else settings.checkpoint_minutes)


def remote_dir(step: int) -> str:
    return f"{PREFIX}checkpoint-{step}/"


def describe(folder: Path) -> dict[str, dict]:
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_marker(raw: bytes, step: int) -> dict[str, dict]:
    """The ``{name: {size, sha256}}`` a commit marker lists; ValueError for anything malformed or unsafe."""
    try:
        doc = safe_json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("marker is not JSON") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not files:
        raise ValueError("marker lists no files")
    if doc.get("step") != step:
        raise ValueError(f"marker names step {doc.get('step')!r}")
    for name, meta in files.items():
        try:
            check_name(name)
        except UnsafeName as exc:
            raise ValueError(str(exc)) from None
        if name.startswith(NODES) or name == MARKER:
            raise ValueError(f"reserved name {name!r} listed")
        size = meta.get("size") if isinstance(meta, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{name}: bad size")
        if not isinstance(meta.get("sha256"), str) or not _SHA256.fullmatch(meta["sha256"]):
            raise ValueError(f"{name}: bad sha256")
    if "trainer_state.json" not in files:
        raise ValueError("no trainer_state.json")
    world = doc.get("world_size", 1)
    if isinstance(world, int) and world > 1 and any(f"rng_state_{r}.pth" not in files for r in range(world)):
        raise ValueError("a rank's RNG state is missing")
    return files


def committed_steps(store: Storage) -> list[int]:
    """Steps whose checkpoint has a commit marker, newest first."""
    steps = set()
    for key in store.list(PREFIX):
        parts = key[len(PREFIX):].split("/")
        match = _NAME.fullmatch(parts[0])
        if match and len(parts) == 2 and parts[1] == MARKER:
            steps.add(int(match.group(1)))
    return sorted(steps, reverse=True)


class CheckpointSync:
    """What an uploader does with one saved checkpoint folder, on rank 0 or on another node's first process."""

    def __init__(self, store: Storage, keep: int, world_size: int = 1, node: int = 0, nodes: int = 1, after_commit=None):
        self.store, self.keep, self.world_size, self.node, self.nodes = store, keep, world_size, node, nodes
        self.after_commit = after_commit  # (step, folder) -> None, once the marker is written (TensorBoard logs)

    def __call__(self, step: int, folder: Path) -> None:
        started = time.monotonic()
        files = describe(folder)
        base = remote_dir(step)
        for name in files:
            self.store.put_file(folder / name, base + name)
        for name, meta in files.items():
            if self.store.size(base + name) != meta["size"]:
                raise StorageUnavailable(f"checkpoint-{step}/{name}: size mismatch after upload")
        if self.node != 0:  # this node's share is in storage; rank 0 commits the whole
            self.store.put_bytes(f"{base}{NODES}{self.node}.json", json.dumps({"step": step, "files": files}).encode())
            log.info("checkpoint part uploaded", extra={"event": "checkpoint_part", "step": step, "node": self.node})
            prune_local(folder.parent, below=step)  # older parts are committed or superseded: never needed here again
            return
        files = {**files, **self._other_nodes(step, files)}
        marker = {"step": step, "world_size": self.world_size, "files": files, "committed_at": time.time()}
        self.store.put_bytes(base + MARKER, json.dumps(marker, indent=1).encode())
        log.info("checkpoint committed", extra={"event": "checkpoint_committed", "step": step, "files": len(files),
                                                 "upload_seconds": round(time.monotonic() - started, 2)})
        if self.after_commit is not None:
            self.after_commit(step, folder)
        self._prune(step, folder.parent)

    def _other_nodes(self, step: int, own: dict) -> dict:
        if self.nodes == 1:
            return {}
        base, deadline, merged = remote_dir(step) + NODES, time.monotonic() + PART_WAIT_SECONDS, {}
        wanted = {f"{base}{n}.json" for n in range(1, self.nodes)}
        while not wanted <= set(self.store.list(base)):
            if time.monotonic() > deadline:
                raise StorageUnavailable(f"checkpoint-{step}: not every node uploaded its part in time")
            time.sleep(0.5)
        for key in sorted(wanted):
            try:
                part = safe_json.loads(self.store.get_bytes(key)[0])
                files = part["files"]
                for name, meta in files.items():
                    check_name(name)
                    if name in own and own[name] != meta:
                        raise ValueError(f"{name} differs between nodes")
                merged.update(files)
            except (ValueError, KeyError, TypeError, AttributeError, UnsafeName) as exc:
                raise StorageUnavailable(f"checkpoint-{step}: unusable part {key}: {exc}") from None
        return merged

    def _prune(self, newest: int, local_root: Path) -> None:
        """Keep the newest committed checkpoints; delete older ones only now that a newer one is committed."""
        keep = set(committed_steps(self.store)[: self.keep])
        by_step: dict[int, list[str]] = {}
        for key in self.store.list(PREFIX):
            match = _NAME.fullmatch(key[len(PREFIX):].split("/")[0])
            if match:
                by_step.setdefault(int(match.group(1)), []).append(key)
        for step, keys in by_step.items():
            if step < newest and step not in keep:
                # the marker goes first, so a half-deleted checkpoint is never seen as committed
                for key in sorted(keys, key=lambda k: not k.endswith(MARKER)):
                    self.store.delete(key)
        prune_local(local_root, below=newest)


def prune_local(local_root: Path, below: int | None = None, keep: Path | None = None) -> None:
    """Delete local checkpoint folders older than ``below`` (or all but ``keep``): never resumed from."""
    for path in local_root.glob("checkpoint-*"):
        match = _NAME.fullmatch(path.name)
        if path != keep and (below is None or (match and int(match.group(1)) < below)):
            shutil.rmtree(path, ignore_errors=True)


class CheckpointCallback(TrainerCallback):
    """Decides when to checkpoint (steps, minutes, stop request, last step) and hands saves to the uploader.

    Under several processes every rank must save and stop at the same step, or DDP deadlocks: the
    stop, lost-lease and time flags are voted (``StepVote``), one step late, without a host sync.
    """

    def __init__(self, every_steps: int, every_minutes: float, stop, uploader: Uploader | None, lease=None):
        self.every_steps, self.every_seconds = every_steps, every_minutes * 60
        self.stop, self.uploader, self.lease = stop, uploader, lease
        self._last = time.monotonic()
        self._vote: StepVote | None = None
        self._save_started: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.monotonic()
        if args.world_size > 1 and self._vote is None:
            self._vote = StepVote()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        lost = self.lease is not None and self.lease.lost.is_set()
        stopping = self.stop.requested or lost
        timely = bool(self.every_seconds) and time.monotonic() - self._last >= self.every_seconds
        if self._vote is not None:
            stopping, timely, lost = self._vote.exchange(stopping, timely, lost)
        if lost:  # another process owns the run now: save nothing, stop at once
            control.should_training_stop = True
            return control
        if stopping or timely or step >= state.max_steps or (self.every_steps and step % self.every_steps == 0):
            control.should_save = True
            self._save_started = time.monotonic()
        if stopping:
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last = time.monotonic()
        if self._save_started is not None:  # the Trainer's local write: the time training stood still for it
            log.info("checkpoint saved", extra={"event": "checkpoint_saved", "step": state.global_step,
                                                "seconds": round(self._last - self._save_started, 3)})
            self._save_started = None
        if args.world_size > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank has written its RNG state before any node hashes its folder
        if self.uploader is not None:
            self.uploader.submit(state.global_step, Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if self._vote is not None:
            self._vote.close()
            self._vote = None


def fetch_model_files(store: Storage, dest: Path) -> bool:
    """The model files (config, weights, tokenizer) of the newest committed checkpoint, verified, into ``dest``.

    False when there is no usable checkpoint. The optimizer, scheduler and RNG states stay where
    they are: ``restore`` fetches the whole checkpoint when training resumes.
    """
    for step in committed_steps(store):
        try:
            files = read_marker(store.get_bytes(remote_dir(step) + MARKER)[0], step)
            wanted = {n: m for n, m in files.items() if "/" not in n and n.endswith(MODEL_FILE_SUFFIXES) and n not in _STATE}
            if "config.json" not in wanted:
                raise ValueError("no config.json")
            for name, meta in wanted.items():
                path = confine(dest, name)
                store.get_file(remote_dir(step) + name, path)
                if sha256_file(path) != meta["sha256"]:
                    raise ValueError(f"{name}: sha256 mismatch")
        except (NotFound, ValueError, UnsafeName) as exc:
            log.warning("skipping unusable checkpoint", extra={"event": "checkpoint_skipped", "step": step, "reason": str(exc)[:300]})
            shutil.rmtree(dest, ignore_errors=True)
            continue
        log.info("model files from the checkpoint", extra={"event": "init_from_checkpoint", "step": step})
        return True
    return False


def restore(store: Storage, local_root: Path, only_step: int | None = None) -> Path | None:
    """Download and verify the newest committed checkpoint (or ``only_step``); skip partial, corrupt or unsafe ones."""
    for step in [only_step] if only_step is not None else committed_steps(store):
        target = local_root / f"checkpoint-{step}"
        try:
            files = read_marker(store.get_bytes(remote_dir(step) + MARKER)[0], step)
            for name, meta in files.items():
                path = confine(target, name)
                if not (path.is_file() and path.stat().st_size == meta["size"] and sha256_file(path) == meta["sha256"]):
                    store.get_file(remote_dir(step) + name, path)
                    if sha256_file(path) != meta["sha256"]:
                        raise ValueError(f"{name}: sha256 mismatch")
        except (NotFound, ValueError, UnsafeName) as exc:
            log.warning("skipping unusable checkpoint", extra={"event": "checkpoint_skipped", "step": step, "reason": str(exc)[:300]})
            shutil.rmtree(target, ignore_errors=True)
            continue
        # anything else in the local folder is uncommitted or stale: never resume from it
        prune_local(local_root, keep=target)
        log.info("resuming from checkpoint", extra={"event": "resume", "step": step})
        return target
    prune_local(local_root)  # nothing committed: local leftovers belong to no checkpoint that counts
    return None
