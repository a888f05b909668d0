"""The channel holder's model: fetched for a warm start, and re-scored when the gate needs it.

Re-scoring runs the job's own evaluation (``job.evaluate.evaluate_model``: the same windows,
prediction order, precision, fp32 QA head and n-best decoding as the candidate's), so candidate and
holder differ only in their weights. It builds no Trainer and calls no collective: under torchrun
only rank 0 promotes, after the other ranks have exited, and a Trainer built there would wait for
them in its first collective until the process group timed out.
"""
from __future__ import annotations

import logging
from pathlib import Path

from job.errors import ConfigError
from job.serving import TORCH
from job.store.locations import is_run_id, join
from job.store.models import fetch_model

log = logging.getLogger(__name__)


def fetch_run_model(settings, run_id: str, dest: Path) -> Path:
    """A local copy of ``<QA_OUTPUT_URI>/<run_id>/model`` (only the model's own files, names confined)."""
    if not is_run_id(run_id):
        raise ConfigError(f"invalid run id {str(run_id)[:80]!r} recorded for the channel")
    dest.mkdir(parents=True, exist_ok=True)
    uri = join(settings.output_uri, run_id, "model")
    return fetch_model(uri, dest, settings.s3_endpoint_url, settings.s3_region, what=f"the model of run {run_id} ({uri})",
                       runtime=TORCH)  # re-scored with torch, as it was evaluated: its ONNX exports stay in storage


def predictions(settings, run_id: str, rows: list[dict], stop=None, local_rank: int = 0) -> dict[str, str]:
    """``{id: answer}`` of run ``run_id``'s published model on ``rows``, decoded as evaluation decodes."""
    from job.runtime.device import uses_cuda
    from job.evaluate import evaluate_model
    from job.preprocess import feature_dataset, preprocess_workers
    from job.train import load_model, precision_for

    work = Path(settings.work_dir) / settings.run_id / "holder" / run_id
    model_dir = fetch_run_model(settings, run_id, work / "model")
    tokenizer, model = load_model(str(model_dir), settings.seed, settings.attention)  # as the candidate was scored
    features = feature_dataset("eval", tokenizer, rows, settings.max_length, settings.doc_stride, preprocess_workers(settings))
    device = f"cuda:{local_rank}" if uses_cuda(settings) else "cpu"
    scores, out = evaluate_model(model, tokenizer, features, rows, settings, device=device,
                                 precision=precision_for(settings), stop=stop)
    log.info("holder re-scored on this run's eval set", extra={"event": "holder_rescored", "holder": run_id,
                                                                "examples": len(out), "f1": round(scores["f1"], 3)})
    return out
