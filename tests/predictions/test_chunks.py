"""Shards and chunks cover every row once; markers are read strictly; a prediction line says what decoding said."""
import json
import math

import pytest

from job.predictions.chunks import chunk_ranges, data_key, lines, marker, prediction, read_marker, shard_rows
from job.squad.decoding import Answer


@pytest.mark.parametrize("total", [0, 1, 7, 32, 1001])
@pytest.mark.parametrize("shards", [1, 2, 3, 8])
def test_shards_and_chunks_cover_every_row_once_in_order(total, shards):
    rows = [r for s in range(shards) for part in chunk_ranges(shard_rows(total, s, shards), 4) for r in part]
    assert rows == list(range(total))
    sizes = [len(shard_rows(total, s, shards)) for s in range(shards)]
    assert max(sizes) - min(sizes) <= 1


def test_a_marker_is_read_back_only_when_it_is_exactly_what_this_plan_commits():
    good = marker(3, range(12, 16), data_key(3, "0123456789ab"), b"{}\n")
    assert read_marker(json.dumps(good).encode(), 3, range(12, 16)) == good
    bad = [
        {**good, "chunk": 4},
        {**good, "rows": 5},
        {**good, "first_row": True},
        {**good, "key": data_key(2, "0123456789ab")},
        {**good, "key": "../chunk-000003-0123456789ab.jsonl"},
        {**good, "sha256": "x" * 64},
        {**good, "size": -1},
        {**good, "extra": 1},
    ]
    for value in bad:
        assert read_marker(json.dumps(value).encode(), 3, range(12, 16)) is None, value
    assert read_marker(b"not json", 3, range(12, 16)) is None
    assert read_marker(json.dumps(good).encode(), 3, range(12, 17)) is None  # another plan's chunk


def test_a_prediction_line_has_the_answer_its_offsets_and_its_score():
    answer = Answer("Denver", 0, 6, 7.25, 1.0)
    line = prediction("q1", answer, "Denver", False)
    assert line == {"id": "q1", "answer": "Denver", "start": 0, "end": 6, "score": 7.25}
    assert lines([line]).decode() == json.dumps(line) + "\n"


def test_under_v2_the_line_says_how_much_the_model_prefers_no_answer():
    # the best span "Denver", answered "" because the null difference (1.0) is over the threshold
    line = prediction("q1", Answer("Denver", 0, 6, 2.0, 3.0), "", True)
    assert (line["answer"], line["start"], line["end"], line["score"]) == ("", -1, -1, 2.0)
    assert line["null_score_diff"] == 1.0
    assert line["no_answer_probability"] == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert prediction("q", Answer("x", 0, 1, 3.0, 3.0), "x", True)["no_answer_probability"] == 0.5
    nothing = prediction("q", Answer("", -1, -1, -math.inf, 1.0), "", True)  # no span qualified: only "no answer"
    assert (nothing["score"], nothing["null_score_diff"], nothing["no_answer_probability"]) == (None, None, 1.0)
    assert prediction("q", Answer("x", 0, 1, 800.0, -800.0), "x", True)["no_answer_probability"] == 0.0  # no overflow
    json.dumps(nothing, allow_nan=False)
