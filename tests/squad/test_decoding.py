"""n-best decoding over every window of an example: a pure function driven by hand-made logits."""
import math

import numpy as np
import pytest

from job.squad.decoding import count_nonfinite, decode_all, decode_answer

CONTEXT = "Paris is the capital of France."
#            0-5    6-8 9-12 13-20 21-23 24-31
OFFSETS = [[-1, -1], [-1, -1], [-1, -1], [0, 5], [6, 8], [9, 12], [13, 20], [21, 23], [24, 31], [-1, -1]]


def logits(n, **peaks):
    out = [-10.0] * n
    for index, value in peaks.items():
        out[int(index[1:])] = value
    return out


@pytest.mark.parametrize("case, windows, options, expected", [
    ("best span", [(logits(10, t3=5), logits(10, t3=5), OFFSETS)], {}, "Paris"),
    ("multi-token span", [(logits(10, t6=5), logits(10, t8=5), OFFSETS)], {}, "capital of France."),
    ("end before start is skipped", [(logits(10, t8=9, t3=2), logits(10, t3=9, t8=1), OFFSETS)], {}, "Paris"),
    ("question tokens never chosen", [(logits(10, t1=50, t3=1), logits(10, t2=50, t3=1), OFFSETS)], {}, "Paris"),
    ("too long span is skipped", [(logits(10, t3=5, t6=4), logits(10, t8=5, t6=4), OFFSETS)], {"max_answer_length": 2}, "capital"),
    ("best window wins", [(logits(10, t3=1), logits(10, t3=1), OFFSETS), (logits(10, t6=7), logits(10, t6=7), OFFSETS)], {}, "capital"),
    ("v2 null wins", [(logits(10, t0=9, t3=1), logits(10, t0=9, t3=1), OFFSETS)], {"version_2": True}, ""),
    ("v2 span wins", [(logits(10, t0=1, t3=9), logits(10, t0=1, t3=9), OFFSETS)], {"version_2": True}, "Paris"),
    ("v2 threshold keeps span", [(logits(10, t0=3, t3=2), logits(10, t0=3, t3=2), OFFSETS)], {"version_2": True, "null_threshold": 5.0}, "Paris"),
    ("v1 ignores null", [(logits(10, t0=9, t3=1), logits(10, t0=9, t3=1), OFFSETS)], {}, "Paris"),
])
def test_decode_answer(case, windows, options, expected):
    assert decode_answer(windows, CONTEXT, **options).text == expected, case


def test_offsets_and_scores():
    answer = decode_answer([(logits(10, t6=2), logits(10, t8=3), OFFSETS)], CONTEXT)
    assert (answer.start, answer.end, answer.score) == (13, 31, 5.0)


def test_no_window_gives_empty_answer():
    answer = decode_answer([], CONTEXT)
    assert answer.text == "" and math.isinf(answer.score)


def test_decode_all_groups_windows_by_example():
    rows = [{"id": "a", "context": CONTEXT}, {"id": "b", "context": CONTEXT}]
    starts = [logits(10, t3=5), logits(10, t6=5), logits(10, t5=1)]
    ends = [logits(10, t3=5), logits(10, t8=5), logits(10, t5=1)]
    preds = decode_all(rows, [0, 1, 1], [OFFSETS] * 3, starts, ends)
    assert preds == {"a": "Paris", "b": "capital of France."}


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("case, windows, options, expected", [
    # NaN counts as -inf: it neither wins nor takes an n-best slot from a number
    ("NaN span is never chosen", [(logits(10, t3=5, t6=NAN), logits(10, t3=5, t6=NAN), OFFSETS)], {}, "Paris"),
    ("a NaN start never pairs; a finite one may reach its end", [(logits(10, t3=5, t6=NAN), logits(10, t3=1, t6=9), OFFSETS)], {}, "Paris is the capital"),
    ("NaN does not crowd the n-best", [(logits(10, t3=5, t6=NAN), logits(10, t3=5), OFFSETS)], {"n_best": 1}, "Paris"),
    ("NaN end logit is never chosen", [(logits(10, t3=5), logits(10, t3=5, t4=NAN), OFFSETS)], {"n_best": 1}, "Paris"),
    ("all NaN: empty answer", [([NAN] * 10, [NAN] * 10, OFFSETS)], {}, ""),
    ("a NaN window loses to a finite one", [([NAN] * 10, [NAN] * 10, OFFSETS), (logits(10, t6=1), logits(10, t6=1), OFFSETS)], {}, "capital"),
    # infinities are extreme scores
    ("+inf start wins", [(logits(10, t3=5, t6=INF), logits(10, t3=5, t6=1), OFFSETS)], {}, "capital"),
    ("+inf start with -inf end is no evidence", [(logits(10, t3=1, t6=INF), logits(10, t3=1, t6=-INF), OFFSETS)], {"n_best": 2}, "Paris"),
    ("-inf never qualifies", [([-INF] * 10, [-INF] * 10, OFFSETS)], {}, ""),
    ("-inf everywhere but one span", [([-INF] * 3 + [2.0] + [-INF] * 6, [-INF] * 3 + [2.0] + [-INF] * 6, OFFSETS)], {}, "Paris"),
    # v2: a NaN null score never wins; a +inf null always does (unless the span is +inf too)
    ("v2 NaN null never wins", [(logits(10, t0=NAN, t3=1), logits(10, t0=NAN, t3=1), OFFSETS)], {"version_2": True}, "Paris"),
    ("v2 +inf null wins", [(logits(10, t0=INF, t3=9), logits(10, t0=1, t3=9), OFFSETS)], {"version_2": True}, ""),
    ("v2 +inf null against a +inf span keeps the span", [(logits(10, t0=INF, t3=INF), logits(10, t0=1, t3=1), OFFSETS)], {"version_2": True}, "Paris"),
])
def test_non_finite_logits(case, windows, options, expected):
    assert decode_answer(windows, CONTEXT, **options).text == expected, case


def test_non_finite_scores_are_reported_as_such():
    answer = decode_answer([([NAN] * 10, [NAN] * 10, OFFSETS)], CONTEXT, version_2=True)
    assert answer.score == -INF and answer.null_score == -INF
    answer = decode_answer([(logits(10, t3=INF), logits(10, t3=1), OFFSETS)], CONTEXT)
    assert (answer.text, answer.score) == ("Paris", INF)


def test_finite_ties_break_as_before():
    """Equal scores: the first span in argsort n-best order keeps the place, as in run_qa.py (pinned, not derived)."""
    for dtype in (np.float64, np.float32):
        start = np.array(logits(10, t3=5, t6=5), dtype=dtype)
        answer = decode_answer([(start, start.copy(), OFFSETS)], CONTEXT)
        assert (answer.text, answer.score) == ("Paris", 10.0), dtype


@pytest.mark.parametrize("starts, ends, lengths, expected", [
    ([[1.0, 2.0, -100.0]], [[1.0, 2.0, -100.0]], [2], 0),
    ([[1.0, NAN, 0.0]], [[1.0, 2.0, 0.0]], [3], 1),
    ([[1.0, 2.0, INF]], [[1.0, 2.0, 0.0]], [2], 0),  # past the window's length: padding, not counted
    ([[1.0, 2.0], [0.0, 0.0]], [[-INF, 2.0], [0.0, 0.0]], [2, 2], 1),
])
def test_count_nonfinite(starts, ends, lengths, expected):
    assert count_nonfinite(np.array(starts), np.array(ends), lengths) == expected
