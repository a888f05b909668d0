"""Distillation: the student trained on a teacher's start/end distributions beside the gold spans.

``QA_TEACHER_MODEL`` (a hub id, a local model or run folder, an ``s3://.../model`` folder: the
forms ``job.answer --model`` takes) or ``QA_TEACHER_CHANNEL`` (the model a channel's pointer names
on ``QA_OUTPUT_URI``). In the order a run meets them:

- ``resolve_teacher``, before the run's plan and claim: the teacher is fetched, known by content
  (part of the fingerprint) and checked: a missing teacher, one that is not a QA model, one with
  fewer positions than ``QA_MAX_LENGTH`` or another vocabulary than the student's (the windows
  would differ) is exit 2, before anything is tokenized or trained. A channel's run is read by
  rank 0 for every rank and pinned in run.json: a retry learns from the same run, wherever the
  channel has moved since.
- ``prepare``, once the features exist: the teacher scores every training window once, not every
  epoch (length-ordered batches, ``job.evaluate.predict_logits``, the evaluation's own loop; under
  torchrun every process of a node scores its share, on its own GPU, into the node's one array),
  and only each window's real tokens are kept, in fp16, in one ``(tokens, 2)`` array beside the
  features, under the verified-cache rule (``job.store.feature_cache``: a manifest with sizes and
  sha256, written last, keyed by the feature key and the teacher's identity). A resumed run on
  a fresh machine downloads it. The teacher is freed before the student trains.
- ``Distillation``: the Trainer's collator and ``compute_loss_func`` (no Trainer subclass). Each
  training window carries its index (``WINDOW``); the collator reads that window's logits from
  the memory-mapped array (under torchrun each rank reads only its own windows) and hands them,
  with the gold spans and the mask of real tokens, to ``job.squad.distillation``.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job.errors import ConfigError, JobError
from job.runtime.ranks import Ranks
from job.serving import TORCH
from job.store import feature_cache
from job.store.files import reserved_array
from job.store.locations import is_s3, join
from job.store.models import check_json_files, fetch_model, fetch_model_cached, model_identity
from job.store.scratch import temp_path

log = logging.getLogger(__name__)
WINDOW = "teacher_window"  # the column that takes a training window to its teacher logits
LOGITS = "logits.npy"
CACHE = feature_cache.Layout((LOGITS,), "teacher.json", "teacher logits")
CACHE_VERSION = "1"  # bump when the array's layout changes
SCORE_WINDOWS = 4096  # windows scored per call: the fp32 logits of a call are held at once, not the split's
_FP16_MAX = 65000.0  # a logit beyond fp16's range would be stored as inf


@dataclass(frozen=True)
class Teacher:
    name: str  # as the settings name it (messages, manifest, model card)
    path: str  # what from_pretrained loads: a local folder or a hub id
    identity: str  # by content: sha256 of the files, or hub id @ commit
    run: str | None = None  # the run a QA_TEACHER_CHANNEL named: pinned in run.json for retries


def resolve_teacher(settings, ranks: Ranks = Ranks(), pinned_run: str | None = None) -> Teacher:
    """The teacher, fetched, known by content and checked against the student; ConfigError (exit 2) if unusable.

    ``pinned_run``: the channel's run this run's first attempt learned from (``publish.pinned_teacher``).
    """
    work = Path(settings.work_dir) / settings.run_id
    run_id = None
    if settings.teacher_channel:
        setting = f"QA_TEACHER_CHANNEL={settings.teacher_channel}"
        # one pointer read for all ranks: a channel moving between two ranks' reads would give them two teachers
        run_id = pinned_run or ranks.from_rank0(lambda: _channel_run(settings, setting))
        uri, name = join(settings.output_uri, run_id, "model"), f"channel {settings.teacher_channel} (run {run_id})"
        if pinned_run:
            setting += f" (run {run_id}, pinned by this run's first attempt)"
    else:
        setting = f"QA_TEACHER_MODEL={settings.teacher_model}"
        uri = name = settings.teacher_model
    looks_local = uri.startswith(("/", ".", "~")) or uri.count("/") > 1 or Path(uri).expanduser().is_dir()
    if is_s3(uri) or looks_local:
        try:
            if is_s3(uri):  # downloaded once per node (the others find it), kept for every later attempt of the run
                # the torch weights only: a published teacher's ONNX exports stay in storage
                path = str(ranks.leaders_first(lambda: fetch_model_cached(
                    uri, work / "teacher-models", settings.s3_endpoint_url, settings.s3_region, what=setting,
                    runtime=TORCH)))
            else:
                path = str(fetch_model(uri, work, settings.s3_endpoint_url, settings.s3_region, what=setting,
                                       runtime=TORCH))
        except ConfigError as exc:
            if not pinned_run:
                raise
            raise ConfigError(f"{exc}; retention or a person removed it since: start over with a new QA_RUN_ID") from None
        identity = model_identity(path, setting.split("=")[0])
    else:  # a hub id
        path, identity = uri, model_identity(uri, "QA_TEACHER_MODEL")
    check_teacher(path, setting, settings.model_name, settings.max_length)
    log.info("distilling from a teacher", extra={"event": "teacher", "teacher": name, "identity": identity,
                                                 "alpha": settings.distill_alpha,
                                                 "temperature": settings.distill_temperature,
                                                 **({"run": run_id, "pinned": bool(pinned_run)} if run_id else {})})
    return Teacher(name, path, identity, run_id)


def _channel_run(settings, setting: str) -> str:
    from job.channels.channel import UnknownChannel

    try:
        return _teacher_channel(settings).require().pointer["run_id"]
    except UnknownChannel:
        raise ConfigError(f"{setting}: no such channel under QA_OUTPUT_URI={settings.output_uri}") from None


def hold_teacher(settings, teacher_run: str) -> None:
    """On rank 0, before the run folder pins ``teacher_run``: the teacher channel's retention keeps that model
    until this run is complete (a retry learns from it again, however far the channel has moved)."""
    _teacher_channel(settings).record_student(settings.run_id, teacher_run)


def release_teacher(settings) -> None:
    """This run is complete: its pinned teacher is the teacher channel's retention's business again."""
    _teacher_channel(settings).forget_student(settings.run_id)


def _teacher_channel(settings):
    from job.channels.channel import Channel
    from job.store.storage import RetryPolicy, open_storage

    policy = RetryPolicy(settings.storage_attempts, settings.storage_backoff_seconds, settings.storage_timeout_seconds)
    root = open_storage(settings.output_uri, policy, settings.s3_endpoint_url, settings.s3_region)
    return Channel(root, settings.teacher_channel)


def check_teacher(path: str, setting: str, student: str, max_length: int) -> None:
    """A QA model, with room for ``max_length`` positions and the student's vocabulary; else ConfigError."""
    from transformers import AutoConfig, AutoTokenizer

    check_json_files(path, setting)
    try:
        config = AutoConfig.from_pretrained(path)
        vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{setting}: cannot load ({(str(exc).splitlines() or ['?'])[0][:200]})") from None
    kinds = list(getattr(config, "architectures", None) or [])
    if not any(kind.endswith("ForQuestionAnswering") for kind in kinds):
        raise ConfigError(f"{setting}: not a question-answering model ({', '.join(kinds) or 'no architecture'} in its "
                          "config.json); the teacher must be a model fine-tuned for extractive QA")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit < max_length:
        raise ConfigError(f"{setting}: has {limit} positions, fewer than QA_MAX_LENGTH={max_length}; "
                          f"use QA_MAX_LENGTH of at most {limit} or another teacher")
    try:
        student_vocab = AutoTokenizer.from_pretrained(student).get_vocab()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"QA_MODEL_NAME={student}: cannot load its tokenizer "
                          f"({(str(exc).splitlines() or ['?'])[0][:200]})") from None
    if vocab != student_vocab:
        raise ConfigError(f"{setting}: its tokenizer's vocabulary differs from QA_MODEL_NAME={student}'s "
                          f"({len(vocab)} against {len(student_vocab)} tokens); teacher and student must share one, "
                          "or their windows differ")


