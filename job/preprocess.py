"""Preprocess: every row's stride windows and span labels, as Arrow tables, built in parallel and cached.

The windows and labels themselves are ``job.squad.features`` (pure). Here they are computed
``job.squad.features.CHUNK`` rows at a time, read from the split's memory-mapped rows, by forked
worker processes (``job.runtime.parallel``), each chunk turned into an Arrow table where it was computed
and appended to the split's Parquet file as it comes (``write_features``: never a whole split's
features in memory), and the two splits cached in the run's storage (``job.store.feature_cache``):
a resumed run on a fresh machine downloads them instead of tokenizing again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from job.runtime import recipe
from job.errors import DataError
from job.runtime.parallel import map_chunks
from job.rows import chunk
from job.squad import features
from job.store import feature_cache
from job.store.files import writing

log = logging.getLogger(__name__)
# Past this many workers the gain is small (the rows are copied into each, the parent merges
# alone) and a shared node's other tenants lose their cores.
MAX_PREPROCESS_WORKERS = 8


@dataclass
class Features:
    train: object  # datasets.Dataset
    eval: object  # datasets.Dataset
    cache_key: str
    cache_hit: str  # "local", "remote" or "miss"


def build_features(settings, tokenizer, train, evals, store, is_writer: bool) -> Features:
    """Load the features from the local or remote cache, or tokenize and cache them."""
    key = feature_cache.cache_key(tokenizer, settings.model_name, train.sha256, evals.sha256, settings)
    local = Path(settings.work_dir) / settings.run_id / "features" / key
    remote = f"cache/features-{key}/"
    hit, loaded = "miss", None
    if feature_cache.verified(local):
        hit, loaded = "local", feature_cache.read(local)
    if loaded is None and store is not None and feature_cache.download(store, remote, local):
        hit, loaded = "remote", feature_cache.read(local)
    if loaded is None:
        hit = "miss"
        _build(settings, tokenizer, train, evals, local)
        if store is not None and is_writer:
            feature_cache.upload(store, local, remote)
        loaded = feature_cache.read(local)
        if loaded is None:
            raise DataError(f"the features just built in {local} cannot be read back")
    train_ds, eval_ds = loaded
    if len(train_ds) == 0:
        raise DataError("no training windows produced: check QA_MAX_LENGTH and the data")
    log.info("features ready", extra={"event": "features", "cache": hit, "cache_key": key,
                                       "train_windows": len(train_ds), "eval_windows": len(eval_ds)})
    return Features(train_ds, eval_ds, key, hit)


def _build(settings, tokenizer, train, evals, local: Path) -> None:
    local.mkdir(parents=True, exist_ok=True)
    (local / feature_cache.MANIFEST).unlink(missing_ok=True)
    workers = preprocess_workers(settings)  # the same features whatever the count (tests/test_preprocess.py)
    for kind, split, name in (("train", train, feature_cache.NAMES[0]), ("eval", evals, feature_cache.NAMES[1])):
        with writing(local / name) as tmp:  # removed if the disk fills up: it would only eat the next attempt's space
            write_features(kind, tokenizer, split.rows, settings.max_length, settings.doc_stride, workers, tmp)
    feature_cache.write_manifest(local)


def write_features(kind: str, tokenizer, rows, max_length: int, stride: int, workers: int, path: Path) -> int:
    """``feature_dataset``'s table written to the Parquet file ``path`` a chunk at a time; the number of windows.

    Each chunk's windows are written as they come, in order, and dropped: the features of a
    whole split are never in memory at once. Reading the file back gives the same table, row for
    row and type for type, as ``feature_dataset``.
    """
    import pyarrow.parquet as pq

    writer, windows = None, 0
    try:
        for table in _chunk_tables(kind, tokenizer, rows, max_length, stride, workers):
            if writer is None:
                writer = pq.ParquetWriter(str(path), table.schema)  # the first chunk's schema carries the column types
            writer.write_table(table)
            windows += table.num_rows
        if writer is None:  # no rows: the empty table, as feature_dataset has it
            _empty(kind, tokenizer).to_parquet(str(path))
    finally:
        if writer is not None:
            writer.close()
    return windows


def feature_dataset(kind: str, tokenizer, rows: Sequence[dict], max_length: int, stride: int, workers: int = 1):
    """``train_features`` or ``eval_features`` (``kind`` "train"/"eval") of every row, as a ``datasets.Dataset``.

    ``rows`` is a split's Arrow table (``job.rows``) or a list of row dicts. ``features.CHUNK``
    rows at a time, by ``workers`` processes (one = in this process). Every chunk is turned into
    an Arrow table where it was computed: the parent only concatenates them, and holds compact
    arrays instead of millions of Python ints. The result is the same, row for row and type for
    type, as ``Dataset.from_dict`` of the whole ``*_features`` output, whatever ``workers``.
    The whole table is in memory: for a split of any size, ``write_features``.
    """
    import datasets

    tables = list(_chunk_tables(kind, tokenizer, rows, max_length, stride, workers))
    if not tables:
        return _empty(kind, tokenizer)
    return datasets.concatenate_datasets([datasets.Dataset(t) for t in tables])


def _chunk_tables(kind: str, tokenizer, rows, max_length: int, stride: int, workers: int):
    """Each chunk's features as an Arrow table, in row order (forked workers inherit the memory-mapped rows)."""
    return map_chunks(_chunk_table, range(0, len(rows), features.CHUNK), workers, tokenizer, rows,
                      kind=kind, max_length=max_length, stride=stride)


def _chunk_table(tokenizer, rows, begin: int, kind: str, max_length: int, stride: int):
    import datasets

    part = chunk(rows, begin, features.CHUNK)
    if kind == "train":
        columns = features.train_features(tokenizer, part, max_length, stride)
    else:
        columns = features.eval_features(tokenizer, part, max_length, stride)
        columns["example_index"] = [begin + i for i in columns["example_index"]]  # chunk row -> dataset row
    return datasets.Dataset.from_dict(columns).data.table


def _empty(kind: str, tokenizer):
    import datasets

    return datasets.Dataset.from_dict(_empty_columns(kind, tokenizer))


def _empty_columns(kind: str, tokenizer) -> dict[str, list]:
    extra = ("start_positions", "end_positions") if kind == "train" else ("example_index", "offset_mapping")
    return {name: [] for name in (*tokenizer.model_input_names, *extra)}


def preprocess_workers(settings) -> int:
    """``QA_PREPROCESS_WORKERS``, or the usable CPUs up to MAX_PREPROCESS_WORKERS."""
    return settings.preprocess_workers or min(recipe.usable_cpus(), MAX_PREPROCESS_WORKERS)
