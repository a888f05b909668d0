"""Which rows each shard and chunk holds, what a prediction line says, and the marker that commits a chunk.

Pure functions of their arguments (no storage, no model): the plan a rerun must find again, and
the strict reading of a marker found in storage (nothing read from storage is trusted).

The rows of the input, in reading order, are cut into ``shards`` contiguous ranges of as equal
a size as they can be; each shard's range into chunks of ``chunk_rows``. Concatenating shard 0's
chunks, then shard 1's, ... gives every row once, in input order.
"""
from __future__ import annotations

import hashlib
import math
import re

from job import safe_json
from job.observe.redaction import artifact_json

CHUNK_NAME = re.compile(r"chunk-(\d{6})\.json")
_DATA_NAME = "chunk-{:06d}-{}.jsonl"
_TOKEN = re.compile(r"[0-9a-f]{12}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MARKER_FIELDS = {"chunk", "first_row", "rows", "key", "size", "sha256"}


def shard_rows(total: int, shard: int, shards: int) -> range:
    """Row positions of ``shard`` of ``shards``: contiguous, sizes differing by one at most, every row in one."""
    return range(shard * total // shards, (shard + 1) * total // shards)


def chunk_ranges(rows: range, chunk_rows: int) -> list[range]:
    """A shard's rows in chunks of ``chunk_rows`` (the last one shorter), in order."""
    return [range(begin, min(begin + chunk_rows, rows.stop)) for begin in range(rows.start, rows.stop, chunk_rows)]


def marker_key(chunk: int) -> str:
    return f"chunk-{chunk:06d}.json"


def data_key(chunk: int, token: str) -> str:
    """The chunk's lines as one writer wrote them: a writer's own name, so no writer overwrites what another committed."""
    return _DATA_NAME.format(chunk, token)


def marker(chunk: int, rows: range, key: str, data: bytes) -> dict:
    return {"chunk": chunk, "first_row": rows.start, "rows": len(rows), "key": key, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def read_marker(raw: bytes, chunk: int, rows: range) -> dict | None:
    """The marker of ``chunk`` if it is exactly what ``marker`` writes for these rows, else None."""
    try:
        value = safe_json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict) or set(value) != MARKER_FIELDS:
        return None
    key, numbers = value["key"], (value["chunk"], value["first_row"], value["rows"], value["size"])
    ok = (all(type(n) is int for n in numbers) and numbers[:3] == (chunk, rows.start, len(rows)) and value["size"] >= 0
          and isinstance(key, str) and _TOKEN.fullmatch(key[-18:-6]) and key == data_key(chunk, key[-18:-6])
          and isinstance(value["sha256"], str) and _SHA256.fullmatch(value["sha256"]))
    return value if ok else None


def prediction(rid: str, answer, text: str, version_2: bool) -> dict:
    """One line of the output: the answer, its character offsets (-1 when empty), its score, and under SQuAD v2
    how much the model prefers no answer.

    ``answer`` is the best span (a ``job.squad.decoding.Answer``) and ``text`` what evaluation answers
    with it: the span, or under v2 "" when the null difference exceeds the threshold.
    ``null_score_diff`` is that difference (the null score minus the best span's), and
    ``no_answer_probability`` its logistic: the model's probability of "no answer" against the best span
    alone, a softmax over those two. Infinite scores (no span qualified) are written as null.
    """
    start, end = (answer.start, answer.end) if text else (-1, -1)
    line = {"id": rid, "answer": text, "start": start, "end": end, "score": _finite(answer.score)}
    if version_2:
        diff = answer.null_score - answer.score
        diff = math.inf if diff != diff else diff  # no span at all: -inf score, nothing to prefer over "no answer"
        line["no_answer_probability"] = _logistic(diff)
        line["null_score_diff"] = _finite(diff)
    return line


def lines(predictions: list[dict]) -> bytes:
    """JSON Lines, one prediction per line, in the order given; the same predictions give the same bytes."""
    return b"".join(artifact_json(p, ensure_ascii=False) + b"\n" for p in predictions)


def new_token(seed: str) -> str:
    """A writer's 12-hex-digit name for its chunk objects."""
    return hashlib.sha256(seed.encode()).hexdigest()[:12]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None  # JSON has no infinity


def _logistic(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x)) if x != math.inf else 1.0
    return math.exp(x) / (1.0 + math.exp(x)) if x != -math.inf else 0.0
