"""A shard's chunks in storage: committed once, orphans removed, the merge checked against every marker."""
import json

import pytest

from job.errors import DataError
from job.predictions.chunks import lines
from job.predictions.output import ShardOutput, merge, shard_prefix
from job.store.storage import LocalStorage

ROWS = [{"id": f"q{i}", "answers": {"text": ["Denver"], "answer_start": [0]} if i % 2 else None} for i in range(6)]


def shard(root, token="0123456789ab", shard=0, shards=1) -> ShardOutput:
    return ShardOutput(LocalStorage(root / shard_prefix(shard, shards)), len(ROWS), shard, shards, 4, token)


def commit_all(out: ShardOutput, answer="Denver") -> None:
    for index, part in enumerate(out.plan):
        data = lines([{"id": ROWS[r]["id"], "answer": answer} for r in part])
        out.commit_chunk(index, out.put_chunk(index, data), data)
    out.complete()


def test_a_chunk_is_committed_once_and_a_second_writers_lines_go(tmp_path):
    first, second = shard(tmp_path), shard(tmp_path, token="ba9876543210")
    data = lines([{"id": "q0", "answer": "x"}])
    assert first.commit_chunk(0, first.put_chunk(0, data), data)
    assert not second.commit_chunk(0, second.put_chunk(0, b"other\n"), b"other\n")
    folder = tmp_path / shard_prefix(0, 1)
    assert sorted(p.name for p in folder.iterdir()) == ["chunk-000000-0123456789ab.jsonl", "chunk-000000.json"]
    assert first.committed()[0]["key"] == "chunk-000000-0123456789ab.jsonl"


def test_completing_a_shard_deletes_lines_no_marker_names(tmp_path):
    out = shard(tmp_path)
    out.put_chunk(1, b"a killed attempt's lines\n")  # written, never committed
    killed = shard(tmp_path, token="ffffffffffff")
    killed.put_chunk(0, b"another attempt's\n")
    commit_all(out)
    names = sorted(p.name for p in (tmp_path / shard_prefix(0, 1)).iterdir())
    assert names == ["COMPLETE", "chunk-000000-0123456789ab.jsonl", "chunk-000000.json",
                     "chunk-000001-0123456789ab.jsonl", "chunk-000001.json"]


def test_merge_is_every_shards_chunks_in_order_scored_on_the_rows_with_answers(tmp_path):
    for s in (0, 1):
        commit_all(ShardOutput(LocalStorage(tmp_path / shard_prefix(s, 2)), len(ROWS), s, 2, 2, "0123456789ab"))
    record = merge(LocalStorage(tmp_path), lambda s: LocalStorage(tmp_path / shard_prefix(s, 2)), ROWS, len(ROWS), 2, 2,
                   False, lambda: None)
    merged = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in merged] == [r["id"] for r in ROWS]
    assert record["metrics"] == {"exact_match": 100.0, "f1": 100.0, "total": 3}  # q1, q3, q5 have answers
    assert json.loads((tmp_path / "COMPLETE").read_text())["sha256"] == record["sha256"]


@pytest.mark.parametrize("tamper, needle", [
    (lambda folder: _replace(folder / "chunk-000001-0123456789ab.jsonl", "Denver", "Dallas"),  # same size
     "not what its marker chunk-000001.json says"),
    (lambda folder: (folder / "chunk-000001-0123456789ab.jsonl").unlink(), "missing or not what its marker"),
    (lambda folder: (folder / "chunk-000001.json").write_text('{"chunk": 1}'), "chunk-000001.json is not a marker"),
])
def test_a_chunk_or_marker_that_is_not_what_was_committed_stops_the_merge(tmp_path, tamper, needle):
    commit_all(shard(tmp_path))
    tamper(tmp_path / shard_prefix(0, 1))
    with pytest.raises(DataError, match=needle):
        merge(LocalStorage(tmp_path), lambda s: LocalStorage(tmp_path / shard_prefix(s, 1)), ROWS, len(ROWS), 1, 4,
              False, lambda: None)
    assert not (tmp_path / "COMPLETE").exists()


def _replace(path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))
