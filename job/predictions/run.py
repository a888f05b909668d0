"""Batch predictions, stage by stage: lease -> bind -> predict this shard's chunks -> merge when every shard is done.

Each pod of the Indexed Job runs this for its shard. What is committed stays committed: a rerun
(after a SIGTERM, a kill, a lost node) finds the shard's markers and predicts the chunks that have
none, from the first uncommitted one on, with the model, rows and decoding ``predict.json`` fixed.
The shard that completes last merges every shard's chunks into one file (if two complete at
once, both do, and write the same bytes).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from job.errors import Preempted
from job.predictions import RERUN, binding, output
from job.predictions.chunks import lines, new_token
from job.predictions.scoring import open_scorer, predict_chunk
from job.predictions.settings import PredictSettings
from job.rows import chunk
from job.store.lease import Lease
from job.store.locations import join
from job.store.storage import RetryPolicy, open_storage

log = logging.getLogger(__name__)


def run(settings: PredictSettings, stop) -> None:
    stop = _Stop(stop) if stop is not None else None  # predictions' own words when a stop ends a lease wait
    policy = RetryPolicy(settings.storage_attempts, settings.storage_backoff_seconds, settings.storage_timeout_seconds)
    root = _storage(settings.predict_output_uri, settings, policy, check=True)
    if _already_complete(settings, root):
        return
    work = Path(settings.work_dir) / f"predict-{settings.shard_name}"  # this shard's scratch: model, input rows
    work.mkdir(parents=True, exist_ok=True)
    with _shard_lease(settings, root, policy, stop, work) as lease:
        bound = binding.bind(settings, lease.guard(root), work, policy, lambda: check_stop(stop))
        out = output.ShardOutput(lease.guard(lease.store), bound.split.examples, settings.shard, settings.predict_shards,
                                 settings.predict_chunk_rows, new_token(lease.token))
        if not out.is_complete():
            predict_shard(settings, bound, out, stop)
        _merge_if_last(settings, root, lease.guard(root), bound, policy, stop)


def _already_complete(settings: PredictSettings, root) -> bool:
    record = binding.read(root)
    if record is not None:  # other settings are refused even when the predictions are complete: they are not these
        binding.check_request(settings, record, root.uri)
    if output.is_complete(root):
        log.info("predictions already complete, nothing to do", extra={"event": "already_complete", "output": root.uri})
        return True
    return False


def _shard_lease(settings: PredictSettings, root, policy: RetryPolicy, stop, work: Path) -> Lease:
    """One pod per shard: the run lease of ``job.store.lease``, on the shard's folder."""
    shard = join(settings.predict_output_uri, output.shard_prefix(settings.shard, settings.predict_shards))
    return Lease(_storage(shard, settings, policy), settings.shard_name, settings.lease_seconds, stop, lock_dir=work,
                 label=f"shard {settings.shard} of {settings.predict_shards} of {root.uri}",
                 advice="wait for it to finish (two pods of one shard must not write its chunks)")


def _merge_if_last(settings: PredictSettings, root, fenced_root, bound, policy: RetryPolicy, stop) -> None:
    """Every shard complete: merge them all (and score them); else leave it to the shard that completes last."""
    done = output.shards_complete(root)
    if done < settings.predict_shards:
        log.info("shard done; the last shard to finish merges", extra={
            "event": "shard_done", "shard": settings.shard, "shards_complete": done, "shards": settings.predict_shards})
        return

    def open_shard(i: int):
        return _storage(join(settings.predict_output_uri, output.shard_prefix(i, settings.predict_shards)), settings, policy)

    record = output.merge(fenced_root, open_shard, bound.split.rows, bound.split.examples, settings.predict_shards,
                          settings.predict_chunk_rows, bound.decoding.version_2, lambda: check_stop(stop))
    log.info("predictions merged", extra={"event": "merged", "uri": join(root.uri, output.MERGED),
                                          **{k: v for k, v in record.items() if k != "metrics"}})
    if record["metrics"] is not None:
        log.info("scores of the predictions with gold answers", extra={
            "event": "scores", **{k: round(v, 3) if isinstance(v, float) else v for k, v in record["metrics"].items()}})


def predict_shard(settings: PredictSettings, bound, out: output.ShardOutput, stop) -> None:
    """Every chunk of this shard without a marker, in order: predicted, written whole, committed."""
    committed = out.committed()
    todo = [k for k in range(len(out.plan)) if k not in committed]
    first = out.plan[0].start if out.plan else None
    log.info("shard plan", extra={"event": "plan", "shard": settings.shard, "shards": settings.predict_shards,
                                  "rows": sum(len(r) for r in out.plan), "first_row": first, "chunks": len(out.plan),
                                  "committed": len(committed), "resume_from": todo[0] if todo else None})
    if todo:
        scorer = open_scorer(settings, bound.model_dir)
        for index in todo:
            check_stop(stop)
            began = time.monotonic()
            part = out.plan[index]
            predictions, windows = predict_chunk(scorer, chunk(bound.split.rows, part.start, len(part)), bound.decoding,
                                                 settings.eval_batch_size, stop)
            data = lines(predictions)
            key = out.put_chunk(index, data)  # whole, then committed: a chunk counts only with its marker
            out.commit_chunk(index, key, data)
            seconds = time.monotonic() - began
            log.info("chunk committed", extra={"event": "chunk_committed", "chunk": index, "of": len(out.plan),
                                               "first_row": part.start, "rows": len(part), "windows": windows,
                                               "seconds": round(seconds, 3),
                                               "windows_per_second": round(windows / seconds, 1) if seconds else None})
    out.complete()


def check_stop(stop) -> None:
    """A stop request ends the shard here: committed chunks stay, the chunk in progress is predicted again."""
    if stop is not None and stop.requested:
        raise Preempted(f"stopped by {stop.signal_name}; {RERUN}")


def _storage(uri: str, settings: PredictSettings, policy: RetryPolicy, check: bool = False):
    store = open_storage(uri, policy, settings.s3_endpoint_url, settings.s3_region)
    if check and hasattr(store, "check_access"):
        store.check_access()  # wrong credentials or a missing bucket: exit 2 now, not after the model is loaded
    return store


class _Stop:
    """The stop request, whose ``check()`` (between batches, in a lease wait) says how predictions resume."""

    def __init__(self, stop):
        self.stop = stop

    def __getattr__(self, name):  # requested, signal_name, wait, time_left: the request's own
        return getattr(self.stop, name)

    def check(self) -> None:
        check_stop(self.stop)
