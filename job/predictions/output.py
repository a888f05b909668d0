"""The predictions in storage: a shard's chunks, each written whole then committed by a marker, and the merge.

Under ``QA_PREDICT_OUTPUT_URI``::

    predict.json                          what the predictions are made of (job.predictions.binding)
    shards/<i>-of-<n>/chunk-<k>-<w>.jsonl a chunk's lines as writer <w> wrote them
    shards/<i>-of-<n>/chunk-<k>.json      the chunk's marker: rows, the object above, size, sha256
    shards/<i>-of-<n>/COMPLETE            the shard's chunks are all committed
    shards/<i>-of-<n>/lease.json          the shard's lease while a pod works on it
    predictions.jsonl                     every shard's chunks in order: one line per input row
    metrics.json                          EM/F1 when the input has gold answers
    COMPLETE                              written last: rows, chunks, the file's sha256, the scores

A chunk counts once its marker exists, and a marker is created, never replaced
(``IfNoneMatch``): each chunk is committed exactly once, whatever crashed or ran twice. A chunk's
lines are written under the writer's own name, so a writer that lost its lease can never
overwrite lines another writer committed; objects no marker names are deleted when the shard
completes. Markers are read strictly (``job.predictions.chunks.read_marker``), and the merge
checks every chunk's size and sha256 against its marker before a byte of it reaches the file.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

from job import safe_json
from job.errors import DataError
from job.observe.redaction import artifact_json
from job.predictions.chunks import CHUNK_NAME, chunk_ranges, data_key, marker, marker_key, read_marker, shard_rows
from job.rows import SCORED, chunk
from job.squad.metrics import ScoreTotals
from job.store.storage import NotFound, PreconditionFailed, sha256_file

log = logging.getLogger(__name__)
SHARDS = "shards/"
DONE = "COMPLETE"
MERGED = "predictions.jsonl"
METRICS = "metrics.json"


def shard_prefix(shard: int, shards: int) -> str:
    return f"{SHARDS}{shard:05d}-of-{shards:05d}"


class ShardOutput:
    """One shard's chunks in its folder; ``store`` is that folder's storage, fenced by the shard's lease."""

    def __init__(self, store, total_rows: int, shard: int, shards: int, chunk_rows: int, token: str):
        self.store, self.token = store, token
        self.plan = chunk_ranges(shard_rows(total_rows, shard, shards), chunk_rows)

    def committed(self) -> dict[int, dict]:
        """``{chunk: marker}`` of every committed chunk; a marker that is not what this plan commits is exit 3."""
        return committed_markers(self.store, self.plan)

    def put_chunk(self, index: int, data: bytes) -> str:
        """Write the chunk's lines whole, under this writer's name; it counts only once ``commit_chunk`` ran."""
        key = data_key(index, self.token)
        self.store.put_bytes(key, data)
        return key

    def commit_chunk(self, index: int, key: str, data: bytes) -> bool:
        """Create the chunk's marker; False when another writer's marker was there first (its lines count)."""
        record = marker(index, self.plan[index], key, data)
        try:
            self.store.put_bytes(marker_key(index), artifact_json(record), if_none_match=True)
            return True
        except PreconditionFailed:
            raw, _ = self.store.get_bytes(marker_key(index))
            if read_marker(raw, index, self.plan[index]) is None:
                raise DataError(f"{self.store.uri}/{marker_key(index)} is not a marker job.predict writes; delete it "
                                "(and its chunk) and rerun to predict that chunk again") from None
            log.warning("chunk already committed by another writer; keeping its lines", extra={
                "event": "chunk_taken", "chunk": index})
            self.store.delete(key)
            return False

    def is_complete(self) -> bool:
        try:
            self.store.get_bytes(DONE)
            return True
        except NotFound:
            return False

    def complete(self) -> None:
        """Every chunk is committed: delete lines no marker names (killed attempts'), then mark the shard done."""
        kept = {m["key"] for m in self.committed().values()}
        if len(kept) != len(self.plan):
            raise DataError(f"{self.store.uri}: {len(self.plan) - len(kept)} chunk(s) not committed")
        for key in self.store.list(""):
            if key.startswith("chunk-") and key.endswith(".jsonl") and key not in kept:
                self.store.delete(key)
        rows = sum(len(r) for r in self.plan)
        self.store.put_bytes(DONE, artifact_json({"chunks": len(self.plan), "rows": rows}))