def cache_key(feature_key: str, teacher_identity: str) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, feature_key, teacher_identity]).encode()).hexdigest()[:24]


def prepare(settings, teacher: Teacher, features, store, ranks: Ranks = Ranks(), stop=None) -> "Distillation":
    """The teacher's logits of every training window, from the local or remote cache or scored now and cached.

    Every rank calls it. The first process of each node looks for the cache; where it has none,
    every process of that node scores its share of the windows (its GPU) into the node's one
    array, and the first process then verifies and caches it (rank 0 uploads it). The others wait
    in ``job.runtime.ranks``' own group, not the training's: however long the pass takes.
    """
    key = cache_key(features.cache_key, teacher.identity)
    local = Path(settings.work_dir) / settings.run_id / "teacher" / key
    remote = f"cache/teacher-{key}/"
    offsets = window_offsets(features.train)
    started, hit, partial, problem = time.monotonic(), None, None, None
    if ranks.is_node_leader:
        try:
            if feature_cache.verified(local, CACHE) and _fits(local, offsets):
                hit = "local"
            elif store is not None and feature_cache.download(store, remote, local, CACHE) and _fits(local, offsets):
                hit = "remote"
            else:
                hit = "miss"
                local.mkdir(parents=True, exist_ok=True)
                (local / CACHE.manifest).unlink(missing_ok=True)
                partial = temp_path(local / LOGITS)  # the leader's own name: swept if the node dies mid-pass
                reserve_logits(partial, offsets)
        except (JobError, OSError) as exc:  # raised on every rank below: the others would wait for this one
            problem = exc
            if partial is not None:
                partial.unlink(missing_ok=True)  # half made (a full disk): nothing of it stays
    # what this node's first process found, and the array its ranks score into
    hit, partial, failed = ranks.gather((hit, partial, problem is not None))[ranks.rank - ranks.local_rank]
    if ranks.any_of(failed):
        raise problem or JobError("the first process of a node failed before the teacher's pass (see its log)")
    share = range(0)
    if hit == "miss":
        share = node_share(offsets, ranks.local_rank, ranks.local_world_size)
        try:
            score(settings, teacher, features.train, offsets, partial, share, ranks.local_rank, stop)
        except JobError as exc:
            problem = exc
    if not ranks.all_of(problem is None):  # every share written, on every node (or one failed: all stop)
        if ranks.is_node_leader and partial is not None:
            partial.unlink(missing_ok=True)
        raise problem or JobError("another process failed while scoring the teacher's logits (see its log)")
    if hit == "miss" and ranks.is_node_leader:
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, local / LOGITS)
        feature_cache.write_manifest(local, CACHE)
        if store is not None and ranks.is_writer:
            feature_cache.upload(store, local, remote, CACHE)
    ranks.barrier()  # the node's cache is whole before anyone maps it
    log.info("teacher logits ready", extra={"event": "teacher_logits", "cache": hit, "cache_key": key,
                                             "windows": len(offsets) - 1, "tokens": int(offsets[-1]),
                                             "scored": [share.start, share.stop] if hit == "miss" else None,
                                             "seconds": round(time.monotonic() - started, 2)})
    return Distillation(local / LOGITS, offsets, settings.distill_alpha, settings.distill_temperature, hit)


