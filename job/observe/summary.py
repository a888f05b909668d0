"""The last thing a run says: scores against the untrained head, time, where the results are, how to use them.

One ``summary`` event: a JSON line for machines, a short block for people (``job.observe.textlog``).
"""
from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from job.observe.curves import FILENAME as CURVES
from job.store.locations import is_s3, join

log = logging.getLogger(__name__)
# a question anyone can check by eye; the command is meant to be copied and changed
EXAMPLE = ("Who won Super Bowl 50?", "The Denver Broncos defeated the Carolina Panthers 24-10 to win Super Bowl 50.")


def baseline(metrics: dict) -> dict | None:
    """The evaluation before the first step (untrained QA head), when the run made one."""
    during = metrics.get("eval_during_training") or {}
    first = next((p for p in during.get("points", []) if p.get("step") == 0), None)
    return {"exact_match": first["exact_match"], "f1": first["f1"], "examples": during.get("examples")} if first else None


def command(name: str) -> str:
    """How a program of this environment is called from here: ``.venv/bin/<name>`` in a checkout, else ``<name>``."""
    exe = Path(sys.executable).with_name(name)
    try:
        return str(exe.relative_to(Path.cwd())) if exe.exists() else name
    except ValueError:
        return name


def answer_command(settings, model: str) -> str:
    parts = [command("python"), "-m", "job.answer", "--model", model]
    if is_s3(model) and settings.s3_endpoint_url:
        parts += ["--endpoint-url", settings.s3_endpoint_url]
    return shlex.join([*parts, "--question", EXAMPLE[0], "--context", EXAMPLE[1]])


def tensorboard_command(settings) -> str | None:
    if "tensorboard" not in settings.trackers:
        return None
    logs = join(settings.run_uri, "logs")
    # TensorBoard's own S3 reader takes the endpoint from S3_ENDPOINT, not AWS_ENDPOINT_URL
    prefix = f"S3_ENDPOINT={shlex.quote(settings.s3_endpoint_url)} " if is_s3(logs) and settings.s3_endpoint_url else ""
    return f"{prefix}{command('tensorboard')} --logdir {shlex.quote(logs)}"


def log_summary(settings, metrics: dict) -> None:
    model = join(settings.run_uri, "model")
    log.info("run summary", extra={
        "event": "summary", "run_id": settings.run_id,
        "exact_match": metrics.get("exact_match"), "f1": metrics.get("f1"), "examples": metrics.get("total"),
        "baseline": baseline(metrics),
        "steps": metrics.get("global_step"), "train_runtime": metrics.get("train_runtime"),
        "train_samples_per_second": metrics.get("train_samples_per_second"),
        "model": model, "curves": join(model, CURVES), "tensorboard": tensorboard_command(settings),
        "answer_command": answer_command(settings, model),
        **serving_summary(metrics.get("serving")),
    })


def serving_summary(serving: dict | None) -> dict:
    """What the summary says of the exports (``job.export``): EM/F1 per published runtime, what was not
    published and why, v2's chosen no-answer threshold."""
    if not serving:
        return {}
    out = {"serving": {runtime: {k: entry.get(k) for k in ("exact_match", "f1") if k in entry}
                       for runtime, entry in serving.get("runtimes", {}).items()}}
    if serving.get("not_published"):
        out["not_published"] = serving["not_published"]
    if serving.get("null_threshold"):
        t = serving["null_threshold"]
        out["null_threshold"] = {k: t.get(k) for k in ("choice", "value", "best_f1", "best_f1_thresh", "best_exact",
                                                        "best_exact_thresh")}
    return out
