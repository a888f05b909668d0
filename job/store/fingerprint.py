"""What makes a trained model what it is: the data, the base model, the training settings, the job's code.

One fingerprint serves two purposes. Results staged by an earlier attempt, and a run folder
started earlier under the same run id, are only reused when their fingerprint equals this
attempt's, so a rerun with another learning rate or other data can never publish the old model.
And a nightly run whose fingerprint equals the current model's has nothing new to learn.

The weights a run starts from are part of its inputs (``init``: the base model, or the channel
holder it was warm-started from). The nightly "unchanged" test compares the ``recipe``, which is
everything but ``init``: with warm starts every night starts from another holder, yet a night
whose data, settings and code equal the holder's has nothing new to learn either.

Settings that cannot change the trained weights or their scores are left out (where things are
written, how often checkpoints are taken, retries, log cadence); every other setting is in, so a
new setting counts by default: a false "changed" costs a run, a false "unchanged" would cost a
model.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path

# Settings with no effect on the weights or the scores.
NEUTRAL_SETTINGS = frozenset({
    "run_id", "output_uri", "work_dir", "s3_endpoint_url", "s3_region",
    "dataloader_workers", "preprocess_workers", "pin_memory", "logging_steps", "log_format", "report_to",
    "checkpoint_steps", "checkpoint_minutes", "checkpoints_to_keep", "stop_grace_seconds", "lease_seconds",
    "storage_attempts", "storage_backoff_seconds", "storage_timeout_seconds",
    # where the steps run, as QA_PRECISION=auto's choice of bf16 or fp32: a rerun on another node
    # type resumes the same run (the device and precision used are in the manifest)
    "device",
    # evaluation during training watches the weights without changing them (tested bit for bit)
    "eval_steps", "eval_samples_during_training",
    # promotion policy: decides what happens to a model, not what the model is
    "channel", "gate_metric", "gate_min", "gate_max_drop", "skip_unchanged", "keep_runs",
    # what the weights start from is recorded as resolved (``init``), not as these policies
    "init_from", "warm_start_limit",
})
# What the eval scores depend on besides the model: the same eval fingerprint means two runs'
# published predictions were made on the same examples with the same windows and decoding.
EVAL_SETTINGS = ("max_length", "doc_stride", "n_best_size", "max_answer_length", "null_score_diff_threshold",
                 "squad_v2", "max_eval_samples")
BASE_INIT = {"from": "base", "warm_starts": 0}


@lru_cache(maxsize=1)
def job_version() -> str:
    """The package version plus a digest of the package's source: the code that trains is part of the model."""
    try:
        version = metadata.version("qa-finetune")
    except metadata.PackageNotFoundError:
        version = "0"
    package = Path(__file__).resolve().parents[1]  # job/, every subpackage included
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{version}+{h.hexdigest()[:12]}"


def training_inputs(settings, train_sha256: str, eval_sha256: str, init: dict | None = None,
                    base_model: str | None = None, teacher: str | None = None) -> dict:
    """Everything that determines the trained model and its scores, as a plain dict (for messages).

    ``init`` says what the weights start from (default: the base model, ``QA_MODEL_NAME``).
    ``base_model`` is what ``QA_MODEL_NAME`` is by content (``job.store.models.model_identity``):
    the name alone would take a folder replaced in place for the model it held before.
    ``teacher``: the distillation teacher by content, the same way (its name, alpha and
    temperature are settings); absent without one, so a plain run's inputs name no teacher.
    """
    dumped = settings.model_dump()
    return {
        **({"teacher": teacher} if teacher else {}),
        "settings": {k: v for k, v in sorted(dumped.items()) if k not in NEUTRAL_SETTINGS},
        "base_model": base_model,
        "train_sha256": train_sha256,
        "eval_sha256": eval_sha256,
        "job_version": job_version(),
        "init": dict(init or BASE_INIT),
    }


def recipe(inputs: dict) -> str:
    """The fingerprint without ``init``: same data, settings and code (skip-if-unchanged)."""
    return digest({k: v for k, v in inputs.items() if k != "init"})


def eval_fingerprint(inputs: dict) -> str:
    """What a run's eval scores were computed on: eval data, windows, decoding and the job's code."""
    settings = inputs.get("settings", {})
    return digest({"eval_sha256": inputs.get("eval_sha256"), "job_version": inputs.get("job_version"),
                   "settings": {k: settings.get(k) for k in EVAL_SETTINGS}})


def digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def differences(old: dict, new: dict) -> list[str]:
    """Names of what differs between two ``training_inputs`` dicts, for a one-line message."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        elif a != b:
            out.append(key)
    return out
