"""The job, stage by stage: settings -> data -> features -> train -> evaluate -> publish (-> promote)."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from job import safe_json
from job import distill, publish
from job.channels import nightly, promotion
from job.data import Split, load_split, load_splits
from job.runtime.device import check_device
from job.errors import ConfigError, DataError, JobError, RunLocked, StorageUnavailable
from job.observe import summary
from job.runtime.preemption import StopRequest
from job.preprocess import build_features
from job.runtime.ranks import Ranks
from job.settings import Settings
from job.store import scratch
from job.store.fingerprint import training_inputs
from job.store.lease import Lease
from job.store.models import model_identity
from job.store.storage import LocalStorage, RetryPolicy, open_storage

# The modules that train (torch, transformers' Trainer: about 5 s to import) are imported where
# training starts, after every early exit: a bad row, a finished run or a night with nothing new
# to learn is reported in a second or two.

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What every stage after start-up shares: settings, place in the process group, storage, stop and lease."""

    settings: Settings
    ranks: Ranks
    store: object  # job.store.storage.Storage of the run folder
    stop: StopRequest
    lease: Lease | None
    args: object = None  # the Trainer's arguments, once they created the process group (torchrun only)

    def check_stop(self) -> None:
        """Between stages: a lost lease or a stop request ends the run here (exit 4 or 143)."""
        if self.lease is not None and self.lease.lost.is_set():
            raise RunLocked("the run lease was taken over by another process; stopped after checkpointing")
        self.stop.check()


def run(settings: Settings, ranks: Ranks, stop: StopRequest) -> None:
    work = prepare_work_dir(settings)
    store = open_run_storage(settings)
    complete = publish.is_complete(store)
    if complete and not settings.channel:
        log.info("run already complete, nothing to do", extra={"event": "already_complete", "run_id": settings.run_id})
        return
    lease = Lease(store, settings.run_id, settings.lease_seconds, stop, lock_dir=work) if ranks.is_writer else None
    with lease or contextlib.nullcontext():
        ctx = RunContext(settings, ranks, lease.guard(store) if lease else store, stop, lease)
        if complete:
            log.info("run already complete; only its promotion may be left", extra={"event": "already_complete",
                                                                                     "run_id": settings.run_id})
        elif not train_evaluate_publish(ctx):
            return  # QA_CHANNEL night with nothing new to learn
        if ranks.is_writer and settings.teacher_channel:
            distill.release_teacher(settings)  # complete: the teacher run it pinned need not be kept for it
        if ranks.is_writer and settings.channel:
            promotion.promote(ctx)  # gate against the channel's holder, move the pointer, prune old runs


def train_evaluate_publish(ctx: RunContext) -> bool:
    """Data, features, training, evaluation, publishing; False when tonight has nothing new to learn.

    The run may have been completed by the process whose lease this one waited for: that is checked
    first, under the lease (on rank 0, for every rank, under torchrun).

    Under torchrun every decision one process takes for all is rank 0's (``job.runtime.ranks``): the data
    read (``_rank0_data``), the night's plan, the run folder's claim and whether results staged in
    rank 0's work dir are published instead of training again. A rank that decided on its own would
    go elsewhere and leave the others waiting in a collective.

    ``QA_DEVICE`` is checked after the data (a bad row ends the run before torch loads) and, in
    one process, after the night's plan (so does a night with nothing new); under torchrun before
    the process group, which the decisions travel through.
    """
    settings, ranks = ctx.settings, ctx.ranks
    if ranks.world_size == 1 and publish.is_complete(ctx.store):
        return _completed_meanwhile(settings)
    # a retry reads the very files its first attempt read, whatever landed under the prefix since
    record = publish.run_record(ctx.store)  # an earlier attempt's: the data files and teacher run it pinned
    train_split, eval_split = load_splits(settings, _policy(settings), publish.pinned_data(record))
    if ranks.world_size > 1:
        args = _join_process_group(ctx)
        ranks = ctx.ranks.joined()  # rank agreements and waits for another rank's work: a gloo group of their own
        ctx = replace(ctx, args=args, ranks=ranks)
        if ranks.from_rank0(lambda: publish.is_complete(ctx.store)):
            return _completed_meanwhile(settings)
        train_split, eval_split = _rank0_data(ctx, train_split, eval_split)
    base = model_identity(settings.model_name)  # by content: a model replaced in place is another model
    # a teacher that cannot teach this student is exit 2 here, before the run folder is bound to it
    teacher = distill.resolve_teacher(settings, ranks, publish.pinned_teacher(record)) if settings.distilling else None
    taught_by = teacher.identity if teacher else None
    night = ranks.from_rank0(lambda: nightly.plan(ctx, train_split, eval_split, base, taught_by))  # skip-if-unchanged, warm start
    if night.unchanged:
        return False
    if ctx.args is None:
        check_device(settings)  # a GPU that cannot be used as asked: exit 2 before anything is tokenized or trained
    inputs = training_inputs(settings, train_split.sha256, eval_split.sha256, night.init, base, taught_by)
    pins = {s.name: s.pin for s in (train_split, eval_split) if s.pin}
    if ranks.from_rank0(lambda: _claim(ctx, inputs, pins, teacher.run if teacher else None)):
        if ranks.is_writer:  # an earlier attempt of this very run trained and evaluated; only the upload failed
            publish.publish_staged(publish.staging_dir(settings), ctx.store, ctx.stop)
        return True
    ctx.check_stop()
    from job.train import check_window_fits, load_model

    tokenizer, model = load_model(nightly.init_model(settings, night, ranks.local_rank, ctx.store), settings.seed,
                                  settings.attention)
    check_window_fits(model, settings.max_length)
    # the first process of each node tokenizes (or downloads the cache); the others then read its cache
    features = ranks.leaders_first(lambda: build_features(settings, tokenizer, train_split, eval_split, ctx.store,
                                                          ranks.is_writer))
    # the training rows are in the features now: let their file go, or the pages tokenizing read
    # stay in this process's resident memory through the whole run
    train_split = train_split.released()
    ctx.check_stop()
    taught = None
    if teacher is not None:  # the teacher's logits, scored once per node by all its ranks (or downloaded); then freed
        taught = distill.prepare(settings, teacher, features, ctx.store, ranks, ctx.stop)
        features = replace(features, train=distill.indexed(features.train))
        ctx.check_stop()
    fine_tune_evaluate_publish(ctx, tokenizer, model, features, train_split, eval_split, inputs, taught, teacher)
    return True


