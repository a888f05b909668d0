"""Watching a run: TensorBoard events, EM/F1 during training, the curves image, the model card, both log formats.

Three real runs of the job share one training configuration, so their weights must be identical:
``watched`` (local output, TensorBoard, evaluation every 4 steps, JSON lines), ``plain`` (no
tracker, no evaluation during training, text lines) and ``resumed`` (S3 output, SIGKILLed at step
10, rerun on the same machine). The base model has no QA head, as a pretrained encoder has none.
"""
import json
import shlex
import subprocess
import sys
import uuid

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from job.answer import QuestionAnswerer
from job.squad.metrics import squad_scores
from tests.support.jobrun import DATA, ROOT, _child_env, job_env, run_job
from tests.test_job_local import one_line_error

STEPS, EVAL_EVERY, EVAL_SAMPLES = 12, 4, 8
TRAINING = dict(QA_MAX_TRAIN_SAMPLES="24", QA_MAX_STEPS=str(STEPS), QA_BATCH_SIZE="4", QA_LOGGING_STEPS="1",
                QA_CHECKPOINT_STEPS="4", QA_CHECKPOINTS_TO_KEEP="3")
WATCHED = dict(QA_REPORT_TO="tensorboard", QA_EVAL_STEPS=str(EVAL_EVERY), QA_EVAL_SAMPLES_DURING_TRAINING=str(EVAL_SAMPLES))
EVAL_POINTS = list(range(0, STEPS + 1, EVAL_EVERY))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from tests.support.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-base"), qa_head=False)


@pytest.fixture(scope="module")
def watched(tmp_path_factory, base_model):
    tmp = tmp_path_factory.mktemp("watched")
    env = job_env(tmp, base_model, **TRAINING, **WATCHED)
    # every checkpoint must reach the output to be compared with job.answer, but a newer checkpoint
    # supersedes one still queued for upload (job.store.uploader): with a tiny model's steps of a few
    # ms the step-8 upload lost that race once on a loaded 2-core machine. A quarter second per step
    # (a second between checkpoints) leaves the low-priority upload thread ample time; the maths is
    # unchanged (the weights still equal ``plain``'s).
    result = run_job(env, module="tests.support.killer", args=("slow:train_step=0.25",))
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    return tmp / "out" / "test-run", env, result


@pytest.fixture(scope="module")
def plain(tmp_path_factory, base_model):
    tmp = tmp_path_factory.mktemp("plain")
    env = job_env(tmp, base_model, **TRAINING, QA_REPORT_TO="none", QA_EVAL_STEPS="0", QA_LOG_FORMAT="text")
    result = run_job(env)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    return tmp / "out" / "test-run", env, result


