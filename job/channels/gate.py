"""The quality gate: is a candidate good enough to replace the channel's holder? Pure functions.

Both models are scored per question on the *same* eval examples, and the gate judges the
per-question differences ``candidate - holder`` (points, 0-100) with a paired bootstrap: resample
the questions with replacement, take the mean difference of each resample, and read the 95%
interval off those means. Pairing removes the difficulty of each question from the comparison,
so the interval is much narrower than comparing two independent averages.

The rule is a non-inferiority test with a tolerance:

- the candidate's metric must reach the floor (``QA_GATE_MIN``), whatever the holder;
- without a holder, the floor alone decides;
- with one, promote when the whole interval lies above ``-QA_GATE_MAX_DROP``: the candidate is,
  beyond noise, not worse than the holder by more than the tolerance. When the whole interval
  lies below it, that is a real regression. When the interval straddles it, the eval set cannot
  tell a drop of that size from noise: the holder stays (``inconclusive``), and the decision says
  how wide the interval was, so the tolerance or the eval set can be sized to the noise.

A noisy metric therefore never lets a regression beyond the tolerance through, and a good model
is only held back when the interval is wider than the tolerance, which the record shows.
The bootstrap seed is fixed, so the same scores always give the same decision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 20160601  # fixed: a rerun, a re-gate after a lost race and a reader of the record all agree
_CHUNK = 100  # resamples drawn at once: bounds memory on a 10k-question eval set


@dataclass(frozen=True)
class GatePolicy:
    metric: str = "f1"  # "f1" or "exact_match"
    floor: float = 0.0  # QA_GATE_MIN, points
    max_drop: float = 1.0  # QA_GATE_MAX_DROP, points


def paired_bootstrap(differences, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                     seed: int = SEED) -> tuple[float, float, float]:
    """Mean of ``differences`` and its ``confidence`` percentile interval over ``resamples`` resamples."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        raise ValueError("no paired examples")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for begin in range(0, resamples, _CHUNK):
        n = min(_CHUNK, resamples - begin)
        means[begin:begin + n] = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(d.mean()), float(low), float(high)


def decide(candidate: dict[str, dict], holder: dict[str, dict] | None, policy: GatePolicy) -> dict:
    """The gate's decision with every number behind it.

    ``candidate`` and ``holder`` map question id -> per-question scores (``job.squad.metrics.
    per_example_scores``). Returns ``{"promote": bool, "reason": ..., "message": ..., numbers}``.
    """
    metric = policy.metric
    cand_mean = _mean(candidate, metric)
    out = {"metric": metric, "floor": policy.floor, "max_drop": policy.max_drop, "examples": len(candidate),
           "candidate": _round(cand_mean), "holder": None, "mean_difference": None, "interval": None,
           "resamples": RESAMPLES, "confidence": CONFIDENCE, "seed": SEED}
    if not math.isfinite(cand_mean):  # NaN < floor is False: a NaN score would have passed the floor
        return {**out, "candidate": None, "promote": False, "reason": "not_finite",
                "message": f"{metric} is not a finite number; a model scored so is never promoted"}
    if holder is not None:
        missing = sorted(set(candidate) ^ set(holder))
        if missing:
            raise ValueError(f"candidate and holder were not scored on the same questions ({len(missing)} differ, "
                             f"e.g. {str(missing[0])[:60]!r})")
        ids = sorted(candidate)
        diffs = [candidate[i][metric] - holder[i][metric] for i in ids]
        mean, low, high = paired_bootstrap(diffs)
        out.update(holder=_round(_mean(holder, metric)), mean_difference=_round(mean), interval=[_round(low), _round(high)])
    if cand_mean < policy.floor:
        return {**out, "promote": False, "reason": "below_floor",
                "message": f"{metric} {cand_mean:.2f} is below the floor QA_GATE_MIN={policy.floor:g}"}
    if holder is None:
        return {**out, "promote": True, "reason": "first_model",
                "message": f"no holder yet; {metric} {cand_mean:.2f} reaches the floor {policy.floor:g}"}
    low, high = out["interval"]
    span = f"mean difference {out['mean_difference']:+.2f} points, 95% interval [{low:+.2f}, {high:+.2f}]"
    if low >= -policy.max_drop:
        return {**out, "promote": True, "reason": "not_worse",
                "message": f"{span}: not worse than the holder by more than {policy.max_drop:g} points"}
    if high < -policy.max_drop:
        return {**out, "promote": False, "reason": "regression",
                "message": f"{span}: worse than the holder by more than QA_GATE_MAX_DROP={policy.max_drop:g} points"}
    return {**out, "promote": False, "reason": "inconclusive",
            "message": f"{span}: cannot rule out a drop of more than QA_GATE_MAX_DROP={policy.max_drop:g} points "
                       f"(interval {high - low:.2f} points wide; score on more examples or raise the tolerance)"}


def _mean(scores: dict[str, dict], metric: str) -> float:
    if not scores:
        raise ValueError("no scored examples")
    return sum(s[metric] for s in scores.values()) / len(scores)


def _round(value: float) -> float:
    return round(float(value), 4)