def reserve_logits(path: Path, offsets: np.ndarray) -> None:
    """The node's logits array at ``path``, fp16, every block reserved on the disk before the teacher scores: a
    store into a page a full disk has no room for is a bus error (exit 135, no error line), this is exit 75. The
    map is dropped at once: each rank of the node maps it to write its share in place."""
    reserved_array(path, (int(offsets[-1]), 2), np.float16)


def node_share(offsets: np.ndarray, local_rank: int, local_world_size: int) -> range:
    """The windows ``local_rank`` of ``local_world_size`` scores: consecutive, about as many tokens as each other's."""
    bounds = np.searchsorted(offsets, np.linspace(0, offsets[-1], local_world_size + 1))
    bounds[0], bounds[-1] = 0, len(offsets) - 1
    return range(int(bounds[local_rank]), int(bounds[local_rank + 1]))


def score(settings, teacher: Teacher, train, offsets: np.ndarray, path: Path, windows: range | None = None,
          local_rank: int = 0, stop=None) -> None:
    """Score ``windows`` (default: all) with the teacher and write their real tokens' logits, fp16, into the array
    at ``path`` (created beforehand, shaped for every window); then free the teacher."""
    import torch

    from job.runtime.device import uses_cuda
    from job.evaluate import predict_logits
    from job.train import load_model, precision_for

    windows = range(len(offsets) - 1) if windows is None else windows
    if not len(windows):
        return
    tokenizer, model = load_model(teacher.path, settings.seed, settings.attention)  # fp32 weights, fp32 QA head
    inputs = _model_inputs(train, tokenizer)
    device = f"cuda:{local_rank}" if uses_cuda(settings) else "cpu"
    try:
        out = np.load(path, mmap_mode="r+")
        for begin in range(windows.start, windows.stop, SCORE_WINDOWS):
            part = inputs.select(range(begin, min(begin + SCORE_WINDOWS, windows.stop)))
            start, end = predict_logits(model, tokenizer, part, settings.eval_batch_size, device,
                                        precision_for(settings), stop)
            lengths = np.diff(offsets[begin:begin + len(part) + 1])
            real = np.arange(start.shape[1])[None, :] < lengths[:, None]  # row by row: each window's real tokens
            lo, hi = offsets[begin], offsets[begin + len(part)]
            out[lo:hi, 0] = np.clip(start[real], -_FP16_MAX, _FP16_MAX)
            out[lo:hi, 1] = np.clip(end[real], -_FP16_MAX, _FP16_MAX)
        out.flush()
        del out
    finally:
        del model  # peak memory is one model: the teacher is gone before the student trains
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _model_inputs(train, tokenizer):
    """The windows' model inputs as the teacher takes them; segment ids derived when only the teacher has them
    (a BERT teacher for a DistilBERT student: 0 up to the first [SEP], then 1, as BERT's tokenizer sets them)."""
    names = [c for c in train.column_names if c in ("input_ids", "attention_mask", "token_type_ids")]
    inputs = train.select_columns(names)
    if "token_type_ids" in tokenizer.model_input_names and "token_type_ids" not in names:
        sep = tokenizer.sep_token_id

        def segments(batch):
            return {"token_type_ids": [_segments(ids, sep) for ids in batch["input_ids"]]}

        inputs = inputs.map(segments, batched=True, keep_in_memory=True)
    return inputs


def _segments(ids: list[int], sep: int) -> list[int]:
    first = ids.index(sep) + 1 if sep in ids else len(ids)
    return [0] * first + [1] * (len(ids) - first)


def window_offsets(train) -> np.ndarray:
    """Where each training window's tokens begin in the logits array; the last entry is the total."""
    from job.evaluate import window_lengths

    return np.concatenate([[0], np.cumsum(window_lengths(train), dtype=np.int64)])


def _fits(local: Path, offsets: np.ndarray) -> bool:
    """A verified array of these windows' size (a cache of other windows under this key would misalign)."""
    try:
        logits = np.load(local / LOGITS, mmap_mode="r")
        ok = logits.dtype == np.float16 and logits.shape == (int(offsets[-1]), 2)
    except (OSError, ValueError):
        ok = False
    if not ok:
        log.warning("teacher logits do not fit the windows; scoring again", extra={"event": "features_cache_invalid",
                                                                                   "cache": CACHE.what})
    return ok


def indexed(train):
    """The training windows with their index (``WINDOW``): what takes a batch's window to its logits."""
    return train.add_column(WINDOW, np.arange(len(train), dtype=np.int64))


class Distillation:
    """What the Trainer needs to distil: a collator that adds each window's teacher logits, and the loss."""

    def __init__(self, path: Path, offsets: np.ndarray, alpha: float, temperature: float, cache: str = "miss"):
        self.path, self.offsets, self.alpha, self.temperature, self.cache = path, offsets, alpha, temperature, cache
        self.logits = np.load(path, mmap_mode="r")

    def collator(self, pad):
        return _Collate(pad, self.logits, self.offsets)

    def compute_loss(self, outputs, labels, num_items_in_batch=None):
        from job.squad.distillation import distillation_loss  # torch: imported where training has begun

        return distillation_loss(outputs.start_logits, outputs.end_logits, labels["start_positions"],
                                 labels["end_positions"], labels["teacher"][..., 0], labels["teacher"][..., 1],
                                 labels["mask"], self.alpha, self.temperature)


class _Collate:
    """The job's padding collator, then the gold spans, the mask and the teacher's logits moved into ``labels``
    (the one key the Trainer hands ``compute_loss_func``); the model then computes no loss of its own.
    The batch is a plain dict of tensors and one dict of tensors: pinned and copied whole, non-blocking.
    Evaluation windows (no index, no labels) are only padded, as without a teacher."""

    def __init__(self, pad, logits, offsets):
        self.pad, self.logits, self.offsets = pad, logits, offsets

    def __call__(self, windows: list[dict]):
        import torch

        if not windows or WINDOW not in windows[0]:
            return self.pad(windows)
        index = [w.pop(WINDOW) for w in windows]
        batch = self.pad(windows)
        width = batch["input_ids"].shape[1]
        teacher = np.zeros((len(index), width, 2), dtype=np.float32)  # padding: masked out by the loss
        for row, i in enumerate(index):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            teacher[row, :hi - lo] = self.logits[lo:hi]
        batch["labels"] = {"start_positions": batch.pop("start_positions"), "end_positions": batch.pop("end_positions"),
                           "mask": batch["attention_mask"], "teacher": torch.from_numpy(teacher)}
        # a plain dict, not the padder's BatchEncoding: accelerate moves a mapping's tensors to the GPU nested
        # ones included, each non-blocking, where BatchEncoding.to skips the labels dict and the Trainer then
        # copied its four tensors with blocking copies, every step
        return dict(batch)