def _completed_meanwhile(settings: Settings) -> bool:
    """Seen under the lease: this process waited for it while its holder finished the run. Publishing the
    complete run again would rewrite what readers (and a channel) already use; only its promotion may be left."""
    log.info("run completed by the lease's previous holder", extra={"event": "already_complete", "run_id": settings.run_id})
    return True


def _join_process_group(ctx: RunContext):
    """Under torchrun: the device check, then the Trainer's arguments, which create the process group."""
    settings, ranks = ctx.settings, ctx.ranks
    if check_device(settings, ranks.world_size, ranks.local_world_size) == "cpu":
        # transformers hands QA_PROCESS_GROUP_TIMEOUT_SECONDS (ddp_timeout) to a GPU run's group only; on the
        # CPU the group is started here, before the Trainer's arguments would start it with torch's default
        from datetime import timedelta

        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(seconds=settings.process_group_timeout_seconds))
    args = _training_arguments(settings, ranks.local_world_size)
    _ = args.device  # initialises the process group (accelerate's PartialState), which the Trainer then uses
    return args


def _training_arguments(settings, ranks_on_node: int = 1):
    from job.train import precision_for, training_arguments

    return training_arguments(settings, Path(settings.work_dir) / settings.run_id / "trainer", precision_for(settings),
                              ranks_on_node=ranks_on_node)


def _rank0_data(ctx: RunContext, *splits: Split) -> tuple[Split, ...]:
    """The splits as rank 0 read them, on every rank.

    A retry reads the files run.json pins; a first attempt lists a folder or prefix on every
    rank, and a file landing between two ranks' listings would train them on different rows under
    a fingerprint and a pin that name rank 0's. A rank whose split differs by content reads rank
    0's files (its pin) instead. A split read from one file that differs (another file at the same
    path on another node) has no listing to follow: a data error, raised on every rank at once.
    """
    ranks, settings = ctx.ranks, ctx.settings
    theirs = ranks.from_rank0(lambda: {s.name: (s.sha256, s.pin) for s in splits})
    agreed, problem = [], None
    try:
        for split in splits:
            sha256, pin = theirs[split.name]
            if split.sha256 != sha256:
                if pin is None:
                    raise DataError(f"{split.source}: rank {ranks.rank} read other {split.name} data than rank 0 (sha256 "
                                    f"{split.sha256[:12]} against {sha256[:12]}); every node must read the same data")
                log.warning("this rank listed other data files than rank 0; reading rank 0's", extra={
                    "event": "data_from_rank0", "split": split.name, "source": split.source, "files": len(split.files),
                    "rank0_files": len(pin["files"])})
                split = load_split(split.name, settings, _policy(settings), {split.name: pin})
            agreed.append(split)
    except JobError as exc:
        problem = exc
    if ranks.any_of(problem is not None):  # together: a rank that left alone would keep the others waiting
        raise problem or DataError("another rank read other data than rank 0 (see its log); every node must read "
                                   "the same data")
    return tuple(agreed)


