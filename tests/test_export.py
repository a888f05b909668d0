"""The serving exports: ONNX fp32 and int8 made at publish time, checked, published with sha256, and answered from.

One v2 job run with a channel exports (the tests' other runs set QA_EXPORT=none): its fp32 graph
answers every eval question as the torch model does, its files are listed with sha256 everywhere a
user looks, the pointer names them, and ``job.answer --runtime onnx|onnx-int8`` answers from them.
A second run whose exporter cannot load (onnxscript broken on its path) still publishes and exits 0.
The int8 bound is checked on the export stage itself, with a model whose weights quantize badly.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from job.serving import ONNX, ONNX_FILES, ONNX_INT8, TORCH, open_scorer, read_serving, sha256_of
from tests.support.jobrun import DATA, job_env, run_job

V2_ROWS = DATA / "squad_v2_dev_24.jsonl"
BROKEN = Path(__file__).parent / "support" / "broken_onnxscript"
CONTEXT = "The Denver Broncos defeated the Carolina Panthers 24-10 to win Super Bowl 50 in Santa Clara."


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    """A SQuAD v2 run that exports both graphs (int8 allowed any drop: the tiny model's F1 is noise) and
    promotes to a channel."""
    tmp = tmp_path_factory.mktemp("exported")
    env = job_env(tmp, tiny_model, QA_TRAIN_URI=str(V2_ROWS), QA_EVAL_URI=str(V2_ROWS), QA_SQUAD_V2="true",
                  QA_EXPORT="onnx,onnx-int8", QA_INT8_MAX_F1_DROP="100", QA_CHANNEL="serving", QA_MAX_STEPS="4",
                  QA_REPORT_TO="none")
    result = run_job(env)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "out", tmp / "out" / "test-run", result


def test_the_fp32_graph_answers_every_eval_question_as_the_torch_model(exported):
    _, run, result = exported
    model = run / "model"
    serving = read_serving(model)
    assert set(serving["runtimes"]) == {TORCH, ONNX, ONNX_INT8} and not serving["not_published"]
    check = serving["runtimes"][ONNX]
    assert check["mismatches"] == 0 and check["max_abs_logit_diff"] <= 1e-3
    assert check["exact_match"] == serving["runtimes"][TORCH]["exact_match"] and check["f1"] == serving["runtimes"][TORCH]["f1"]
    # and again here, question by question, through the scorers a server opens
    from job.squad.decoding import decode_answer
    from job.squad.features import eval_features

    rows = rows_of(V2_ROWS)
    scorers = {name: open_scorer(model, name) for name in (TORCH, ONNX)}
    tokenizer = scorers[TORCH].tokenizer
    features = eval_features(tokenizer, rows, serving["decoding"]["max_length"], serving["decoding"]["doc_stride"])
    batch = dict(tokenizer.pad({k: features[k] for k in tokenizer.model_input_names}, return_tensors="np"))
    logits = {name: scorer(batch) for name, scorer in scorers.items()}
    assert logits[ONNX][0].dtype == np.float32
    assert np.abs(logits[TORCH][0] - logits[ONNX][0]).max() <= 1e-3
    for i, row in enumerate(rows):
        windows = [w for w, ex in enumerate(features["example_index"]) if ex == i]
        answers = {name: decode_answer([(s[w], e[w], features["offset_mapping"][w]) for w in windows], row["context"])
                   for name, (s, e) in logits.items()}
        assert (answers[ONNX].text, answers[ONNX].start) == (answers[TORCH].text, answers[TORCH].start), row["id"]


def test_exports_are_listed_with_sha256_in_serving_manifest_card_metrics_and_summary(exported):
    _, run, result = exported
    model = run / "model"
    serving = read_serving(model)
    manifest = json.loads((run / "manifest.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    card = (model / "README.md").read_text()
    for runtime in (ONNX, ONNX_INT8):
        (entry,) = serving["runtimes"][runtime]["files"]
        assert entry["name"] == ONNX_FILES[runtime] and entry["sha256"] == sha256_of(model / entry["name"])
        assert manifest["serving_files"][runtime] == [{**entry, "name": f"model/{entry['name']}"}]
        assert entry["sha256"] in card
        assert metrics["serving"]["runtimes"][runtime]["f1"] == serving["runtimes"][runtime]["f1"]
    int8 = serving["runtimes"][ONNX_INT8]
    assert int8["f1_drop"] == pytest.approx(serving["runtimes"][TORCH]["f1"] - int8["f1"])
    (summary,) = result.event("summary")
    assert set(summary["serving"]) == {TORCH, ONNX, ONNX_INT8} and summary["serving"][ONNX_INT8]["f1"] == int8["f1"]
    (event,) = result.event("export")
    assert event["published"] == [ONNX, ONNX_INT8, TORCH] and not result.event("export_failed")


def test_v2_thresholds_are_reported_and_the_chosen_one_is_what_a_server_applies(exported):
    _, run, result = exported
    metrics = json.loads((run / "metrics.json").read_text())
    serving = read_serving(run / "model")
    for key in ("best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"):
        assert isinstance(metrics[key], float), key
    assert serving["null_threshold"]["choice"] == "best_f1"
    assert serving["decoding"]["null_score_diff_threshold"] == metrics["best_f1_thresh"]
    assert serving["decoding"]["version_2"] is True
    assert result.event("summary")[0]["null_threshold"]["value"] == metrics["best_f1_thresh"]


def test_the_pointer_names_the_served_files(exported):
    out, run, _ = exported
    pointer = json.loads((out / "channels" / "serving.json").read_text())
    serving = read_serving(run / "model")
    assert pointer["serving"]["runtimes"] == {k: {"files": v["files"]} for k, v in serving["runtimes"].items()}
    assert pointer["serving"]["decoding"] == serving["decoding"]


def test_job_answer_answers_from_each_runtime_through_the_channel(exported, capsys):
    out, run, _ = exported
    from job.answer import QuestionAnswerer, main

    serving = read_serving(run / "model")
    expected = QuestionAnswerer(run / "model", max_length=serving["decoding"]["max_length"],
                                doc_stride=serving["decoding"]["doc_stride"], version_2=True,
                                null_threshold=serving["decoding"]["null_score_diff_threshold"])("Who won?", CONTEXT)
    args = ("--model", str(out), "--channel", "serving", "--question", "Who won?", "--context", CONTEXT)
    # the command line itself, once in a process of its own (int8), once here (fp32: a process costs 5 s)
    result = run_job({}, module="job.answer", args=(*args, "--runtime", ONNX_INT8))
    assert result.returncode == 0, result.stderr[-2000:]
    int8 = json.loads(result.stdout)
    assert main([*args, "--runtime", ONNX], environ={}) == 0
    fp32 = json.loads(capsys.readouterr().out)
    for runtime, body in ((ONNX_INT8, int8), (ONNX, fp32)):
        assert body["runtime"] == runtime and body["run_id"] == "test-run"
        assert body["answer"] == CONTEXT[body["start"]:body["end"]] if body["answer"] else body["start"] == -1
    assert (fp32["answer"], fp32["start"], fp32["end"]) == (expected["answer"], expected["start"], expected["end"])
    assert fp32["score"] == pytest.approx(expected["score"], abs=2e-3)


def test_a_runtime_that_was_not_published_is_one_line_naming_it(exported, tiny_model):
    result = run_job({}, module="job.answer", args=("--model", str(tiny_model), "--runtime", ONNX, "--question", "Who?",
                                                    "--context", CONTEXT))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "runtime onnx" in result.stderr and "not published with it" in result.stderr


def test_a_failing_export_leaves_a_published_model_and_exit_0(tmp_path, tiny_model):
    env = job_env(tmp_path, tiny_model, QA_EXPORT="onnx,onnx-int8", QA_MAX_STEPS="2", QA_REPORT_TO="none",
                  PYTHONPATH=f"{BROKEN}:{Path(__file__).resolve().parents[1]}")
    result = run_job(env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "out" / "test-run"
    assert (run / "COMPLETE").is_file() and (run / "model" / "model.safetensors").is_file()
    assert not list((run / "model").glob("*.onnx"))
    (failed,) = result.event("export_failed")
    assert "onnxscript" in failed["reason"]
    serving = read_serving(run / "model")
    assert set(serving["runtimes"]) == {TORCH} and set(serving["not_published"]) == {ONNX, ONNX_INT8}
    metrics = json.loads((run / "metrics.json").read_text())
    assert "onnxscript" in metrics["serving"]["failed"]


def _quantizes_badly(model_dir: Path) -> None:
    """One outlier per weight matrix (20x its largest weight): per-tensor int8 then rounds the others to a few steps."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "qa_outputs" not in name:
                module.weight[0, 0] = 20 * module.weight.abs().max()
    model.save_pretrained(str(model_dir))


def test_an_int8_graph_over_its_f1_bound_is_not_published(tmp_path, tiny_model):
    import datasets

    from job.answer import QuestionAnswerer
    from job.errors import ConfigError
    from job.export import export_and_check
    from job.settings import load_settings
    from job.squad.features import eval_features

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    _quantizes_badly(model)
    # gold = what the torch model answers, so its F1 is 100 and every answer int8 changes costs F1
    answerer = QuestionAnswerer(model, max_length=128, doc_stride=48)
    rows = []
    for row in rows_of(DATA / "squad_v1_dev_32.jsonl"):
        got = answerer(row["question"], row["context"])
        if got["answer"].strip():
            rows.append({**row, "answers": {"text": [got["answer"]], "answer_start": [got["start"]]}})
    assert len(rows) >= 20
    settings = load_settings({"QA_TRAIN_URI": "unused", "QA_MAX_LENGTH": "128", "QA_DOC_STRIDE": "48",
                              "QA_EXPORT": "onnx,onnx-int8", "QA_INT8_MAX_F1_DROP": "1.0"})
    features = datasets.Dataset.from_dict(eval_features(answerer.tokenizer, rows, 128, 48))
    record = export_and_check(settings, model, features, rows, scores={})
    assert record["runtimes"][TORCH]["f1"] == pytest.approx(100.0)
    assert ONNX in record["runtimes"] and ONNX_INT8 not in record["runtimes"]
    measured = record["check"][ONNX_INT8]
    assert measured["f1_drop"] > 1.0
    assert "QA_INT8_MAX_F1_DROP=1" in record["not_published"][ONNX_INT8]
    assert not (model / ONNX_FILES[ONNX_INT8]).exists() and (model / ONNX_FILES[ONNX]).is_file()
    assert read_serving(model)["not_published"][ONNX_INT8] == record["not_published"][ONNX_INT8]
    with pytest.raises(ConfigError, match="onnx-int8: .* was not published with it .*QA_INT8_MAX_F1_DROP"):
        open_scorer(model, ONNX_INT8)
