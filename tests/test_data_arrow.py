"""Rows in Arrow, read chunk by chunk: the features are today's, and a bad row still names its file and row.

"Today's" is the path before rows were kept in Arrow: every file read into a list of dicts
(``read_rows`` + ``validate_rows``), the lists joined, and ``Dataset.from_dict`` of
``train_features`` / ``eval_features`` over all of them at once.
"""
import json

import pandas as pd
import pytest

from job.data import first_duplicate, load_split, read_rows, validate_rows
from job.errors import DataError
from job.settings import load_settings
from job.store.storage import RetryPolicy
from tests.conftest import DATA

ROWS = [json.loads(line) for line in (DATA / "squad_v1_train_64.jsonl").read_text().splitlines()]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows (reading, writing, tokenizing): 64 rows cross many chunk and file boundaries."""
    import job.data
    import job.formats
    import job.squad.features

    for module, name in ((job.data, "CHUNK"), (job.formats, "_BATCH"), (job.squad.features, "CHUNK")):
        monkeypatch.setattr(module, name, 7)


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def flat(rows):
    return pd.DataFrame([{"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
                          "answer_text": r["answers"]["text"][0], "answer_start": r["answers"]["answer_start"][0]} for r in rows])


def drops(folder, rows=ROWS):
    """The rows over three files of three formats, in key order."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jsonl").write_text(jsonl(rows[:30]))
    flat(rows[30:50]).to_parquet(folder / "b.parquet")
    flat(rows[50:]).to_csv(folder / "c.csv", index=False)
    return folder


def load(uri, tmp_path, **env):
    settings = load_settings({"QA_TRAIN_URI": str(uri), "QA_WORK_DIR": str(tmp_path / "work"), **env})
    return load_split("train", settings, RetryPolicy(attempts=1))


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_features_from_arrow_rows_are_todays(tokenizer, tmp_path, small_chunks, kind):
    import datasets

    from job.preprocess import write_features
    from job.squad.features import eval_features, train_features

    folder = drops(tmp_path / "drops")
    split = load(folder, tmp_path)
    assert isinstance(split.rows, datasets.Dataset) and split.rows.cache_files  # memory-mapped from the work dir
    today_rows = [r for name in ("a.jsonl", "b.parquet", "c.csv")
                  for r in validate_rows(read_rows(folder / name, name), name, squad_v2=False)]
    assert [r for r in split.rows] == today_rows
    reference = datasets.Dataset.from_dict((train_features if kind == "train" else eval_features)(tokenizer, today_rows, 128, 48))
    for workers in (1, 2):
        path = tmp_path / f"{kind}-{workers}.parquet"
        windows = write_features(kind, tokenizer, split.rows, 128, 48, workers, path)
        got = datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "hf"))
        assert windows == len(reference) > len(ROWS)
        assert got.features == reference.features, workers
        assert got.data.table.equals(reference.data.table), workers  # same windows, labels, order, types


def test_max_train_samples_keeps_the_first_rows_in_key_order_and_checks_them_all(tmp_path, small_chunks):
    folder = drops(tmp_path / "drops")
    split = load(folder, tmp_path, QA_MAX_TRAIN_SAMPLES="33")
    assert [r["id"] for r in split.rows] == [r["id"] for r in ROWS[:33]]
    (folder / "c.csv").write_text("id,context,question,answer_text,answer_start\nZ,Paris,Where?,Rome,0\n")
    with pytest.raises(DataError, match=r"c\.csv: row 'Z': answer_start 0 does not match"):
        load(folder, tmp_path, QA_MAX_TRAIN_SAMPLES="33")  # a bad row past the cap is still a data error


@pytest.mark.parametrize("name, write", [
    ("big.jsonl", lambda p, rows: p.write_text(jsonl(rows))),
    ("big.parquet", lambda p, rows: flat(rows).to_parquet(p)),
    ("big.csv", lambda p, rows: flat(rows).to_csv(p, index=False)),
])
def test_a_bad_row_deep_in_a_file_names_the_file_and_row(tmp_path, small_chunks, name, write):
    rows = [dict(r) for r in ROWS]
    rows[45] = {**rows[45], "question": "   "}
    write(tmp_path / name, rows)
    with pytest.raises(DataError) as info:
        load(tmp_path / name, tmp_path)
    assert str(info.value) == f"{tmp_path / name}: row {ROWS[45]['id']!r}: missing or empty field 'question'"


def test_a_row_without_id_is_named_by_its_number_in_its_file(tmp_path, small_chunks):
    rows = [dict(r) for r in ROWS[:40]]
    rows[22] = {k: v for k, v in rows[22].items() if k != "id"}
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text(jsonl(ROWS[40:]))
    (tmp_path / "d" / "b.jsonl").write_text(jsonl(rows))
    with pytest.raises(DataError, match=r"b\.jsonl: row #23: missing or empty field 'id'"):
        load(tmp_path / "d", tmp_path)


@pytest.mark.parametrize("second, needle", [
    ("a.jsonl", "a.jsonl: row {id!r}: duplicate id"),  # the same file, chunks apart
    ("b.jsonl", "b.jsonl: row {id!r}: duplicate id, also in {folder}/a.jsonl"),
])
def test_repeated_ids_are_found_across_chunks_and_files(tmp_path, small_chunks, second, needle):
    folder = tmp_path / "d"
    folder.mkdir()
    a = ROWS[:30] + ([ROWS[3]] if second == "a.jsonl" else [])
    (folder / "a.jsonl").write_text(jsonl(a))
    (folder / "b.jsonl").write_text(jsonl(ROWS[30:50] + ([ROWS[3]] if second == "b.jsonl" else []) + [ROWS[60], ROWS[60]]))
    with pytest.raises(DataError) as info:
        load(folder, tmp_path)
    assert str(info.value) == f"{folder}/" + needle.format(id=ROWS[3]["id"], folder=folder)  # the first repeat in reading order


def test_hash_collisions_are_not_duplicates():
    from array import array

    ids = ["a", "b", "c", "b", "a"]
    assert first_duplicate(array("q", [1, 2, 3, 2, 1]), lambda at: [ids[i] for i in at]) == (1, 3)
    assert first_duplicate(array("q", [7, 7, 7]), lambda at: [["x", "y", "z"][i] for i in at]) is None  # one hash, three ids
    assert first_duplicate(array("q", [5]), lambda at: []) is None
    assert first_duplicate(array("q"), lambda at: []) is None
