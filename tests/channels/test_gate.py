"""The quality gate: paired bootstrap over per-question differences, and the decision rule."""
import json

import pytest

from job.channels.gate import GatePolicy, decide, paired_bootstrap


def scores(values, metric="f1"):
    return {f"q{i}": {metric: float(v), "exact_match": float(v)} for i, v in enumerate(values)}


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    diffs = [0, 100, -100, 50, 0, 0, 25, -25, 100, 0] * 10
    first, again = paired_bootstrap(diffs), paired_bootstrap(diffs)
    assert first == again
    mean, low, high = first
    assert mean == pytest.approx(15.0) and low < mean < high
    assert paired_bootstrap([3.0] * 50) == (3.0, 3.0, 3.0)  # no spread, no interval


def test_pairing_removes_question_difficulty():
    # Question difficulty varies wildly, but the candidate is exactly 2 points better on each:
    # compared unpaired the averages overlap; paired the interval is a point.
    holder = scores([0, 100, 10, 90, 50] * 40)
    candidate = {k: {"f1": v["f1"] + 2} for k, v in holder.items()}
    verdict = decide(candidate, holder, GatePolicy(max_drop=0.5))
    assert verdict["interval"] == [2.0, 2.0] and verdict["promote"] and verdict["reason"] == "not_worse"


def test_no_holder_the_floor_decides():
    assert decide(scores([60, 70]), None, GatePolicy(floor=50))["reason"] == "first_model"
    below = decide(scores([10, 20]), None, GatePolicy(floor=50))
    assert not below["promote"] and below["reason"] == "below_floor" and "QA_GATE_MIN=50" in below["message"]


def test_floor_applies_with_a_holder_too():
    verdict = decide(scores([10] * 20), scores([0] * 20), GatePolicy(floor=50))
    assert not verdict["promote"] and verdict["reason"] == "below_floor" and verdict["mean_difference"] == 10.0


def test_a_real_regression_is_rejected():
    holder = scores([100, 80, 60, 100] * 50)
    candidate = scores([50, 30, 60, 80] * 50)
    verdict = decide(candidate, holder, GatePolicy(max_drop=1.0))
    assert not verdict["promote"] and verdict["reason"] == "regression"
    assert verdict["interval"][1] < -1.0 and verdict["mean_difference"] == pytest.approx(-30.0)


def test_noise_within_the_tolerance_does_not_block():
    # 400 questions where the two models disagree on a few in each direction: mean 0
    holder = scores([100, 0, 50, 70] * 100)
    candidate = dict(holder)
    for i in range(0, 40, 2):
        candidate[f"q{i}"] = {"f1": 0.0}
        candidate[f"q{i + 1}"] = {"f1": 100.0}
    verdict = decide(candidate, holder, GatePolicy(max_drop=10.0))
    assert verdict["promote"] and verdict["reason"] == "not_worse" and verdict["interval"][0] > -10.0


def test_an_interval_wider_than_the_tolerance_is_inconclusive():
    holder = scores([100, 0] * 10)
    candidate = scores([0, 100] * 9 + [0, 0])  # 20 questions, big swings: mean -5
    verdict = decide(candidate, holder, GatePolicy(max_drop=1.0))
    low, high = verdict["interval"]
    assert not verdict["promote"] and verdict["reason"] == "inconclusive" and low < -1.0 <= high
    assert "wide" in verdict["message"]


def test_exact_match_metric_and_every_number_recorded():
    verdict = decide(scores([100, 0, 100], "exact_match"), scores([100, 0, 0], "exact_match"),
                     GatePolicy(metric="exact_match", max_drop=100))
    assert verdict["metric"] == "exact_match" and verdict["candidate"] == pytest.approx(66.6667)
    assert {"holder", "mean_difference", "interval", "examples", "resamples", "confidence", "seed", "floor",
            "max_drop", "message"} <= set(verdict)


def test_candidate_and_holder_must_share_the_questions():
    with pytest.raises(ValueError, match="same questions"):
        decide(scores([1, 2, 3]), scores([1, 2]), GatePolicy())


def test_a_score_that_is_not_finite_is_never_promoted():
    """NaN < QA_GATE_MIN is False: a NaN candidate passed the floor and a fresh channel promoted it."""
    nan = {"q1": {"f1": float("nan"), "exact_match": 0.0}, "q2": {"f1": 50.0, "exact_match": 0.0}}
    for holder in (None, {"q1": {"f1": 50.0}, "q2": {"f1": 50.0}}):
        verdict = decide(nan, holder, GatePolicy())
        assert not verdict["promote"] and verdict["reason"] == "not_finite" and verdict["candidate"] is None
        json.dumps(verdict, allow_nan=False)  # promotion.json stays JSON
