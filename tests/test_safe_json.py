"""JSON from storage and data files: one bounded parser, so a hostile object is "malformed", never a RecursionError."""
import ast
import json
from pathlib import Path

import pytest

from job import safe_json
from job.errors import DataError

DEEP = ('{"a":' * 100_000 + "1" + "}" * 100_000).encode()  # RecursionError in json.loads: exit 1 everywhere
DEEP_LIST = b"[" * 100_000 + b"]" * 100_000
JOB = Path(__file__).resolve().parents[1] / "job"


@pytest.mark.parametrize("raw", [DEEP, DEEP_LIST, b"[" * 65 + b"]" * 65, b'{"a": [' * 40 + b"1" + b"]}" * 40])
def test_too_deep_is_unparsable_not_a_recursion_error(raw):
    with pytest.raises(safe_json.Unparsable, match="nested deeper than 64 levels"):
        safe_json.loads(raw)


@pytest.mark.parametrize("raw, expected", [
    (b"[" * 64 + b"]" * 64, 64), (b'{"s": "[[[[[[{{{{{{"}', 1), (b"3", 0), (b'[{"a": [1, {"b": []}]}]', 5),
])
def test_depth_counts_containers_not_brackets_in_strings(raw, expected):
    assert safe_json.depth(safe_json.loads(raw), 100) == expected


def test_not_json_and_too_big_are_value_errors():
    for raw in (b"{", b"\xff\xfe", b""):
        with pytest.raises(ValueError, match="not valid JSON"):
            safe_json.loads(raw)
    with pytest.raises(ValueError, match="larger than 10 bytes"):
        safe_json.loads(b'"0123456789"', max_bytes=10)
    assert safe_json.loads(b'"' + b"x" * 100 + b'"', max_bytes=None) == "x" * 100


def test_every_json_the_job_reads_goes_through_the_bounded_parser():
    """A reader added later with json.loads would bring the RecursionError back: only the demo reads its own output."""
    offenders = []
    for path in sorted(JOB.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("loads", "load") and isinstance(node.value, ast.Name)
                    and node.value.id == "json"):
                offenders.append(path.relative_to(JOB).as_posix())
    assert offenders == ["demo.py", "safe_json.py"], offenders


def test_the_readers_treat_a_deep_object_as_unusable(tmp_path):
    """Lease, commit marker, cache manifest, run record, a channel's runs/starts records, published metrics."""
    from job.channels import promotion
    from job.channels.channel import Channel
    from job.channels.pointer import published_run
    from job.errors import ConfigError
    from job.publish import run_record
    from job.store import checkpoints, feature_cache, lease
    from job.store.storage import LocalStorage

    assert lease._parse(DEEP) == {}  # a lease that does not parse is watched for a TTL, as any unreadable one
    with pytest.raises(ValueError):
        checkpoints.read_marker(DEEP, 4)  # the checkpoint is skipped
    assert feature_cache._listed(DEEP, feature_cache.FEATURES) is None  # the cache is rebuilt
    store = LocalStorage(tmp_path / "out")
    store.put_bytes("r/run.json", DEEP)
    assert run_record(LocalStorage(tmp_path / "out" / "r")) == {}
    for key in ("channels/prod/runs/r.json", "channels/prod/starts/r.json"):
        store.put_bytes(key, DEEP)
    channel = Channel(store, "prod")
    assert channel.run_record("r") is None and channel.gated_runs() == [] and channel.starts() == {}
    assert promotion._read_json(store, "r/run.json") is None
    with pytest.raises(DataError, match="is not JSON"):
        promotion._predictions(store, "r/run.json", "r")
    for name in ("COMPLETE", "model/config.json", "metrics.json"):
        store.put_bytes(f"r/{name}", DEEP if name == "metrics.json" else b"{}")
    with pytest.raises(ConfigError, match="is not JSON: nothing was moved"):
        published_run(store, "r")


@pytest.mark.parametrize("name, body", [
    ("train.jsonl", DEEP + b"\n"),
    ("train.json", DEEP),
    ("train.csv", b"id,question,context,answers\nq1,what,ctx," + json.dumps(DEEP.decode()).encode() + b"\n"),
])
def test_a_deep_data_file_is_a_data_error(tmp_path, name, body):
    from job.formats import read_rows, validated

    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(DataError) as info:
        list(validated(read_rows(path, str(path)), str(path), False))
    assert info.value.exit_code == 3 and name in str(info.value)
