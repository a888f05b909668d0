"""Stage the results locally, then publish them under ``<output>/<run_id>/`` with a completion marker last.

Staging first means a publish that cannot reach storage loses nothing: the job exits 75 and a
rerun on the same work directory uploads the staged files without training again.
"""
from __future__ import annotations

import logging
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

from job import safe_json
from job.errors import ConfigError
from job.observe import curves, model_card
from job.observe.redaction import artifact_json
from job.store.fingerprint import differences, digest, eval_fingerprint, recipe
from job.store.locations import is_run_id
from job.store.files import writing_folder
from job.store.storage import NotFound, PreconditionFailed, Storage, atomic_write

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
RUN_RECORD = "run.json"  # what started this run folder: a rerun under the same run id must match it
DATA_FILES = "data_files"  # run.json's key for the files each split read from a prefix (pinned for retries)
TEACHER_RUN = "teacher_run"  # run.json's key for the run a QA_TEACHER_CHANNEL named (pinned for retries)
STAGED = ".staged"  # local only: the staging folder is whole
BINDING = ".binding.json"  # local only: which inputs and which destination the staged results belong to
_PACKAGES = ("qa-finetune", "torch", "transformers", "datasets", "accelerate", "tokenizers", "boto3", "pydantic", "pydantic-settings")


def staging_dir(settings) -> Path:
    return Path(settings.work_dir) / settings.run_id / "publish"


