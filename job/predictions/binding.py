"""``predict.json``: what an output folder's predictions are made of, fixed by the first attempt of any shard.

Chunks are committed one by one, by different pods and attempts; they only make one file if every
one of them was made with the same model, rows, windows and decoding. The first shard to start
writes ``predict.json`` with a conditional create: the request (every setting that shapes a
line), the job's version, the model it resolved (a channel's run, pinned: a channel that moves
while the shards run changes nothing), the model's files by content, the decoding it resolved
and the input by content (a folder or prefix's files pinned, as a training run pins them). Every
later attempt and every other shard reads it and follows it, or stops: other settings or
another job version are exit 2 naming what differs, a model whose files changed exit 2, input
that changed exit 3.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from job import safe_json
from job.answer import channel_model
from job.data import Split, load_split
from job.errors import ConfigError, DataError
from job.observe.redaction import artifact_json
from job.predictions.settings import Decoding, PredictSettings, decoding, env_name
from job.serving import read_serving
from job.settings import Settings
from job.store.fingerprint import job_version
from job.store.models import fetch_model, model_identity
from job.store.storage import NotFound, PreconditionFailed, RetryPolicy

log = logging.getLogger(__name__)
KEY = "predict.json"
# what shapes the output's lines; the rest (where scratch is, retries, grace, logs, the device) does not
REQUEST = ("predict_model", "predict_channel", "predict_input_uri", "predict_split", "dataset", "dataset_config",
           "predict_runtime", "predict_chunk_rows", "predict_shards", "eval_batch_size", "squad_v2", "max_length",
           "doc_stride", "n_best_size", "max_answer_length", "null_score_diff_threshold")


@dataclass(frozen=True)
class Bound:
    """What this attempt predicts with: the model's local folder, the decoding, the rows, the record that fixed them."""

    model_dir: Path
    decoding: Decoding
    split: Split
    record: dict


def bind(settings: PredictSettings, root, work: Path, policy: RetryPolicy, stop_check) -> Bound:
    """Follow ``predict.json``, or write it (a conditional create: one writer among racing shards wins, the
    others then follow the winner's)."""
    for _ in range(2):
        record = read(root)
        if record is not None:
            check_request(settings, record, root.uri)
        bound = _resolve(settings, record, work, policy, stop_check)
        if record is None:
            try:
                root.put_bytes(KEY, artifact_json(bound.record, indent=1), if_none_match=True)
            except PreconditionFailed:
                continue  # another shard wrote it first: follow its record (its model, its input files)
        log.info("predictions bound to their model and input", extra={
            "event": "bound", "pinned_by": "an earlier attempt" if record is not None else "this attempt",
            **_summary(bound.record)})
        return bound
    raise ConfigError(f"{root.uri}/{KEY}: changed while this shard read it; rerun")


def read(root) -> dict | None:
    try:
        raw, _ = root.get_bytes(KEY)
    except NotFound:
        return None
    try:
        record = safe_json.loads(raw)
        if isinstance(record, dict) and isinstance(record.get("request"), dict) and isinstance(record.get("model"), dict) \
                and isinstance(record["model"].get("uri"), str) and isinstance(record.get("input"), dict):
            return record
    except (ValueError, UnicodeDecodeError):
        pass
    raise DataError(f"{root.uri}/{KEY} is not what job.predict writes; delete the output folder to start over")


def request(settings: PredictSettings) -> dict:
    return {name: getattr(settings, name) for name in REQUEST}


def check_request(settings: PredictSettings, record: dict, where: str) -> None:
    mine, theirs = request(settings), record["request"]
    differ = [env_name(k) for k in REQUEST if mine.get(k) != theirs.get(k)]
    if record.get("job_version") != job_version():
        differ.append(f"the job's version ({record.get('job_version')} there, {job_version()} here)")
    if differ:
        raise ConfigError(f"QA_PREDICT_OUTPUT_URI={where} holds predictions started with other settings (differs in: "
                          f"{', '.join(differ[:8])}); use another output, or delete it to start over")


def _resolve(settings: PredictSettings, record: dict | None, work: Path, policy: RetryPolicy, stop_check) -> Bound:
    """The model fetched, its decoding and the rows read, as ``record`` pins them, or as a first attempt finds them."""
    if record is not None:
        model_uri, run_id = record["model"]["uri"], record["model"].get("run_id")
    elif settings.predict_channel:
        model_uri, run_id = channel_model(settings.predict_model, settings.predict_channel, settings.s3_endpoint_url,
                                          settings.s3_region)
    else:
        model_uri, run_id = settings.predict_model, None
    local = work / "model"
    shutil.rmtree(local, ignore_errors=True)  # an earlier attempt's copy may be another model's (a channel that moved)
    what = f"QA_PREDICT_MODEL={settings.predict_model}" + (f" (channel {settings.predict_channel}: {model_uri})"
                                                           if settings.predict_channel else "")
    model_dir = fetch_model(model_uri, local, settings.s3_endpoint_url, settings.s3_region, what=what,
                            runtime=settings.predict_runtime)  # only the runtime's weights
    identity = model_identity(str(model_dir), "QA_PREDICT_MODEL")
    if record is not None and record["model"].get("identity") != identity:
        raise ConfigError(f"{what}: the model's files changed since these predictions started (sha256 differs); "
                          "put it back, or use another output")
    chosen = decoding(settings, read_serving(model_dir)["decoding"])  # what the model was evaluated with
    stop_check()
    split = read_input(settings, chosen.version_2, work, policy, (record or {}).get("input", {}).get("pin"))
    if record is not None and (record["input"].get("sha256"), record["input"].get("rows")) != (split.sha256, split.examples):
        raise DataError(f"{split.source}: the input changed since these predictions started (sha256 or row count "
                        "differs); restore it, or use another output")
    made = {"request": request(settings), "job_version": job_version(),
            "model": {"uri": model_uri, "run_id": run_id, "identity": identity},
            "decoding": asdict(chosen), "input": {"source": split.source, "sha256": split.sha256, "rows": split.examples,
                                                  "pin": split.pin},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return Bound(model_dir, chosen, split, record or made)


def read_input(settings: PredictSettings, version_2: bool, work: Path, policy: RetryPolicy, pin: dict | None) -> Split:
    """The questions, read and checked as the job reads its eval split (its formats, sources and row checks);
    gold answers optional. ``pin``: a folder or prefix's files as the first attempt read them."""
    # the job's reader, given the job's settings for one split: the same code reads training data
    as_eval = Settings(eval_uri=settings.predict_input_uri, dataset=settings.dataset or "squad",
                       dataset_config=settings.dataset_config, eval_split=settings.predict_split, work_dir=str(work),
                       run_id="input", squad_v2=version_2, s3_endpoint_url=settings.s3_endpoint_url,
                       s3_region=settings.s3_region)
    return load_split("eval", as_eval, policy, {"eval": pin} if pin else None, answers_optional=True)


def _summary(record: dict) -> dict:
    return {"model": record["model"]["uri"], "run_id": record["model"]["run_id"], "input": record["input"]["source"],
            "rows": record["input"]["rows"], "decoding": record["decoding"]}
