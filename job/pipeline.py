"""The job, stage by stage: settings -> data -> features -> train -> evaluate -> publish."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from job import checkpoints, publish
from job.data import load_splits
from job.errors import ConfigError, Preempted, RunLocked
from job.evaluate import evaluate
from job.features import build_features
from job.lease import Lease
from job.preemption import StopRequest
from job.settings import Settings
from job.storage import LocalStorage, RetryPolicy, open_storage
from job.train import ProgressLog, build_trainer, load_model, resolve_precision, train, training_arguments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """Where this process sits under torchrun; a plain ``python -m job`` is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls, environ) -> "Ranks":
        return cls(int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0)), int(environ.get("WORLD_SIZE", 1)))

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def run(settings: Settings, ranks: Ranks) -> None:
    stop = StopRequest(settings.stop_grace_seconds).install()
    store = open_run_storage(settings)
    if publish.is_complete(store):
        log.info("run already complete, nothing to do", extra={"event": "already_complete", "run_id": settings.run_id})
        return
    lease = Lease(store, settings.run_id, settings.lease_seconds) if ranks.is_writer else None
    with lease or contextlib.nullcontext():
        staged = publish.staged(settings)
        if staged is not None:  # an earlier attempt trained and evaluated; only the upload failed
            if ranks.is_writer:
                log.info("publishing results staged by an earlier attempt", extra={"event": "publish_staged"})
                publish.publish(staged, store)
            return
        train_split, eval_split = load_splits(settings, _policy(settings))
        tokenizer, model = load_model(settings.model_name, settings.seed, settings.attention)
        features = build_features(settings, tokenizer, train_split, eval_split, store, ranks.is_writer)
        _check_stop(stop, lease)
        fine_tune_evaluate_publish(settings, ranks, store, stop, lease, tokenizer, model, features, train_split, eval_split)


def fine_tune_evaluate_publish(settings, ranks, store, stop, lease, tokenizer, model, features, train_split, eval_split):
    import torch

    cuda = torch.cuda.is_available()
    precision = resolve_precision(settings.precision, cuda, cuda and torch.cuda.is_bf16_supported(including_emulation=False))
    out = Path(settings.work_dir) / settings.run_id / "trainer"
    args = training_arguments(settings, out, precision)
    resume = _restore(store, out, ranks, args)
    uploader = checkpoints.Uploader(store, settings.checkpoints_to_keep, settings.storage_backoff_seconds) if ranks.is_writer else None
    callbacks = [ProgressLog(settings.batch_size * settings.grad_accum_steps * ranks.world_size),
                 checkpoints.CheckpointCallback(settings.checkpoint_steps, settings.checkpoint_minutes, stop, uploader, lease)]
    trainer = build_trainer(settings, model, tokenizer, features.train, args, callbacks)
    log.info("training setup", extra={"event": "setup", "precision": precision, "device": _device_name(cuda),
                                       "world_size": ranks.world_size, "resume_step": _step(resume)})
    try:
        train_metrics = train(trainer, resume)
    finally:
        if uploader is not None and (stop.requested or (lease and lease.lost.is_set())):
            committed = uploader.close(stop.time_left())
            log.warning("stopping after checkpoint", extra={"event": "stopped", "committed": committed,
                                                            "step": trainer.state.global_step})
    _check_stop(stop, lease)
    if uploader is not None and not uploader.close(settings.stop_grace_seconds):
        log.warning("last checkpoint not committed; publishing anyway", extra={"event": "checkpoint_pending"})
    scores, predictions = evaluate(trainer, features.eval, eval_split.rows, settings)
    if ranks.is_writer:
        context = {
            "data": {s.name: {"source": s.source, "sha256": s.sha256, "examples": len(s.rows)} for s in (train_split, eval_split)},
            "features": {"cache_key": features.cache_key, "train_windows": len(features.train), "eval_windows": len(features.eval)},
            "precision": precision, "device": _device_name(cuda), "world_size": ranks.world_size,
            "resumed_from_step": _step(resume),
        }
        root = publish.stage(settings, trainer, tokenizer, scores, predictions, train_metrics, context)
        publish.publish(root, store)


def open_run_storage(settings: Settings):
    store = open_storage(settings.run_uri, _policy(settings), settings.s3_endpoint_url, settings.s3_region)
    if isinstance(store, LocalStorage):
        try:
            store.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"QA_OUTPUT_URI={settings.output_uri}: cannot create {store.root} ({exc.strerror})") from None
    else:
        store.check_access()
    return store


def _policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(settings.storage_attempts, settings.storage_backoff_seconds, settings.storage_timeout_seconds)


def _restore(store, out: Path, ranks: Ranks, args) -> Path | None:
    """Rank 0 picks the checkpoint; every node downloads that same one (reads only) before training."""
    if ranks.world_size == 1:
        return checkpoints.restore(store, out)
    import torch.distributed as dist

    _ = args.device  # initialises the process group the Trainer will use
    choice = [checkpoints.restore(store, out) if ranks.rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    step = _step(choice[0])
    if ranks.rank != 0 and ranks.local_rank == 0 and step is not None:
        choice[0] = checkpoints.restore(store, out, only_step=step)
    dist.barrier()
    return out / f"checkpoint-{step}" if step is not None else None


def _step(path: Path | None) -> int | None:
    return int(path.name.split("-")[1]) if path else None


def _device_name(cuda: bool) -> str:
    import torch

    return torch.cuda.get_device_name(0) if cuda else "cpu"


def _check_stop(stop: StopRequest, lease) -> None:
    if lease is not None and lease.lost.is_set():
        raise RunLocked("the run lease was taken over by another process; stopped after checkpointing")
    if stop.requested:
        raise Preempted(f"stopped by {stop.signal_name}; rerun with the same QA_RUN_ID to resume")
