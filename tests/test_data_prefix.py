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


def load_select(uri, tmp_path, env, select, pinned=None):
    settings = load_settings({"QA_TRAIN_URI": uri, "QA_WORK_DIR": str(tmp_path / "work"), "QA_TRAIN_SELECT": select, **env})
    return load_split("train", settings, RetryPolicy(attempts=2, backoff_seconds=0.1), pinned)


def test_selection_by_key(prefix, tmp_path):
    import datetime as dt

    put, _, uri, env = prefix
    today = dt.datetime.now(dt.timezone.utc).date()
    for ago, rows in ((0, ROWS[:5]), (1, ROWS[5:10]), (3, ROWS[10:15])):
        put(f"{today - dt.timedelta(days=ago)}/part.jsonl", jsonl(rows))
    put("_SUCCESS", b"")
    ids = lambda split: [r["id"] for r in split.rows]  # noqa: E731
    assert ids(load_select(uri, tmp_path, env, "newest:2")) == [r["id"] for r in ROWS[5:10] + ROWS[:5]]
    assert ids(load_select(uri, tmp_path, env, "days:2")) == [r["id"] for r in ROWS[5:10] + ROWS[:5]]
    assert ids(load_select(uri, tmp_path, env, "days:4")) == [r["id"] for r in ROWS[10:15] + ROWS[5:10] + ROWS[:5]]
    every = load_select(uri, tmp_path, env, "all")
    assert len(every.rows) == 15 and every.sha256 == load(uri, tmp_path, env).sha256  # "all" is the split as before


def test_selection_by_modification_time(prefix, request, tmp_path):
    """Files landed in another order than their keys: ``:modified`` follows the landing order."""
    import os
    import time

    put, _, uri, env = prefix
    put("b.jsonl", jsonl(ROWS[:5]))
    if request.node.callspec.params["prefix"] == "s3":
        time.sleep(1.1)  # S3 keeps LastModified in whole seconds
    put("a.jsonl", jsonl(ROWS[5:10]))
    if request.node.callspec.params["prefix"] == "local":
        old = time.time() - 3 * 86400
        os.utime(tmp_path / "drops" / "b.jsonl", (old, old))
    assert [f.key for f in load_select(uri, tmp_path, env, "newest:1:modified").files] == ["a.jsonl"]
    assert [f.key for f in load_select(uri, tmp_path, env, "newest:1").files] == ["b.jsonl"]
    if request.node.callspec.params["prefix"] == "local":  # an S3 object's LastModified cannot be set back
        assert [f.key for f in load_select(uri, tmp_path, env, "days:2:modified").files] == ["a.jsonl"]


def test_a_pinned_selection_reads_the_same_files_after_new_ones_land(prefix, tmp_path):
    put, _, uri, env = prefix
    put("1.jsonl", jsonl(ROWS[:5]))
    put("2.jsonl", jsonl(ROWS[5:10]))
    first = load_select(uri, tmp_path, env, "newest:1")
    record = json.loads(json.dumps({"train": first.pin}))  # as run.json holds it
    (f,) = record["train"]["files"]
    assert (f["key"], f["size"], record["train"]["select"]) == ("2.jsonl", len(jsonl(ROWS[5:10])), "newest:1")
    assert bool(f["etag"]) == uri.startswith("s3://")  # local files have no ETag
    put("3.jsonl", jsonl(ROWS[10:15]))  # tonight's drop lands while the run is preempted
    again = load_select(uri, tmp_path, env, "newest:1", pinned=record)
    assert (again.sha256, [r["id"] for r in again.rows]) == (first.sha256, [r["id"] for r in ROWS[5:10]])
    assert again.pin == first.pin
    assert [f.key for f in load_select(uri, tmp_path, env, "newest:1").files] == ["3.jsonl"]  # unpinned: tonight's
    put("2.jsonl", jsonl(ROWS[5:9]))  # the pinned file itself changed
    with pytest.raises(DataError) as info:
        load_select(uri, tmp_path, env, "newest:1", pinned=record)
    assert "2.jsonl: changed since this run's first attempt read it" in str(info.value) and info.value.exit_code == 3


