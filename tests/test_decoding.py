"""n-best decoding over every window of an example: a pure function driven by hand-made logits."""
import math

import pytest

from job.decoding import decode_all, decode_answer

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
