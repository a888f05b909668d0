"""Span labelling: a pure function, table-driven, then checked on real windows."""
import pytest

from job.squad.features import eval_features, label_window, train_features

# One window: [CLS] q q [SEP] c0 c1 c2 c3 [SEP]; context tokens cover characters 0-4, 5-9, 10-14, 15-19.
OFFSETS = [(0, 0), (0, 3), (4, 8), (0, 0), (0, 4), (5, 9), (10, 14), (15, 19), (0, 0)]
SEQ = [None, 0, 0, None, 1, 1, 1, 1, None]
# A later stride window over the same context: c2 c3 c4 (characters 10-24).
OFFSETS_2 = [(0, 0), (0, 3), (4, 8), (0, 0), (10, 14), (15, 19), (20, 24), (0, 0)]
SEQ_2 = [None, 0, 0, None, 1, 1, 1, None]


@pytest.mark.parametrize("case, offsets, seq, start, end, expected", [
    ("inside, one token", OFFSETS, SEQ, 5, 9, (5, 5)),
    ("inside, several tokens", OFFSETS, SEQ, 5, 14, (5, 6)),
    ("first context token", OFFSETS, SEQ, 0, 4, (4, 4)),
    ("last context token", OFFSETS, SEQ, 15, 19, (7, 7)),
    ("starts inside a token", OFFSETS, SEQ, 6, 14, (5, 6)),
    ("gold with a leading space", OFFSETS, SEQ, 4, 9, (5, 5)),
    ("gold with a trailing space", OFFSETS, SEQ, 5, 10, (5, 5)),
    ("gold of whitespace only", OFFSETS, SEQ, 4, 5, (0, 0)),
    ("cut by the window's right edge", OFFSETS, SEQ, 15, 24, (0, 0)),
    ("entirely after the window", OFFSETS, SEQ, 20, 24, (0, 0)),
    ("cut by the left edge of a stride window", OFFSETS_2, SEQ_2, 5, 14, (0, 0)),
    ("across a stride boundary, whole in the next window", OFFSETS_2, SEQ_2, 15, 24, (5, 6)),
    ("unanswerable", OFFSETS, SEQ, None, None, (0, 0)),
])
def test_label_window(case, offsets, seq, start, end, expected):
    assert label_window(offsets, seq, start, end, cls_index=0) == expected, case


def test_no_context_tokens_gives_cls():
    assert label_window([(0, 0), (0, 3), (0, 0)], [None, 0, None], 0, 3, cls_index=0) == (0, 0)


def _decode_labels(tokenizer, rows, max_length, stride):
    cols = train_features(tokenizer, rows, max_length, stride)
    enc = eval_features(tokenizer, rows, max_length, stride)
    return cols, enc


def test_real_windows_label_the_gold_text(tokenizer, train_rows):
    """Every labelled window decodes through its offsets to exactly the gold answer; none is lost."""
    rows = train_rows[:40]
    cols, enc = _decode_labels(tokenizer, rows, 128, 48)  # short windows force many stride splits
    assert len(cols["input_ids"]) > len(rows)
    found = set()
    for i, (s, e) in enumerate(zip(cols["start_positions"], cols["end_positions"])):
        row = rows[enc["example_index"][i]]
        if s == 0 and e == 0:
            continue
        offsets = enc["offset_mapping"][i]
        assert row["context"][offsets[s][0]:offsets[e][1]] == row["answers"]["text"][0], row["id"]
        found.add(row["id"])
    assert found == {r["id"] for r in rows}


def test_windows_are_not_padded(tokenizer, train_rows):
    cols = train_features(tokenizer, train_rows[:20], 384, 128)
    lengths = {len(ids) for ids in cols["input_ids"]}
    assert len(lengths) > 1 and max(lengths) <= 384


def test_leading_whitespace_in_question_is_stripped(tokenizer, train_rows):
    row = dict(train_rows[0], question=" " * 5000 + train_rows[0]["question"])
    cols = train_features(tokenizer, [row], 384, 128)
    assert (cols["start_positions"][0], cols["end_positions"][0]) == tuple(
        train_features(tokenizer, [train_rows[0]], 384, 128)[k][0] for k in ("start_positions", "end_positions"))