def committed_markers(store, plan: list[range]) -> dict[int, dict]:
    found = {}
    for key in store.list(""):
        m = CHUNK_NAME.fullmatch(key)
        if not m:
            continue
        index = int(m.group(1))
        raw, _ = store.get_bytes(key)
        value = read_marker(raw, index, plan[index]) if index < len(plan) else None
        if value is None:
            raise DataError(f"{store.uri}/{key} is not a marker of these predictions; delete it (and its chunk) and "
                            "rerun to predict that chunk again")
        found[index] = value
    return found


def shards_complete(root) -> int:
    """How many shards have their ``COMPLETE``."""
    return sum(1 for key in root.list(SHARDS) if key.endswith("/" + DONE))


def is_complete(root) -> bool:
    try:
        root.get_bytes(DONE)
        return True
    except NotFound:
        return False


def merge(root, open_shard, rows, total_rows: int, shards: int, chunk_rows: int, version_2: bool, stop_check) -> dict:
    """``predictions.jsonl`` from every shard's committed chunks in order, each checked against its marker;
    then ``metrics.json`` (rows with gold answers) and ``COMPLETE``. Idempotent: two mergers write the same bytes.

    ``open_shard(i)`` is shard ``i``'s storage; ``rows`` the input's rows, for the gold answers.
    """
    totals, scored, chunks = ScoreTotals(version_2), 0, 0
    gold_rows = rows if isinstance(rows, list) else rows.select_columns(list(SCORED))  # never the contexts
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / MERGED
        with open(merged, "wb") as out:
            for shard in range(shards):
                store = open_shard(shard)
                plan = chunk_ranges(shard_rows(total_rows, shard, shards), chunk_rows)
                markers = committed_markers(store, plan)
                for index, part in enumerate(plan):
                    stop_check()
                    data = _verified(store, markers.get(index), index)
                    out.write(data)
                    chunks += 1
                    gold = [r for r in chunk(gold_rows, part.start, len(part)) if r["answers"] is not None]
                    if gold:
                        answers = {line["id"]: line["answer"] for line in map(safe_json.loads, data.splitlines())}
                        totals.add(gold, answers)
                        scored += len(gold)
        digest, size = sha256_file(merged), merged.stat().st_size
        root.put_file(merged, MERGED)
    scores = totals.scores() if scored else None
    if scores is not None:
        root.put_bytes(METRICS, artifact_json({**scores, "rows": total_rows}, indent=1))
    record = {"rows": total_rows, "shards": shards, "chunks": chunks, "file": MERGED, "size": size, "sha256": digest,
              "metrics": scores}
    try:
        root.put_bytes(DONE, artifact_json(record, indent=1), if_none_match=True)
    except PreconditionFailed:
        pass  # another shard merged the same chunks at the same time: the same bytes
    return record


def _verified(store, value: dict | None, index: int) -> bytes:
    if value is None:
        raise DataError(f"{store.uri}: chunk {index} has no marker although the shard is complete; delete the shard's "
                        "COMPLETE and rerun it")
    try:
        data, _ = store.get_bytes(value["key"])
    except NotFound:
        data = None
    if data is None or len(data) != value["size"] or hashlib.sha256(data).hexdigest() != value["sha256"]:
        raise DataError(f"{store.uri}/{value['key']}: missing or not what its marker {marker_key(index)} says; delete the "
                        "marker and the shard's COMPLETE, and rerun the shard to predict it again")
    return data
