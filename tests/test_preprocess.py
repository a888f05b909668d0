"""Preprocessing: every row's windows and labels as Arrow tables, the same whatever the number of workers."""
import pytest

from job.preprocess import feature_dataset
from job.squad.features import eval_features, train_features


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 10 rows, so the 64 test rows make 7 chunks and two workers really share them."""
    import job.squad.features

    monkeypatch.setattr(job.squad.features, "CHUNK", 10)


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

    caplog.set_level(logging.INFO, logger="job.runtime.parallel")
    feature_dataset("train", tokenizer, train_rows[:30], 128, 48, workers=2)
    lines = [r for r in caplog.records if getattr(r, "event", None) == "preprocess"]
    assert len(lines) == 1 and (lines[0].workers, lines[0].chunks) == (2, 3)


def test_cache_key_does_not_depend_on_workers(tokenizer):
    from job.settings import load_settings
    from job.store.feature_cache import cache_key

    keys = {cache_key(tokenizer, "m", "a", "b", load_settings({"QA_PREPROCESS_WORKERS": w})) for w in ("1", "2", "8")}
    assert len(keys) == 1


def test_default_workers_are_the_usable_cpus_capped(monkeypatch):
    import job.runtime.recipe
    from job.preprocess import MAX_PREPROCESS_WORKERS, preprocess_workers
    from job.settings import load_settings

    for cpus, expected in ((1, 1), (2, 2), (64, MAX_PREPROCESS_WORKERS)):
        monkeypatch.setattr(job.runtime.recipe, "usable_cpus", lambda: cpus)
        assert preprocess_workers(load_settings({})) == expected
    assert preprocess_workers(load_settings({"QA_PREPROCESS_WORKERS": "3"})) == 3


def test_a_full_disk_leaves_no_temporary_feature_file(tokenizer, train_rows, tmp_path, monkeypatch):
    """Each attempt that ran out of space once left its .train.parquet.<pid>.tmp: the space the next attempt needed."""
    import errno
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    from job.preprocess import _build
    from job.settings import load_settings

    written = pq.ParquetWriter.write_table

    def fill_the_disk(self, table, *args, **kwargs):
        written(self, table, *args, **kwargs)  # part of the file made it, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", fill_the_disk)
    settings = load_settings({"QA_MAX_LENGTH": "128", "QA_DOC_STRIDE": "48", "QA_PREPROCESS_WORKERS": "1"})
    rows = SimpleNamespace(rows=train_rows[:8])
    with pytest.raises(OSError) as info:
        _build(settings, tokenizer, rows, rows, tmp_path / "features")
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == []
