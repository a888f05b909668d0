"""Every input format reads to the same rows; bad data fails on the named file and row."""
import json

import pandas as pd
import pytest

from job.data import read_rows, validate_rows
from job.errors import DataError
from tests.conftest import DATA


def flat(rows):
    return [{"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
             "answer_text": r["answers"]["text"][0] if r["answers"]["text"] else "",
             "answer_start": r["answers"]["answer_start"][0] if r["answers"]["text"] else ""} for r in rows]


def check(rows, expected, squad_v2=False):
    got = validate_rows(rows, "x", squad_v2=squad_v2)
    assert [(r["id"], r["answers"]["text"][:1]) for r in got] == [(r["id"], r["answers"]["text"][:1]) for r in expected]


def test_jsonl(train_rows):
    check(read_rows(DATA / "squad_v1_train_64.jsonl", "f"), train_rows)


def test_nested_squad_v1_and_v2():
    v1 = read_rows(DATA / "squad_v1_dev_nested_small.json", "f")
    assert len(v1) > 10 and all(len(r["answers"]["text"]) >= 1 for r in v1)
    v2 = validate_rows(read_rows(DATA / "squad_v2_dev_nested_small.json", "f"), "f", squad_v2=True)
    assert any(not r["answers"]["text"] for r in v2) and any(r["answers"]["text"] for r in v2)


def test_parquet_hub_layout_and_flat(tmp_path, train_rows):
    pd.DataFrame(train_rows).to_parquet(tmp_path / "hub.parquet")
    check(read_rows(tmp_path / "hub.parquet", "f"), train_rows)
    pd.DataFrame(flat(train_rows)).to_parquet(tmp_path / "flat.parquet")
    check(read_rows(tmp_path / "flat.parquet", "f"), train_rows)


def test_csv_flat_and_json_answers(tmp_path, train_rows):
    pd.DataFrame(flat(train_rows)).to_csv(tmp_path / "flat.csv", index=False)
    check(read_rows(tmp_path / "flat.csv", "f"), train_rows)
    frame = pd.DataFrame(train_rows)
    frame["answers"] = frame["answers"].map(json.dumps)
    frame.to_csv(tmp_path / "json.csv", index=False)
    check(read_rows(tmp_path / "json.csv", "f"), train_rows)


def test_unanswerable_train_row_needs_squad_v2(train_rows):
    row = dict(train_rows[0], answers={"text": [], "answer_start": []})
    with pytest.raises(DataError, match="QA_SQUAD_V2"):
        validate_rows([row], "train.jsonl", squad_v2=False)
    assert validate_rows([row], "train.jsonl", squad_v2=True)


@pytest.mark.parametrize("change, needle", [
    ({"question": None}, "row 'R1': missing or empty field 'question'"),
    ({"context": ""}, "row 'R1': missing or empty field 'context'"),
    ({"answers": None}, "row 'R1': missing field 'answers'"),
    ({"answers": {"text": ["Paris"], "answer_start": [3]}}, "row 'R1': answer_start 3 does not match the context"),
    ({"answers": {"text": ["Paris"], "answer_start": []}}, "row 'R1': answers.text and answers.answer_start differ"),
])
def test_bad_rows_are_named(change, needle):
    row = {"id": "R1", "context": "Paris is nice.", "question": "Where?", "answers": {"text": ["Paris"], "answer_start": [0]}}
    row.update(change)
    with pytest.raises(DataError) as info:
        validate_rows([row], "train.jsonl", squad_v2=False)
    assert str(info.value).startswith("train.jsonl: ") and needle in str(info.value)


def test_unreadable_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2 is not valid JSON"):
        read_rows(tmp_path / "bad.jsonl", str(tmp_path / "bad.jsonl"))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unknown data format"):
        read_rows(tmp_path / "data.txt", "data.txt")


def _row(**change):
    row = {"id": "R1", "context": "Paris is nice.", "question": "Where?", "answers": {"text": ["Paris"], "answer_start": [0]}}
    row.update(change)
    return row


@pytest.mark.parametrize("row, needle", [
    (_row(answers={"text": ["Paris"], "answer_start": [-3]}), "answer_start must be a non-negative integer (got '-3')"),
    (_row(answers={"text": ["Paris"], "answer_start": [0.5]}), "answer_start must be a non-negative integer (got '0.5')"),
    (_row(answers={"text": ["Paris"], "answer_start": [True]}), "answer_start must be a non-negative integer (got 'True')"),
    (_row(answers={"text": ["Paris"], "answer_start": [float("inf")]}), "answer_start must be a non-negative integer (got 'inf')"),
    (_row(answers={"text": ["Paris"], "answer_start": [float("nan")]}), "answer_start must be a non-negative integer (got 'nan')"),
    (_row(answers={"text": [""], "answer_start": [0]}), "an answer text must be a non-empty string"),
    (_row(context="Paris \ud800"), "field 'context' holds an invalid character (a lone UTF-16 surrogate)"),
    (_row(question="Where\udfff?"), "field 'question' holds an invalid character"),
    (_row(id=17), "row '17': field 'id' must be a string (got int)"),
])
def test_hostile_values_are_named(row, needle):
    with pytest.raises(DataError) as info:
        validate_rows([row], "train.jsonl", squad_v2=False)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_integral_answer_starts_from_parquet_are_accepted(tmp_path):
    pd.DataFrame([{"id": "a", "context": "Paris is nice.", "question": "Where?", "answer_text": "nice", "answer_start": 9.0}]
                 ).to_parquet(tmp_path / "f.parquet")
    assert validate_rows(read_rows(tmp_path / "f.parquet", "f"), "f", squad_v2=False)[0]["answers"]["answer_start"] == [9]


def test_unanswerable_rows_are_listed_all_at_once(train_rows):
    data = [dict(r, answers={"text": [], "answer_start": []}) for r in train_rows[:7]]
    with pytest.raises(DataError) as info:
        validate_rows(data, "dev.jsonl", squad_v2=False)
    assert "7 row(s) without an answer" in str(info.value) and "and 2 more" in str(info.value)
    assert repr(train_rows[0]["id"]) in str(info.value)
