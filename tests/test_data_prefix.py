"""Data that grows: a folder or s3:// prefix is every supported file under it, in key order, as one split."""
import json
import logging
import shutil

import pytest

from job.data import load_split
from job.errors import DataError
from job.settings import load_settings
from job.store.storage import RetryPolicy
from tests.conftest import DATA

ROWS = [json.loads(line) for line in (DATA / "squad_v1_train_64.jsonl").read_text().splitlines()]


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(params=["local", "s3"])
def prefix(request, tmp_path, monkeypatch):
    """(put(key, bytes), delete(key), uri, settings env) for a local folder or an s3:// prefix."""
    if request.param == "local":
        folder = tmp_path / "drops"
        folder.mkdir()

        def put(key, data):
            (folder / key).parent.mkdir(parents=True, exist_ok=True)
            (folder / key).write_bytes(data)

        return put, lambda key: (folder / key).unlink(), str(folder), {}
    bucket = request.getfixturevalue("s3_bucket")
    for k, v in bucket.env.items():
        monkeypatch.setenv(k, v)

    def put_s3(key, data):
        bucket.client.put_object(Bucket=bucket.name, Key=f"drops/{key}", Body=data)

    return (put_s3, lambda key: bucket.client.delete_object(Bucket=bucket.name, Key=f"drops/{key}"),
            f"s3://{bucket.name}/drops/", {"QA_S3_ENDPOINT_URL": bucket.endpoint})


def load(uri, tmp_path, env):
    settings = load_settings({"QA_TRAIN_URI": uri, "QA_WORK_DIR": str(tmp_path / "work"), **env})
    return load_split("train", settings, RetryPolicy(attempts=2, backoff_seconds=0.1))


def test_every_file_in_key_order_skipping_what_is_not_data(prefix, tmp_path, caplog):
    put, delete, uri, env = prefix
    put("2026-11-02/part-1.jsonl", jsonl(ROWS[10:20]))
    put("2026-11-01/part-0.jsonl", jsonl(ROWS[:10]))
    put("2026-11-01/_SUCCESS", b"")
    with caplog.at_level(logging.INFO, logger="job.data"):
        split = load(uri, tmp_path, env)
    assert [r["id"] for r in split.rows] == [r["id"] for r in ROWS[:20]]
    assert [f.key for f in split.files] == ["2026-11-01/part-0.jsonl", "2026-11-02/part-1.jsonl"]
    skipped = [r for r in caplog.records if getattr(r, "event", "") == "data_files_skipped"]
    assert skipped and skipped[0].files == ["2026-11-01/_SUCCESS"]

    put("2026-11-03/part-2.jsonl", jsonl(ROWS[20:30]))  # tonight's drop: new data, new digest
    grown = load(uri, tmp_path, env)
    assert len(grown.rows) == 30 and grown.sha256 != split.sha256
    delete("2026-11-03/part-2.jsonl")
    assert load(uri, tmp_path, env).sha256 == split.sha256
    put("2026-11-02/part-1.jsonl", jsonl(ROWS[10:19]))  # a file changed in place
    assert load(uri, tmp_path, env).sha256 != split.sha256


def test_a_renamed_file_is_new_data(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, name in ((a, "x.jsonl"), (b, "y.jsonl")):
        folder.mkdir()
        (folder / name).write_bytes(jsonl(ROWS[:5]))
    assert load(str(a), tmp_path, {}).sha256 != load(str(b), tmp_path, {}).sha256


def test_a_duplicate_id_across_files_names_both(prefix, tmp_path):
    put, _, uri, env = prefix
    put("a.jsonl", jsonl(ROWS[:5]))
    put("b.jsonl", jsonl(ROWS[4:8]))
    with pytest.raises(DataError) as info:
        load(uri, tmp_path, env)
    message = str(info.value)
    assert f"row {ROWS[4]['id']!r}: duplicate id" in message and "a.jsonl" in message and "b.jsonl" in message


def test_a_bad_row_names_its_file(prefix, tmp_path):
    put, _, uri, env = prefix
    put("a.jsonl", jsonl(ROWS[:3]))
    put("b.jsonl", jsonl([{**ROWS[5], "question": ""}]))
    with pytest.raises(DataError, match=r"b\.jsonl: row .*missing or empty field 'question'"):
        load(uri, tmp_path, env)


def test_only_unsupported_files_is_a_data_error(prefix, tmp_path):
    put, _, uri, env = prefix
    put("_SUCCESS", b"")
    put("notes.txt", b"not data")
    with pytest.raises(DataError) as info:
        load(uri, tmp_path, env)
    assert info.value.exit_code == 3 and "no data files under this prefix" in str(info.value) and "_SUCCESS" in str(info.value)


def test_a_single_file_uri_is_unchanged(tmp_path):
    path = tmp_path / "train.jsonl"
    shutil.copy(DATA / "squad_v1_train_64.jsonl", path)
    split = load(str(path), tmp_path, {})
    import hashlib

    assert split.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and split.files == ()