def _claim(ctx: RunContext, inputs: dict, pins: dict, teacher_run: str | None) -> bool:
    """On rank 0: bind the run folder to these inputs (and pin the data files read and a channel teacher's run);
    True when this work dir holds their staged results."""
    if teacher_run:  # before the pin: from now on the teacher channel's retention keeps that model for this run
        distill.hold_teacher(ctx.settings, teacher_run)
    publish.claim_run_folder(ctx.store, ctx.settings, inputs, pins, teacher_run)
    return publish.staged_results(ctx.settings, inputs) is not None


def fine_tune_evaluate_publish(ctx: RunContext, tokenizer, model, features, train_split, eval_split, inputs: dict,
                               taught=None, teacher=None) -> None:
    from job.evaluate import check_scores, evaluate
    from job.train import check_finite

    settings, ranks = ctx.settings, ctx.ranks
    args = ctx.args or _training_arguments(settings, ranks.local_world_size)
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    out = Path(args.output_dir)
    resume = _restore(ctx.store, out, ranks)
    trainer, uploader = _trainer(ctx, tokenizer, model, features, eval_split, args, resume, taught)
    device = _device_name(not args.use_cpu)
    log.info("training setup", extra={"event": "setup", "precision": precision, "device": device,
                                       "world_size": ranks.world_size, "resume_step": _step(resume)})
    train_metrics = _train_and_commit(ctx, trainer, uploader, resume)
    check_finite(trainer)  # NaN weights are never evaluated, published or promoted (every rank has the same ones)
    # under torchrun a stop is not checked between batches: a rank leaving mid-prediction would leave the
    # others in a collective; the grace period covers an evaluation, and the stop is honoured after it
    scores, predictions = evaluate(trainer, features.eval, eval_split.rows, settings,
                                   stop=ctx.stop if ranks.world_size == 1 else None)
    check_scores(scores)
    ctx.check_stop()
    if ranks.is_writer:
        context = {
            "data": {s.name: {"source": s.source, "sha256": s.sha256, "examples": s.examples,
                              **({"files": [{"key": f.key, "sha256": f.sha256, "size": f.size} for f in s.files]}
                                 if s.files else {})}
                     for s in (train_split, eval_split)},
            "features": {"cache_key": features.cache_key, "train_windows": len(features.train), "eval_windows": len(features.eval)},
            "precision": precision, "device": device, "world_size": ranks.world_size,
            "resumed_from_step": _step(resume),
            **({"distillation": {"teacher": teacher.name, "teacher_identity": teacher.identity,
                                 "alpha": settings.distill_alpha, "temperature": settings.distill_temperature,
                                 "logits_cache": taught.cache}} if teacher and taught else {}),
        }
        root = publish.stage(settings, trainer, tokenizer, scores, predictions, train_metrics, context, inputs,
                             features.eval, eval_split.rows, ctx.stop)
        metrics = safe_json.loads((root / "metrics.json").read_text())
        publish.publish(root, ctx.store, ctx.stop)
        summary.log_summary(settings, metrics)


def _trainer(ctx: RunContext, tokenizer, model, features, eval_split, args, resume: Path | None, taught=None):
    """The Trainer with the job's callbacks, and the checkpoint uploader (node leaders only, else None)."""
    from job.observe import tracking
    from job.observe.periodic_eval import PeriodicEval
    from job.store import checkpoints
    from job.train import ProgressLog, build_trainer

    settings, ranks = ctx.settings, ctx.ranks
    events = tracking.logging_dir(settings) if "tensorboard" in settings.trackers else None
    if events and ranks.is_writer:
        tracking.restore_events(resume, events)  # the curves go on from the resumed checkpoint, not from the kill
    uploader = None
    if ranks.is_node_leader:
        logs = tracking.LogsMirror(ctx.store) if events and ranks.is_writer else None
        sync = checkpoints.CheckpointSync(ctx.store, settings.checkpoints_to_keep, ranks.world_size, ranks.node, ranks.nodes, logs)
        uploader = checkpoints.Uploader(sync, settings.storage_backoff_seconds)
    # RunTensorBoard before CheckpointCallback: the events are in a checkpoint before it is uploaded
    callbacks = [*([tracking.RunTensorBoard(events)] if events else []),
                 ProgressLog(settings.batch_size * settings.grad_accum_steps * ranks.world_size),
                 checkpoints.CheckpointCallback(*checkpoints.cadence(settings, not args.use_cpu), ctx.stop, uploader, ctx.lease)]
    trainer = build_trainer(settings, model, tokenizer, features.train, args, callbacks, loss=taught)
    if settings.eval_steps:
        PeriodicEval(settings.eval_steps, eval_split.rows, features.eval, settings).attach(trainer)
    return trainer, uploader


