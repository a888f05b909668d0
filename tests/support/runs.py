"""Published runs written by hand, and a night's promotion run in-process on them.

The promotion, nightly planning and retention read only a run's records (``COMPLETE``,
``metrics.json``, ``run.json``, ``predictions.json``, ``model/``); writing those by hand lets the
channel logic run for real, on real storage, without training anything. The eval rows are the
test data's, so the gate scores real predictions.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

from job.store.fingerprint import BASE_INIT
from job.store.storage import LocalStorage
from tests.support.jobrun import DATA

EVAL = DATA / "squad_v1_dev_32.jsonl"
ROWS = [json.loads(line) for line in EVAL.read_text().splitlines()]
GOLD = {r["id"]: r["answers"]["text"][0] for r in ROWS}  # F1 100
WRONG = {r["id"]: "" for r in ROWS}  # F1 0


def settings_for(out: Path, run_id: str, channel: str, **extra: str):
    from job.settings import load_settings

    return load_settings({"QA_RUN_ID": run_id, "QA_OUTPUT_URI": str(out), "QA_CHANNEL": channel, "QA_EVAL_URI": str(EVAL),
                          "QA_WORK_DIR": str(out.parent / "work"), **extra})


def eval_sha256() -> str:
    from job.data import load_split
    from job.store.storage import RetryPolicy

    # load_split keeps its rows under the work dir: a scratch folder, never the caller's cwd
    with tempfile.TemporaryDirectory() as scratch:
        return load_split("eval", settings_for(Path(scratch) / "out", "x", "c"), RetryPolicy()).sha256


def publish_run(out: Path, run_id: str, predictions: dict, recipe: str | None = None, init: dict | None = None) -> None:
    """A complete run as the job publishes it, scored on the test eval rows."""
    store = LocalStorage(out / run_id)
    inputs = {"train_sha256": f"train-{run_id}", "eval_sha256": eval_sha256(), "settings": {}, "init": init or dict(BASE_INIT)}
    record = {"run_id": run_id, "fingerprint": f"fp-{run_id}", "recipe": recipe or f"recipe-{run_id}", "eval_fingerprint": "same",
              "inputs": inputs}
    store.put_bytes("run.json", json.dumps(record).encode())
    store.put_bytes("predictions.json", json.dumps(predictions).encode())
    f1 = 100.0 * sum(predictions[i] == GOLD[i] for i in GOLD) / len(GOLD)
    store.put_bytes("metrics.json", json.dumps({"f1": f1, "exact_match": f1}).encode())
    for name in ("config.json", "model.safetensors"):
        store.put_bytes(f"model/{name}", b"{}")
    store.put_bytes("COMPLETE", b"{}")


def context(out: Path, run_id: str, channel: str, **extra: str):
    """What the job's stages share (``job.pipeline.RunContext``), for a run of ``out`` holding its lease."""
    return SimpleNamespace(settings=settings_for(out, run_id, channel, **extra), store=LocalStorage(out / run_id),
                           lease=SimpleNamespace(verify=lambda: None), stop=None, ranks=SimpleNamespace(is_writer=True))


def gate(out: Path, run_id: str, channel: str, **extra: str) -> dict:
    """The promotion step of a complete run's night (gate, decision, pointer, retention); its promotion.json."""
    from job.channels import promotion

    ctx = context(out, run_id, channel, **extra)
    promotion.promote(ctx)
    return json.loads(ctx.store.get_bytes("promotion.json")[0])


def operator(out: Path, *args: str) -> int:
    """``python -m job.channel ARGS --output OUT``, in-process."""
    from job.channels.cli import main

    return main([*args, "--output", str(out)], environ={})
