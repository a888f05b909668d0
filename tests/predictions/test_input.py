"""Questions to predict are read as the job reads data (formats, sources, row checks); gold answers are optional."""
import json

import pandas as pd
import pytest

from job.errors import DataError
from job.formats import validated
from job.predictions.binding import read_input
from job.predictions.settings import load_predict_settings
from job.rows import each
from job.store.storage import RetryPolicy

ROW = {"id": "q1", "question": "Who won?", "context": "Denver won."}
GOLD = {"text": ["Denver"], "answer_start": [0]}
NONE = {"text": [], "answer_start": []}


@pytest.mark.parametrize("answers, v2, gold", [
    ("absent", False, None), (None, False, None), (NONE, False, None),  # v1.1 has no unanswerable questions
    (NONE, True, NONE), ("absent", True, None), (GOLD, False, GOLD), (GOLD, True, GOLD),
])
def test_a_row_without_gold_answers_has_none(answers, v2, gold):
    row = dict(ROW) if answers == "absent" else {**ROW, "answers": answers}
    (out,) = validated([row], "q.jsonl", v2, answers_optional=True)
    assert out["answers"] == gold


@pytest.mark.parametrize("row, needle", [
    ({**ROW, "answers": {"text": ["Denver"], "answer_start": [3]}}, "row 'q1': answer_start 3 does not match"),
    ({**ROW, "answers": {"text": ["Denver"]}}, "row 'q1': missing field 'answers'"),
    ({"id": "q1", "question": "Who won?"}, "row 'q1': missing or empty field 'context'"),
])
def test_answers_that_are_there_are_checked_as_the_job_checks_them(row, needle):
    with pytest.raises(DataError, match=needle):
        list(validated([row], "q.jsonl", False, answers_optional=True))


def test_files_without_answer_columns_are_questions_to_predict(tmp_path):
    folder = tmp_path / "questions"
    folder.mkdir()
    pd.DataFrame([{**ROW, "id": "c1"}, {**ROW, "id": "c2"}]).to_csv(folder / "a.csv", index=False)
    (folder / "b.jsonl").write_text(json.dumps({**ROW, "id": "j1", "answers": GOLD}) + "\n")
    settings = load_predict_settings({"QA_PREDICT_MODEL": "m", "QA_PREDICT_OUTPUT_URI": str(tmp_path / "out"),
                                      "QA_PREDICT_INPUT_URI": str(folder)})
    split = read_input(settings, False, tmp_path / "work", RetryPolicy(), None)
    assert [(r["id"], r["answers"]) for r in each(split.rows)] == [("c1", None), ("c2", None), ("j1", GOLD)]
    assert split.pin["files"] and split.examples == 3
