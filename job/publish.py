"""Stage the results locally, then publish them under ``<output>/<run_id>/`` with a completion marker last.

Staging first means a publish that cannot reach storage loses nothing: the job exits 75 and a
rerun on the same work directory uploads the staged files without training again.
"""
from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

from job.storage import NotFound, Storage, atomic_write

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
STAGED = ".staged"  # local only: the staging folder is whole
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


def stage(settings, trainer, tokenizer, scores: dict, predictions: dict, train_metrics: dict, context: dict) -> Path:
    """Write model, tokenizer, model card, metrics, predictions and manifest to the staging folder."""
    root = staging_dir(settings)
    shutil.rmtree(root, ignore_errors=True)
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
    manifest = {"run_id": settings.run_id, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "settings": settings.public_dict(), "versions": versions(), **context}
    (model_dir / "README.md").write_text(model_card(settings, metrics, context))
    atomic_write(root / "metrics.json", json.dumps(metrics, indent=2).encode())
    atomic_write(root / "predictions.json", json.dumps(predictions, indent=1, ensure_ascii=False).encode())
    atomic_write(root / "manifest.json", json.dumps(manifest, indent=2).encode())
    atomic_write(root / STAGED, b"")
    return root


def staged(settings) -> Path | None:
    root = staging_dir(settings)
    return root if (root / STAGED).is_file() else None


def publish(root: Path, store: Storage) -> None:
    """Upload every staged file, then the completion marker; storage errors propagate (exit 75)."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != STAGED]
    for path in files:
        store.put_file(path, path.relative_to(root).as_posix())
    metrics = json.loads((root / "metrics.json").read_text())
    store.put_bytes(COMPLETE, json.dumps({"completed_at": time.time(), "files": len(files),
                                          "exact_match": metrics.get("exact_match"), "f1": metrics.get("f1")}).encode())
    log.info("published", extra={"event": "published", "uri": store.uri, "files": len(files)})


def model_card(settings, metrics: dict, context: dict) -> str:
    data = context.get("data", {})
    rows = "\n".join(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in metrics.items() if v is not None)
    return f"""---
library_name: transformers
pipeline_tag: question-answering
base_model: {settings.model_name}
---
# {settings.run_id}

Extractive question answering model fine-tuned by qa-finetune from `{settings.model_name}`.

- training data: `{data.get('train', {}).get('source', '?')}` ({data.get('train', {}).get('examples', '?')} examples)
- evaluation data: `{data.get('eval', {}).get('source', '?')}` ({data.get('eval', {}).get('examples', '?')} examples)
- windows: {settings.max_length} tokens, stride {settings.doc_stride}; SQuAD v2 (unanswerable): {settings.squad_v2}
- precision: {context.get('precision', '?')}; epochs {settings.epochs}, learning rate {settings.learning_rate}, batch {settings.batch_size}

## Evaluation (official SQuAD rules)

| metric | value |
|---|---|
{rows}

Answer questions with `python -m job.answer --model <this folder or s3:// URI> --question ... --context ...`.
"""
