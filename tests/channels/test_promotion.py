"""Decisions are per channel and a hold only holds while it lasts: the promotion step in-process, on hand-made runs."""
from types import SimpleNamespace

from job.channels.channel import Channel
from job.channels.nightly import plan
from job.store.fingerprint import recipe, training_inputs
from job.store.storage import LocalStorage
from tests.support.runs import GOLD, WRONG, context, eval_sha256, gate, operator, publish_run


def holder(out, channel):
    current = Channel(LocalStorage(out), channel).read()
    return current.pointer["run_id"] if current else None


def test_a_decision_for_one_channel_is_not_replayed_for_another(tmp_path):
    """Rerunning a complete run with another QA_CHANNEL once replayed its old promotion.json, never gating it."""
    out = tmp_path / "out"
    publish_run(out, "r", WRONG)
    assert gate(out, "r", "staging", QA_GATE_MIN="50")["decision"] == "reject"  # F1 0 is under the floor
    decided = gate(out, "r", "production")  # no holder there, floor 0: its first model
    assert (decided["channel"], decided["decision"], decided["reason"]) == ("production", "promote", "first_model")
    assert holder(out, "production") == "r"
    # and back: staging's own decision stands, although promotion.json is production's now
    assert gate(out, "r", "staging", QA_GATE_MIN="50")["channel"] == "production"
    assert holder(out, "staging") is None


def test_a_held_run_is_gated_again_once_the_hold_is_gone(tmp_path, capsys):
    out = tmp_path / "out"
    for run in ("h", "c"):
        publish_run(out, run, GOLD)
    assert operator(out, "promote", "--channel", "production", "--run", "h") == 0
    assert operator(out, "hold", "--channel", "production") == 0
    assert gate(out, "c", "production")["decision"] == "hold" and holder(out, "production") == "h"
    assert gate(out, "c", "production")["decision"] == "hold"  # still held: the decision stands
    assert operator(out, "release", "--channel", "production") == 0
    decided = gate(out, "c", "production")  # a rerun of the held run, once released
    assert decided["decision"] == "promote" and holder(out, "production") == "c"


def night_plan(out, run_id):
    """Tonight's plan for a night whose data, settings and code equal run "c"'s."""
    ctx = context(out, run_id, "production")
    split = SimpleNamespace(sha256=eval_sha256())
    return plan(ctx, SimpleNamespace(sha256="train-c"), split)


def same_recipe_as_tonight(out):
    ctx = context(out, "n", "production")
    return recipe(training_inputs(ctx.settings, "train-c", eval_sha256()))


def test_a_night_like_a_held_run_trains_once_the_hold_is_gone(tmp_path, capsys):
    """The night after a release, with the data of the run the hold kept back, ended `unchanged` like it."""
    out = tmp_path / "out"
    publish_run(out, "h", GOLD)
    publish_run(out, "c", GOLD, recipe=same_recipe_as_tonight(out))
    assert operator(out, "promote", "--channel", "production", "--run", "h") == 0
    assert operator(out, "hold", "--channel", "production") == 0
    assert gate(out, "c", "production")["decision"] == "hold"
    assert operator(out, "release", "--channel", "production") == 0
    assert not night_plan(out, "n").unchanged


def test_a_night_like_a_held_run_while_still_held_says_why_it_is_unchanged(tmp_path, capsys, caplog):
    import json
    import logging

    out = tmp_path / "out"
    publish_run(out, "h", GOLD)
    publish_run(out, "c", GOLD, recipe=same_recipe_as_tonight(out))
    assert operator(out, "promote", "--channel", "production", "--run", "h") == 0
    assert operator(out, "hold", "--channel", "production", "--reason", "audit") == 0
    assert gate(out, "c", "production")["decision"] == "hold"
    caplog.set_level(logging.INFO, logger="job.channels.nightly")
    assert night_plan(out, "n").unchanged
    decided = json.loads((out / "n" / "promotion.json").read_text())
    assert (decided["same_as"], decided["same_as_decision"]) == ("c", "hold")
    (event,) = [r for r in caplog.records if getattr(r, "event", None) == "unchanged"]
    assert "the channel is held" in event.getMessage() and "released" in event.getMessage()


def test_a_rerun_of_a_gated_run_whose_model_retention_pruned_stands_by_its_decision(tmp_path, capsys):
    """Found by the soak (a rerun of an old run id): the promotion step first read the run as a candidate, which
    needs its model, so a run gated long ago and pruned since exited 2 instead of standing by its decision."""
    import shutil

    out = tmp_path / "out"
    publish_run(out, "h", GOLD)
    publish_run(out, "r", WRONG)
    assert gate(out, "h", "production")["decision"] == "promote"
    assert gate(out, "r", "production")["decision"] == "reject"
    shutil.rmtree(out / "r" / "model")  # what retention does to it once newer runs are gated
    assert gate(out, "r", "production")["decision"] == "reject"  # the rerun: the recorded decision stands, exit 0
    assert holder(out, "production") == "h"
