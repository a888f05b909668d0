"""Retention never deletes a model some channel serves or may need, nor touches a run in flight: in-process, on hand-made runs."""
import json

import pytest

from job.channels.nightly import Night, init_model, plan
from job.errors import ConfigError
from job.store.storage import LocalStorage
from tests.support.runs import GOLD, context, gate, operator, publish_run

KEEP = dict(QA_KEEP_RUNS="1")


def has_model(out, run_id) -> bool:
    return (out / run_id / "model" / "config.json").is_file()


def staging_night(out, run_id):
    publish_run(out, run_id, GOLD)
    assert gate(out, run_id, "staging", **KEEP)["decision"] == "promote"


def test_one_channels_retention_keeps_the_model_another_channel_serves(tmp_path, capsys):
    """Staging's run t1, promoted by hand to production, lost its model two staging nights later."""
    out = tmp_path / "out"
    staging_night(out, "t1")
    assert operator(out, "promote", "--channel", "production", "--run", "t1") == 0
    for run in ("t2", "t3", "t4"):
        staging_night(out, run)
    assert has_model(out, "t1")  # production's holder
    assert not has_model(out, "t2") and not (out / "t2" / "checkpoints").exists()  # nobody's: pruned as before
    assert has_model(out, "t3") and has_model(out, "t4")  # staging's previous holder and holder
    assert (out / "t1" / "metrics.json").is_file()
    plan_ = json.loads((out / "t4" / "retention.json").read_text())
    assert "t1" in plan_["protected_models"] and [p["run_id"] for p in plan_["prune"] if "model/" in p["delete"]] == ["t2"]


def test_a_run_restarted_in_flight_is_not_touched_by_its_old_record(tmp_path, capsys):
    """Its stale channels/<ch>/runs/<run>.json marked it as an old gated run: its new checkpoints were deleted."""
    out = tmp_path / "out"
    staging_night(out, "t1")
    run = LocalStorage(out / "t1")
    run.delete("COMPLETE")  # its folder was cleared by hand and the run started again: not complete, lease held
    run.put_bytes("checkpoints/checkpoint-4/COMMIT.json", b"{}")
    run.put_bytes("lease.json", b"{}")
    for night in ("t2", "t3"):
        staging_night(out, night)
    assert (out / "t1" / "checkpoints" / "checkpoint-4" / "COMMIT.json").is_file() and has_model(out, "t1")
    assert json.loads((out / "t3" / "retention.json").read_text())["in_flight"] == ["t1"]


def test_the_start_model_of_a_warm_started_run_in_flight_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    staging_night(out, "t1")
    ctx = context(out, "w", "staging", QA_INIT_FROM="channel")
    night = plan(ctx, *(type("Split", (), {"sha256": s}) for s in ("train-w", "eval-w")))
    assert night.init["run_id"] == "t1"  # w starts from t1's model, then is preempted: not complete
    for run in ("t2", "t3", "t4"):
        staging_night(out, run)
    assert has_model(out, "t1")
    publish_run(out, "w", GOLD)  # w's retry completes and is gated: t1's model is nobody's start any more
    gate(out, "w", "staging", **KEEP)
    staging_night(out, "t5")
    assert not has_model(out, "t1")


def test_a_warm_start_whose_start_model_is_gone_resumes_from_its_checkpoint(tmp_path):
    """The retry once exited 2 fetching the pruned start model, naming `--model`, a job.answer flag."""
    out = tmp_path / "out"
    ctx = context(out, "w", "staging", QA_INIT_FROM="channel")
    night = Night({"from": "channel", "run_id": "pruned", "warm_starts": 1})
    with pytest.raises(ConfigError) as info:  # no checkpoint yet: nothing to resume from
        init_model(ctx.settings, night)
    message = str(info.value)
    assert "--model" not in message and "run pruned's model" in message and "new QA_RUN_ID" in message
    commit_checkpoint(ctx.store, step=4, files={"config.json": b'{"a": 1}', "model.safetensors": b"weights",
                                                "vocab.txt": b"[PAD]", "optimizer.pt": b"state", "trainer_state.json": b"{}"})
    loaded = init_model(ctx.settings, night, store=ctx.store)
    assert sorted(p.name for p in (tmp_path / "work" / "w" / "init-model").iterdir()) == [
        "config.json", "model.safetensors", "vocab.txt"]  # the model's files; the training state is restore's
    assert loaded == str(tmp_path / "work" / "w" / "init-model")


def commit_checkpoint(store, step, files):
    import hashlib

    for name, data in files.items():
        store.put_bytes(f"checkpoints/checkpoint-{step}/{name}", data)
    marker = {"step": step, "files": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}}
    store.put_bytes(f"checkpoints/checkpoint-{step}/COMMIT.json", json.dumps(marker).encode())