def is_complete(store: Storage) -> bool:
    try:
        store.get_bytes(COMPLETE)
        return True
    except NotFound:
        return False


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def claim_run_folder(store: Storage, settings, inputs: dict, data_files: dict | None = None,
                     teacher_run: str | None = None) -> None:
    """Record what this run is; refuse to continue a run folder that another configuration started.

    Checkpoints under ``<output>/<run_id>/`` are resumed by step count: resuming them with other
    data or another learning rate would silently train a model nobody asked for. ``data_files``
    (``job.data.Split.pin`` of each split read from a prefix) and ``teacher_run`` (the run a
    teacher channel named) are kept as the first attempt wrote them: a retry reads exactly those
    files and learns from that teacher (``pinned_data``, ``pinned_teacher``), wherever the prefix
    or the channel has moved since.
    """
    # recipe and eval fingerprint: what a channel compares (skip-if-unchanged, re-scoring the holder)
    record = {"run_id": settings.run_id, "fingerprint": digest(inputs), "recipe": recipe(inputs),
              "eval_fingerprint": eval_fingerprint(inputs), "inputs": inputs,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if data_files:
        record[DATA_FILES] = data_files
    if teacher_run:
        record[TEACHER_RUN] = teacher_run
    try:
        store.put_bytes(RUN_RECORD, artifact_json(record, indent=1), if_none_match=True)
        return
    except PreconditionFailed:
        pass
    raw, _ = store.get_bytes(RUN_RECORD)
    try:
        earlier = safe_json.loads(raw)
        same = earlier["fingerprint"] == record["fingerprint"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{store.uri}/{RUN_RECORD} is not a run record; delete {store.uri} to start the run over") from None
    if not same:
        changed = differences(earlier.get("inputs", {}), record["inputs"]) if isinstance(earlier.get("inputs"), dict) else []
        raise ConfigError(f"QA_RUN_ID={settings.run_id}: {store.uri} was started with other settings or data "
                          f"(differs in: {', '.join(changed[:8]) or 'unknown'}); use a new QA_RUN_ID, "
                          "or delete that folder to start over")


def pinned_data(record: dict) -> dict | None:
    """``{split: pin}`` a run record (``run_record``) keeps from its first attempt (``job.store.listing.pinned``
    checks each), or None."""
    pins = record.get(DATA_FILES)
    return pins if isinstance(pins, dict) else None


def pinned_teacher(record: dict) -> str | None:
    """The teacher channel's run a run record keeps from its first attempt, or None (none, or not a run id)."""
    run = record.get(TEACHER_RUN)
    return run if is_run_id(run) else None


def run_record(store: Storage) -> dict:
    """run.json as a dict; empty when there is none yet or it is not a JSON object (the claim names that)."""
    try:
        record = safe_json.loads(store.get_bytes(RUN_RECORD)[0])
    except (NotFound, ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def stage(settings, trainer, tokenizer, scores: dict, predictions: dict, train_metrics: dict, context: dict,
          inputs: dict) -> Path:
    """Write model, tokenizer, model card, metrics, predictions and manifest to the staging folder."""
    root = staging_dir(settings)
    shutil.rmtree(root, ignore_errors=True)
    # filled under a temporary name of this process's and renamed whole: a kill leaves no half-staged
    # folder behind (the next start in the work dir sweeps the temporary one, job.store.scratch)
    with writing_folder(root) as folder:
        _stage_into(folder, settings, trainer, tokenizer, scores, predictions, train_metrics, context, inputs)
    return root


def _stage_into(root: Path, settings, trainer, tokenizer, scores: dict, predictions: dict, train_metrics: dict,
                context: dict, inputs: dict) -> None:
    from job.observe import periodic_eval, tracking  # the Trainer's modules: only once there is something to stage

    model_dir = root / "model"
    trainer.save_model(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    metrics = {
        **scores,
        "eval_examples": len(predictions),
        "train_runtime": train_metrics.get("train_runtime"),
        "train_samples_per_second": train_metrics.get("train_samples_per_second"),
        "train_loss": train_metrics.get("train_loss"),
        "global_step": trainer.state.global_step,
    }
    history = trainer.state.log_history
    points = periodic_eval.eval_points(history)
    if points:
        examples = settings.eval_samples_during_training or len(predictions)
        metrics["eval_during_training"] = {"examples": min(examples, len(predictions)), "points": points}
    manifest = {"run_id": settings.run_id, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "settings": settings.public_dict(), "versions": versions(), **context}
    curves.plot_curves(history, model_dir / curves.FILENAME, f"{settings.run_id}: fine-tuning for extractive QA",
                       final=scores, eval_examples=_subset(metrics, len(predictions)))
    model_card.write_card(model_dir / "README.md", settings, metrics, context)
    if "tensorboard" in settings.trackers:
        tracking.stage_events(tracking.logging_dir(settings), root / "logs")
    # every JSON artifact through the one encoder: a credential in a data key or a teacher's path is masked
    atomic_write(root / "metrics.json", artifact_json(metrics, indent=2))
    atomic_write(root / "predictions.json", artifact_json(predictions, indent=1, ensure_ascii=False))
    atomic_write(root / "manifest.json", artifact_json(manifest, indent=2))
    atomic_write(root / BINDING, artifact_json(_binding(settings, inputs)))
    atomic_write(root / STAGED, b"")


def _subset(metrics: dict, total: int) -> int | None:
    """How many eval examples the evaluations during training used, when fewer than all."""
    examples = metrics.get("eval_during_training", {}).get("examples")
    return examples if examples and examples < total else None


def _binding(settings, inputs: dict) -> dict:
    return {"fingerprint": digest(inputs), "run_uri": settings.run_uri}


def staged_results(settings, inputs: dict) -> Path | None:
    """The results an earlier attempt of this very run staged in this work dir, or None.

    Staged results count only for the inputs and the destination they were produced for: a run
    folder deleted and rerun with another learning rate, other data or another QA_OUTPUT_URI
    trains afresh, and the stale staging is removed. Under torchrun only rank 0 stages, so only
    rank 0 asks (``job.runtime.ranks.Ranks.from_rank0``): another node's work dir never holds them.
    """
    root = staging_dir(settings)
    if not (root / STAGED).is_file():
        return None
    try:
        binding = safe_json.loads((root / BINDING).read_text())
    except (OSError, ValueError):
        binding = None
    if binding != _binding(settings, inputs):
        log.warning("discarding results staged for another run", extra={"event": "staged_discarded", "path": str(root)})
        shutil.rmtree(root, ignore_errors=True)
        return None
    return root


def publish_staged(root: Path, store: Storage, stop) -> None:
    """Publish what ``staged_results`` found: an earlier attempt trained and evaluated; only its upload failed."""
    log.info("publishing results staged by an earlier attempt", extra={"event": "publish_staged"})
    publish(root, store, stop)


def publish(root: Path, store: Storage, stop=None) -> None:
    """Upload every staged file, then the completion marker; storage errors propagate (exit 75).

    A stop request is honoured between files: without ``COMPLETE`` nothing counts as published,
    and the staged folder stays for the rerun. Once ``COMPLETE`` is written the staging is removed.
    """
    from job.observe import tracking

    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (STAGED, BINDING)]
    for path in files:
        if stop is not None:
            stop.check()
        store.put_file(path, path.relative_to(root).as_posix())
    if (root / "logs").is_dir():  # logs/ is a mirror: events of attempts no checkpoint kept must go
        tracking.mirror_deletions(store, tracking.LOGS, {p.relative_to(root / "logs").as_posix() for p in files
                                                         if p.is_relative_to(root / "logs")})
    if stop is not None:
        stop.check()
    metrics = safe_json.loads((root / "metrics.json").read_text())
    store.put_bytes(COMPLETE, artifact_json({"completed_at": time.time(), "files": len(files),
                                             "exact_match": metrics.get("exact_match"), "f1": metrics.get("f1")}))
    log.info("published", extra={"event": "published", "uri": store.uri, "files": len(files)})
    shutil.rmtree(root, ignore_errors=True)