def scalars(logdir) -> dict[str, list[int]]:
    """Every scalar tag's steps as stored, duplicates included (TensorBoard's own reader, purging off)."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_curves(steps: dict[str, list[int]]) -> None:
    for tag, seen in steps.items():
        assert seen == sorted(set(seen)), (tag, seen)  # strictly increasing: nothing repeated, nothing backwards
    assert steps["train/loss"] == list(range(1, STEPS + 1))
    assert steps["train/learning_rate"] == list(range(1, STEPS + 1))
    assert steps["eval/f1"] == steps["eval/exact_match"] == EVAL_POINTS


def weights(run) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def test_event_files_locally_readable_by_tensorboard(watched):
    run, _, _ = watched
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert_curves(scalars(run / "logs"))


def test_eval_during_training_equals_job_answer_at_each_checkpoint(watched):
    run, env, result = watched
    rows = [json.loads(line) for line in (DATA / "squad_v1_dev_32.jsonl").read_text().splitlines()][:EVAL_SAMPLES]
    during = [e for e in result.event("eval") if e["during_training"]]
    assert [e["step"] for e in during] == EVAL_POINTS and all(e["examples"] == EVAL_SAMPLES for e in during)
    recorded = json.loads((run / "metrics.json").read_text())["eval_during_training"]
    assert recorded["examples"] == EVAL_SAMPLES and [p["step"] for p in recorded["points"]] == EVAL_POINTS
    for event, point in zip(during[1:], recorded["points"][1:]):  # step 0's head was never saved
        answerer = QuestionAnswerer(run / "checkpoints" / f"checkpoint-{event['step']}",
                                    max_length=int(env["QA_MAX_LENGTH"]), doc_stride=int(env["QA_DOC_STRIDE"]))
        scores = squad_scores(rows, {r["id"]: answerer(r["question"], r["context"])["answer"] for r in rows})
        assert (point["exact_match"], point["f1"]) == (scores["exact_match"], scores["f1"]), event["step"]
        assert (event["exact_match"], event["f1"]) == (round(scores["exact_match"], 3), round(scores["f1"], 3))


def test_eval_during_training_does_not_change_the_weights(watched, plain):
    a, b = weights(watched[0]), weights(plain[0])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_card_front_matter_matches_metrics(watched, base_model):
    run, _, _ = watched
    text = (run / "model" / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    metrics = json.loads((run / "metrics.json").read_text())
    (result,) = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "question-answering"
    assert result["dataset"]["name"] == "squad_v1_dev_32.jsonl"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"exact_match": metrics["exact_match"], "f1": metrics["f1"]}
    assert meta["pipeline_tag"] == "question-answering" and "base_model" not in meta  # a local folder has no hub id
    assert str(base_model) not in text and "a local distilbert model" in body
    assert "](training_curves.png)" in body and "untrained QA head" in body


def test_curves_image_is_a_readable_png(watched):
    path = watched[0] / "model" / "training_curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and 1000 <= image.width <= 2400 and 300 <= image.height <= 900
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # drawn, not blank


def test_summary_gives_a_command_that_answers(watched):
    run, _, result = watched
    (summary,) = result.event("summary")
    metrics = json.loads((run / "metrics.json").read_text())
    assert (summary["exact_match"], summary["f1"]) == (metrics["exact_match"], metrics["f1"])
    assert summary["baseline"] == {"exact_match": metrics["eval_during_training"]["points"][0]["exact_match"],
                                   "f1": metrics["eval_during_training"]["points"][0]["f1"], "examples": EVAL_SAMPLES}
    assert summary["model"] == str(run / "model") and summary["tensorboard"].endswith(f"tensorboard --logdir {run / 'logs'}")
    argv = shlex.split(summary["answer_command"])
    assert argv[1:3] == ["-m", "job.answer"] and argv[argv.index("--model") + 1] == summary["model"]
    python = sys.executable if argv[0] == "python" else str(ROOT / argv[0])  # a venv inside the checkout, or PATH's
    answered = subprocess.run([python, *argv[1:]], env=_child_env({}), cwd=ROOT, capture_output=True, text=True)
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout)["answer"]


def test_model_load_report_is_one_clean_event_in_both_formats(watched, plain):
    (report,) = watched[2].event("model_load_report")
    assert report["missing"] == ["qa_outputs.bias", "qa_outputs.weight"] and "\x1b" not in json.dumps(report)
    lines = [line for line in plain[2].stdout.splitlines() if " model_load_report " in line]
    assert len(lines) == 1 and "qa_outputs.bias, qa_outputs.weight" in lines[0] and "\x1b" not in plain[2].stdout


def test_text_and_json_formats_carry_the_same_events(watched, plain):
    _, _, as_json = watched
    _, _, as_text = plain
    assert not as_text.events  # not one JSON line
    stamped = [line.split(maxsplit=2) for line in as_text.stdout.splitlines() if line[:2].isdigit() and line[2] == ":"]
    text_events = [parts[1] for parts in stamped]
    json_events = [e.get("event") or e["logger"].split(".")[0] for e in as_json.events]
    assert set(text_events) == set(json_events)
    assert text_events.count("progress") == json_events.count("progress") == STEPS
    assert "try it" in as_text.stdout and "exact match" in as_text.stdout  # the closing summary, for people


@pytest.fixture(scope="module")
def resumed(seaweed, tmp_path_factory, base_model):
    from tests.support.s3_fixtures import s3_env

    bucket = f"watch-{uuid.uuid4().hex[:10]}"
    client = seaweed.client()
    client.create_bucket(Bucket=bucket)
    tmp = tmp_path_factory.mktemp("resumed")
    env = job_env(tmp, base_model, QA_RUN_ID="killed", QA_OUTPUT_URI=f"s3://{bucket}/runs", **TRAINING, **WATCHED,
                  **s3_env(seaweed))
    killed = run_job(env, module="tests.support.killer", args=("slow:train_step=0.15,kill:train_step@10",))
    assert killed.returncode == -9, killed.stderr + killed.stdout[-2000:]
    rerun = run_job(env)  # the same machine: its event folder holds steps the resumed checkpoint does not
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout[-3000:]
    return bucket, client, env, rerun, tmp


def test_killed_and_resumed_run_continues_the_same_curves_in_s3(resumed, watched):
    bucket, client, _, rerun, tmp = resumed
    assert rerun.event("resume") and rerun.event("tensorboard_restored")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/killed/logs/")["Contents"]]
    assert len(keys) == 2  # the first attempt's events up to its checkpoint, then the second attempt's
    local = tmp / "downloaded-logs"
    local.mkdir()
    for key in keys:
        client.download_file(bucket, key, str(local / key.rsplit("/", 1)[1]))
    assert_curves(scalars(local))
    model = tmp / "downloaded-model"
    model.mkdir()
    client.download_file(bucket, "runs/killed/model/model.safetensors", str(model / "model.safetensors"))
    a, b = load_file(str(model / "model.safetensors")), weights(watched[0])
    assert all(torch.equal(a[k], b[k]) for k in b)  # evaluation, kill and resume left the trajectory alone


def test_tensorboard_reads_the_run_from_s3_with_S3_ENDPOINT(resumed):
    bucket, _, env, _, _ = resumed
    probe = ("import json, sys; from tensorboard.backend.event_processing.event_accumulator import EventAccumulator; "
             "a = EventAccumulator(sys.argv[1], size_guidance={'scalars': 0}, purge_orphaned_data=False); a.Reload(); "
             "print(json.dumps({t: [e.step for e in a.Scalars(t)] for t in a.Tags()['scalars']}))")
    read = subprocess.run([sys.executable, "-c", probe, f"s3://{bucket}/runs/killed/logs"], capture_output=True, text=True,
                          env={**_child_env(env), "S3_ENDPOINT": env["QA_S3_ENDPOINT_URL"]}, timeout=120)
    assert read.returncode == 0, read.stderr[-2000:]
    assert_curves(json.loads(read.stdout))


def test_unknown_tracker_and_missing_package_are_config_errors(tmp_path, tiny_model):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    result = run_job(job_env(tmp_path, tiny_model, QA_REPORT_TO="tensorboard,tensorbored,wandb"))
    one_line_error(result, 2, "QA_REPORT_TO: unknown tracker 'tensorbored'")
    assert "QA_REPORT_TO: wandb needs the Python package 'wandb'" in result.stderr
    assert not result.event("data")  # refused at start, before any data was read
