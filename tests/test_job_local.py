"""The job end to end with a local output directory, and its answers to bad input."""
import json

import pandas as pd
import pytest
from transformers import AutoModelForQuestionAnswering

from tests.support.jobrun import DATA, job_env, run_job


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("local")
    env = job_env(tmp, tiny_model)
    result = run_job(env)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    return tmp, env, result


def test_published_layout(finished):
    tmp, env, _ = finished
    run = tmp / "out" / "test-run"
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/README.md",
                 "metrics.json", "predictions.json", "manifest.json", "COMPLETE"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"exact_match", "f1", "eval_examples", "train_runtime", "train_samples_per_second"} <= set(metrics)
    assert metrics["eval_examples"] == 32 and metrics["global_step"] == 8
    dev_ids = [json.loads(line)["id"] for line in (DATA / "squad_v1_dev_32.jsonl").read_text().splitlines()]
    assert sorted(json.loads((run / "predictions.json").read_text())) == sorted(dev_ids)
    manifest = json.loads((run / "manifest.json").read_text())
    import hashlib
    assert manifest["data"]["train"]["sha256"] == hashlib.sha256((DATA / "squad_v1_train_64.jsonl").read_bytes()).hexdigest()
    assert manifest["settings"]["max_length"] == 128 and "transformers" in manifest["versions"]
    assert "exact_match" in (run / "model" / "README.md").read_text()


def test_model_loads_and_answers(finished):
    tmp, _, _ = finished
    model_dir = tmp / "out" / "test-run" / "model"
    assert AutoModelForQuestionAnswering.from_pretrained(str(model_dir)).config.model_type == "distilbert"
    context = "The Eiffel Tower was completed in 1889 in Paris."
    result = run_job({}, module="job.answer", args=("--model", str(model_dir), "--question", "When?", "--context", context))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["answer"] and context[answer["start"]:answer["end"]] == answer["answer"]


def test_predictions_match_answering_each_question_alone(finished):
    """Evaluation decodes batched windows; any mix-up of window order shows up against job.answer."""
    from job.answer import QuestionAnswerer

    tmp, env, _ = finished
    run = tmp / "out" / "test-run"
    answerer = QuestionAnswerer(run / "model", max_length=int(env["QA_MAX_LENGTH"]), doc_stride=int(env["QA_DOC_STRIDE"]))
    predictions = json.loads((run / "predictions.json").read_text())
    rows = [json.loads(line) for line in (DATA / "squad_v1_dev_32.jsonl").read_text().splitlines()]
    alone = {r["id"]: answerer(r["question"], r["context"])["answer"] for r in rows}
    assert predictions == alone


def test_progress_is_json_lines_without_bars(finished):
    _, _, result = finished
    progress = result.event("progress")
    assert progress and {"step", "epoch", "loss", "learning_rate", "samples_per_second", "eta_seconds"} <= set(progress[-1])
    assert all(line.startswith("{") for line in result.stdout.splitlines())
    for stage in ("data", "features", "train_start", "train_end", "eval", "published", "done"):
        assert result.event(stage), stage
    assert "it/s" not in result.stderr and "\r" not in result.stderr


def test_rerun_of_a_complete_run_does_nothing(finished):
    _, env, _ = finished
    again = run_job(env)
    assert again.returncode == 0 and again.event("already_complete") and not again.event("train_start")


def test_other_formats_and_squad_v2(tmp_path, tiny_model, train_rows):
    pd.DataFrame(train_rows).to_parquet(tmp_path / "train.parquet")
    env = job_env(tmp_path, tiny_model, QA_TRAIN_URI=tmp_path / "train.parquet",
                  QA_EVAL_URI=DATA / "squad_v2_dev_nested_small.json", QA_SQUAD_V2="true", QA_MAX_STEPS="2")
    result = run_job(env)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "test-run" / "metrics.json").read_text())
    assert metrics["NoAns_total"] > 0 and metrics["HasAns_total"] > 0


def one_line_error(result, code, needle):
    assert result.returncode == code, (result.returncode, result.stderr, result.stdout[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("settings, code, needle", [
    ({"QA_EPOCHS": "many"}, 2, "QA_EPOCHS"),
    ({"QA_BATCH_SIZE": "0"}, 2, "QA_BATCH_SIZE"),
    ({"QA_DOC_STRIDE": "128"}, 2, "QA_DOC_STRIDE: must be smaller than QA_MAX_LENGTH"),
    ({"QA_LEARNIN_RATE": "1e-4"}, 2, "QA_LEARNIN_RATE: unknown setting (did you mean QA_LEARNING_RATE?)"),
    ({"QA_TRAIN_URI": "ftp://host/train.json"}, 2, "QA_TRAIN_URI: unsupported URI scheme 'ftp'"),
    ({"QA_TRAIN_URI": "/nonexistent/train.jsonl"}, 3, "/nonexistent/train.jsonl: data file not found"),
    ({"QA_MODEL_NAME": "/nonexistent/model"}, 2, "QA_MODEL_NAME=/nonexistent/model"),
    ({"QA_TRAIN_URI": "", "QA_EVAL_URI": ""}, 75, "QA_DATASET=squad: hub unreachable"),  # offline: no hub
])
def test_bad_settings(tmp_path, tiny_model, settings, code, needle):
    one_line_error(run_job(job_env(tmp_path, tiny_model, **settings)), code, needle)


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r.pop("question"), "row 'train-html-008-000-02': missing or empty field 'question'"),
    (lambda r: r["answers"].update(answer_start=[r["answers"]["answer_start"][0] + 1]),
     "row 'train-html-008-000-02': answer_start"),
])
def test_bad_rows(tmp_path, tiny_model, train_rows, mutate, needle):
    rows = [json.loads(json.dumps(r)) for r in train_rows[:5]]
    mutate(rows[2])
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one_line_error(run_job(job_env(tmp_path, tiny_model, QA_TRAIN_URI=path)), 3, needle)


def test_empty_dataset(tmp_path, tiny_model):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    one_line_error(run_job(job_env(tmp_path, tiny_model, QA_TRAIN_URI=path)), 3, "no train examples left")