def test_a_pin_for_eval_keeps_the_gate_on_the_scored_rows(tmp_path):
    """The gate re-reads the eval split of a complete run: from the files it pinned, not what landed since."""
    from job.channels.promotion import _eval_rows
    from job.publish import claim_run_folder
    from job.store.fingerprint import training_inputs
    from job.store.storage import LocalStorage

    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "a.jsonl").write_text(jsonl(ROWS[:6]).decode())
    settings = load_settings({"QA_EVAL_URI": str(folder), "QA_WORK_DIR": str(tmp_path / "work"), "QA_RUN_ID": "r1"})
    split = load_split("eval", settings, RetryPolicy(attempts=1))
    store = LocalStorage(tmp_path / "out" / "r1")
    claim_run_folder(store, settings, training_inputs(settings, "t", split.sha256), {"eval": split.pin})
    (folder / "b.jsonl").write_text(jsonl(ROWS[6:9]).decode())  # a new eval file after the run was scored
    assert [r["id"] for r in _eval_rows(settings, store)] == [r["id"] for r in ROWS[:6]]


def test_a_selection_needs_a_folder(tmp_path):
    from job.errors import ConfigError

    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(ROWS[:3]))
    with pytest.raises(ConfigError, match="QA_TRAIN_SELECT=newest:2: selects files of a folder or prefix"):
        load_select(str(path), tmp_path, {}, "newest:2")


def test_files_dated_in_the_future_are_skipped_and_said(prefix, tmp_path, caplog):
    """days:D kept a file dated 2099 every night: it is skipped, with a data_files_future event."""
    import datetime as dt

    put, delete, uri, env = prefix
    today = dt.datetime.now(dt.timezone.utc).date()
    put(f"{today}/part.jsonl", jsonl(ROWS[:5]))
    put("2099-01-01/part.jsonl", jsonl(ROWS[5:10]))
    with caplog.at_level(logging.WARNING, logger="job.data"):
        split = load_select(uri, tmp_path, env, "days:7")
    assert [f.key for f in split.files] == [f"{today}/part.jsonl"]
    (event,) = [r for r in caplog.records if getattr(r, "event", None) == "data_files_future"]
    assert event.files == ["2099-01-01/part.jsonl"] and event.count == 1 and event.select == "days:7"
    delete(f"{today}/part.jsonl")  # nothing left but the future: a data error that says why
    shutil.rmtree(tmp_path / "work", ignore_errors=True)
    with pytest.raises(DataError, match="dated after today"):
        load_select(uri, tmp_path, env, "newest:1")


def test_a_retry_reads_the_files_whose_keys_run_json_keeps_masked(prefix, tmp_path):
    """A credential in a data key is masked in run.json (job.observe.redaction.artifact_json); the retry finds the
    key each masked pin stands for by the listing, and reads the very files (sha256 checked) the first attempt read."""
    from job import safe_json
    from job.observe.redaction import artifact_json, register_secrets

    secret = "pin-Secret-Walrus-7361"
    register_secrets({"PIN_TEST_SECRET": secret})
    put, _, uri, env = prefix
    put(f"{secret}/1.jsonl", jsonl(ROWS[:5]))
    put(f"a-{secret}.jsonl", jsonl(ROWS[5:10]))
    put("b.jsonl", jsonl(ROWS[10:15]))
    first = load_select(uri, tmp_path, env, "all")
    record = safe_json.loads(artifact_json({"train": first.pin}))  # as run.json holds it
    assert secret not in json.dumps(record) and {f["key"] for f in record["train"]["files"]} == {
        "***/1.jsonl", "a-***.jsonl", "b.jsonl"}
    put("a.jsonl", jsonl(ROWS[15:20]))  # landed since: not read by the retry
    shutil.rmtree(tmp_path / "work")
    again = load_select(uri, tmp_path, env, "all", pinned=record)
    assert [f.key for f in again.files] == [f.key for f in first.files] and again.sha256 == first.sha256
    assert [r["id"] for r in again.rows] == [r["id"] for r in first.rows]
