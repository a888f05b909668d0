"""Span labelling: a pure function, table-driven, then checked on real windows."""
import pytest

from job.features import eval_features, feature_dataset, label_window, train_features

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


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 10 rows, so the 64 test rows make 7 chunks and two workers really share them."""
    import job.features

    monkeypatch.setattr(job.features, "CHUNK", 10)


@pytest.mark.parametrize("kind, serial", [("train", train_features), ("eval", eval_features)])
def test_parallel_preprocessing_equals_serial(tokenizer, train_rows, small_chunks, kind, serial):
    import datasets

    # today's path: one call over every row, then a Dataset; with stride splits across chunk boundaries
    reference = datasets.Dataset.from_dict(serial(tokenizer, train_rows, 128, 48))
    for workers in (1, 2, 3):
        got = feature_dataset(kind, tokenizer, train_rows, 128, 48, workers=workers)
        assert got.features == reference.features, workers
        assert got.data.table.equals(reference.data.table), workers  # same rows, same order, same labels
    assert len(reference) > len(train_rows)


def test_preprocessing_logs_its_workers(tokenizer, train_rows, small_chunks, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="job.parallel")
    feature_dataset("train", tokenizer, train_rows[:30], 128, 48, workers=2)
    lines = [r for r in caplog.records if getattr(r, "event", None) == "preprocess"]
    assert len(lines) == 1 and (lines[0].workers, lines[0].chunks) == (2, 3)


def test_cache_key_does_not_depend_on_workers(tokenizer):
    from job.feature_cache import cache_key
    from job.settings import load_settings

    keys = {cache_key(tokenizer, "m", "a", "b", load_settings({"QA_PREPROCESS_WORKERS": w})) for w in ("1", "2", "8")}
    assert len(keys) == 1


def test_default_workers_are_the_usable_cpus_capped(monkeypatch):
    import job.recipe
    from job.features import MAX_PREPROCESS_WORKERS, preprocess_workers
    from job.settings import load_settings

    for cpus, expected in ((1, 1), (2, 2), (64, MAX_PREPROCESS_WORKERS)):
        monkeypatch.setattr(job.recipe, "usable_cpus", lambda: cpus)
        assert preprocess_workers(load_settings({})) == expected
    assert preprocess_workers(load_settings({"QA_PREPROCESS_WORKERS": "3"})) == 3