def _train_and_commit(ctx: RunContext, trainer, uploader, resume: Path | None) -> dict:
    """Train; on a stop or a lost lease, wait (within the grace period) for the last checkpoint's commit
    and exit 143 or 75 (4 for the lease); otherwise wait for it before evaluating.

    Under torchrun the ranks agree first whether this is a stop (a SIGTERM may have reached one
    node only: the others stopped on its vote), then every rank waits until every node leader's
    upload is done: a rank that left earlier would make torchrun's agent kill its node leader
    30 s later, in the middle of the commit.
    """
    from job.train import train

    stop, lease, ranks = ctx.stop, ctx.lease, ctx.ranks
    try:
        train_metrics = train(trainer, resume)
    except BaseException:
        if uploader is not None and (stop.requested or (lease and lease.lost.is_set())):
            _commit_for_stop(ctx, trainer, uploader, together=False)  # a failed step: no collective can be trusted
        raise
    if ranks.any_of(stop.requested or bool(lease and lease.lost.is_set())):
        if not stop.requested:
            stop.request("a stop on another process of the run")  # the same deadline and exit code as the signal's
        _commit_for_stop(ctx, trainer, uploader, together=ranks.world_size > 1)
    ctx.check_stop()
    if uploader is not None:
        stop.checkpoint_committed(False)
        committed = uploader.close(ctx.settings.stop_grace_seconds)
        stop.checkpoint_committed(committed)  # a stop during evaluation or publishing exits 143 only if it was
        if not committed:
            log.warning("last checkpoint not committed; publishing anyway", extra={"event": "checkpoint_pending",
                                                                                    "step": trainer.state.global_step})
    return train_metrics


def _commit_for_stop(ctx: RunContext, trainer, uploader, together: bool) -> None:
    """Wait (within the grace period) for the stop's checkpoint; ``together``: every rank waits for all node leaders."""
    stop = ctx.stop
    stop.checkpoint_committed(False)  # until the upload says otherwise: what a watchdog exit reports
    committed = uploader.close(stop.time_left()) if uploader is not None else True
    if together:
        committed = ctx.ranks.all_of(committed)
    stop.checkpoint_committed(committed)
    log.warning("stopping after checkpoint", extra={"event": "stopped", "committed": committed,
                                                    "step": trainer.state.global_step})


def prepare_work_dir(settings: Settings) -> Path:
    """``<QA_WORK_DIR>/<run_id>``, created and known to be writable before anything is downloaded into it.

    This process is marked alive in the work dir, and what dead processes left there (temporary
    files of any run: rows, teacher logits, downloads, half-staged results) is swept first: a
    SIGKILL runs no cleanup of its own (``job.store.scratch``).
    """
    work = Path(settings.work_dir) / settings.run_id
    _probe_writable(work, f"QA_WORK_DIR={settings.work_dir}", create=True)
    scratch.hold(Path(settings.work_dir))
    gone = scratch.sweep(Path(settings.work_dir))
    if gone:
        log.info("swept what killed processes left in the work dir", extra={
            "event": "work_dir_swept", "files": len(gone), "bytes": sum(size for _, size in gone),
            "paths": [path for path, _ in gone[:20]]})
    return work


def open_run_storage(settings: Settings):
    store = open_storage(settings.run_uri, _policy(settings), settings.s3_endpoint_url, settings.s3_region)
    if isinstance(store, LocalStorage):
        # the run folder appears with the first write, so a run that fails on bad input leaves
        # nothing behind; here only prove that the nearest existing folder on the way takes files
        output = store.root.parent
        while not output.exists() and output != output.parent:
            output = output.parent
        _probe_writable(output, f"QA_OUTPUT_URI={settings.output_uri}")
    else:
        store.check_access()
    return store


def _probe_writable(folder: Path, setting: str, create: bool = False) -> None:
    """Write and remove a file: a full disk is exit 75 (retry elsewhere), anything else exit 2."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageUnavailable(f"{setting}: no space left ({exc.strerror})") from None
        raise ConfigError(f"{setting}: not a writable directory ({exc.strerror})") from None


def _policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(settings.storage_attempts, settings.storage_backoff_seconds, settings.storage_timeout_seconds)


def _restore(store, out: Path, ranks: Ranks) -> Path | None:
    """Rank 0 picks the checkpoint; every node downloads that same one (reads only) before training."""
    from job.store import checkpoints

    if ranks.world_size == 1:
        return checkpoints.restore(store, out)
    step = ranks.from_rank0(lambda: _step(checkpoints.restore(store, out)))  # the others wait while it downloads
    if ranks.rank != 0 and ranks.local_rank == 0 and step is not None:
        checkpoints.restore(store, out, only_step=step)
    ranks.barrier()
    return out / f"checkpoint-{step}" if step is not None else None


def _step(path: Path | None) -> int | None:
    return int(path.name.split("-")[1]) if path else None


def _device_name(cuda: bool) -> str:
    import torch

    return torch.cuda.get_device_name(0) if cuda else "cpu"
