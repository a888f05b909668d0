"""``python -m job.predict`` end to end on the real S3 server: chunks, kills and resumes, shards, leases, bad input.

One published tiny model (one job run) serves every test. The reference is an uninterrupted run:
the two pods of an Indexed Job, each predicting its shard. A single pod killed, stopped and
rerun must write exactly its bytes: the shards' chunks are the single pod's (16 rows a shard, 4 a
chunk), and the same chunks give the same batches, so the same logits.
"""
import json

import pytest

from tests.support.jobrun import DATA, RunningJob, job_env, run_job
from tests.support.s3_fixtures import s3_env

EVAL = DATA / "squad_v1_dev_32.jsonl"
IDS = [json.loads(line)["id"] for line in EVAL.read_text().splitlines()]
CHUNK_ROWS = 4  # 32 rows: 8 chunks, 4 per shard of two


@pytest.fixture(scope="module")
def published(seaweed, tmp_path_factory, tiny_model):
    """A model published by one job run to S3 (and promoted to the channel ``production``); the bucket for predictions."""
    bucket = "predict-" + tmp_path_factory.mktemp("x").name[-6:].lower().replace("_", "-")
    seaweed.client().create_bucket(Bucket=bucket)
    env = job_env(tmp_path_factory.mktemp("train"), tiny_model, QA_OUTPUT_URI=f"s3://{bucket}/runs", QA_MAX_STEPS="2",
                  QA_CHECKPOINT_STEPS="0", QA_REPORT_TO="none", QA_CHANNEL="production", **s3_env(seaweed))
    result = run_job(env)
    assert result.returncode == 0, result.stderr
    return {"bucket": bucket, "model": f"s3://{bucket}/runs/test-run", "s3": s3_env(seaweed), "client": seaweed.client()}


def predict_env(published, work, output: str, **settings) -> dict:
    env = {"QA_PREDICT_MODEL": published["model"], "QA_PREDICT_INPUT_URI": str(EVAL),
           "QA_PREDICT_OUTPUT_URI": f"s3://{published['bucket']}/{output}", "QA_WORK_DIR": str(work),
           "QA_PREDICT_CHUNK_ROWS": str(CHUNK_ROWS),  # windows and decoding: the model's serving.json
           "QA_LEASE_SECONDS": "5", "QA_STORAGE_TIMEOUT_SECONDS": "3", "QA_STORAGE_ATTEMPTS": "3",
           "QA_STORAGE_BACKOFF_SECONDS": "0.2", "QA_LOG_FORMAT": "json", **published["s3"]}
    env.update({k: str(v) for k, v in settings.items()})
    return env


def read(published, key: str) -> bytes:
    return published["client"].get_object(Bucket=published["bucket"], Key=key)["Body"].read()


def keys(published, prefix: str) -> list[str]:
    pages = published["client"].get_paginator("list_objects_v2").paginate(Bucket=published["bucket"], Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def predict(env, spec: str | None = None):
    return run_job(env, module="tests.support.killer", args=(spec, "job.predict")) if spec else run_job(env, "job.predict")


def sharded_env(published, work, **settings) -> dict:
    """Two shards, with the model the channel names (the published run)."""
    return predict_env(published, work, "sharded", QA_PREDICT_SHARDS="2", QA_PREDICT_CHANNEL="production",
                       QA_PREDICT_MODEL=f"s3://{published['bucket']}/runs", **settings)


@pytest.fixture(scope="module")
def sharded(published, tmp_path_factory):
    """The uninterrupted run: both pods of an Indexed Job at once, each its own scratch; their results."""
    work = tmp_path_factory.mktemp("sharded")
    pods = [RunningJob(sharded_env(published, work / str(i), JOB_COMPLETION_INDEX=i), "job.predict") for i in (0, 1)]
    results = [pod.finish() for pod in pods]
    assert [r.returncode for r in results] == [0, 0], [r.stderr + r.stdout[-2000:] for r in results]
    return results


@pytest.fixture(scope="module")
def reference(published, sharded) -> bytes:
    """The uninterrupted run's file."""
    return read(published, "sharded/predictions.jsonl")


def test_the_model_decoding_logs_and_secrets_of_a_run(published, sharded):
    for result in sharded:
        assert published["s3"]["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr
        assert [(e["runtime"], e["device"]) for e in result.event("scorer")] == [("torch", "cpu")]
        (bound,) = result.event("bound")
        # what the model was evaluated with (its serving.json: the training run's 128/48), not the job's 384/128
        assert (bound["decoding"]["max_length"], bound["decoding"]["doc_stride"]) == (128, 48)
    model = json.loads(read(published, "sharded/predict.json"))["model"]  # the channel's run, pinned
    assert (model["run_id"], model["uri"]) == ("test-run", f"s3://{published['bucket']}/runs/test-run/model")


def test_every_row_is_predicted_once_in_input_order_with_its_offsets(reference):
    lines = [json.loads(line) for line in reference.decode().splitlines()]
    assert [p["id"] for p in lines] == IDS
    contexts = {r["id"]: r["context"] for r in map(json.loads, EVAL.read_text().splitlines())}
    for p in lines:
        assert set(p) == {"id", "answer", "start", "end", "score"}
        assert contexts[p["id"]][p["start"]:p["end"]] == p["answer"] if p["answer"] else p["start"] == -1


def test_scores_equal_what_evaluation_computes_for_the_same_model_and_rows(published, tmp_path, monkeypatch):
    """In this process, beside the job's evaluation of the model predictions fetched (same threads, same batches)."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from job.data import validate_rows
    from job.evaluate import evaluate_model
    from job.predictions.run import run
    from job.predictions.settings import load_predict_settings
    from job.preprocess import feature_dataset
    from job.settings import load_settings

    # one chunk of every row: the windows go through the model in the batches evaluation makes
    env = predict_env(published, tmp_path / "work", "unused", QA_PREDICT_OUTPUT_URI=str(tmp_path / "out"),
                      QA_PREDICT_CHUNK_ROWS="64")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    run(load_predict_settings({k: v for k, v in env.items() if k.startswith("QA_")}), stop=None)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())

    model_dir = str(tmp_path / "work" / "predict-00000-of-00001" / "model")  # the model predictions fetched
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir, dtype="float32")
    rows = validate_rows([json.loads(line) for line in EVAL.read_text().splitlines()], str(EVAL), False)
    evaluated, _ = evaluate_model(model, tokenizer, feature_dataset("eval", tokenizer, rows, 128, 48), rows,
                                  load_settings({"QA_MAX_LENGTH": "128", "QA_DOC_STRIDE": "48"}))
    assert {k: metrics[k] for k in evaluated} == evaluated  # exact_match, f1, total: the same numbers
    assert metrics["rows"] == 32 and json.loads((tmp_path / "out" / "COMPLETE").read_text())["metrics"] == evaluated


def test_killed_resumes_at_the_first_uncommitted_chunk_stopped_exits_143_and_the_rerun_gives_the_same_file(
        published, reference, tmp_path):
    import signal

    env = predict_env(published, tmp_path / "a", "interrupted")
    shard = "interrupted/shards/00000-of-00001/"
    # SIGKILL between chunk 2's lines and its marker
    killed = predict(env, "kill:chunk_written@3")
    assert killed.returncode == -9
    assert [k for k in keys(published, shard) if "/chunk-" in k and k.endswith(".json")] == [
        f"{shard}chunk-00000{i}.json" for i in (0, 1)]
    (orphan,) = [k for k in keys(published, shard) if k.startswith(f"{shard}chunk-000002-")]

    # the rerun resumes at chunk 2; while it runs, a replacement pod on another node (its own scratch) watches
    # the shard's lease, sees it renewed and stops (exit 4) without writing; then the rerun gets a SIGTERM
    resumed = RunningJob(env, module="tests.support.killer", args=("slow:chunk_committed=2.5", "job.predict"))
    resumed.wait_for("lease")
    second = run_job({**env, "QA_WORK_DIR": str(tmp_path / "b")}, "job.predict")
    resumed.wait_for("chunk_committed")
    resumed.proc.send_signal(signal.SIGTERM)
    stopped = resumed.finish()
    (plan,) = stopped.event("plan")
    assert (plan["committed"], plan["resume_from"]) == (2, 2)
    assert second.returncode == 4, second.stderr
    assert "shard 0 of 1" in second.stderr and "is already running" in second.stderr
    assert second.event("lease_wait") and not second.event("bound")
    assert stopped.returncode == 143, stopped.stderr
    (line,) = stopped.stderr.strip().splitlines()
    assert "stopped by SIGTERM" in line and "first uncommitted chunk" in line
    done = [e["chunk"] for e in stopped.event("chunk_committed")]
    assert done == list(range(2, 2 + len(done))) and len(done) < 6

    finished = predict(env)
    assert finished.returncode == 0, finished.stderr
    (plan,) = finished.event("plan")
    assert plan["resume_from"] == plan["committed"] == 2 + len(done)
    assert [e["chunk"] for e in finished.event("chunk_committed")] == list(range(2 + len(done), 8))
    assert read(published, "interrupted/predictions.jsonl") == reference  # no duplicate, no gap, the same bytes
    assert orphan not in keys(published, shard)  # lines no marker names are deleted when the shard completes


def test_two_shards_of_an_indexed_job_cover_every_row_once(published, sharded):
    per_shard = []
    for i in (0, 1):
        shard = f"sharded/shards/0000{i}-of-00002/"
        chunks = [k for k in keys(published, shard) if k.endswith(".jsonl")]
        assert len(chunks) == 4
        per_shard.append([json.loads(line)["id"] for k in chunks for line in read(published, k).decode().splitlines()])
    assert per_shard[0] + per_shard[1] == IDS  # each shard its own rows, together every row once
    assert sum(len(r.event("merged")) for r in sharded) >= 1  # the shard that completed last (or both, the same bytes)
    assert json.loads(read(published, "sharded/COMPLETE"))["rows"] == 32


def test_a_bad_row_is_a_data_error_naming_it_and_nothing_is_written(published, tmp_path):
    rows = [{"id": f"q{i}", "question": "Who?", "context": "Denver won."} for i in range(5)]  # no answers: fine
    rows.insert(3, {"id": "q-bad", "question": "Who?", "context": "Denver won.",
                    "answers": {"text": ["Denver"], "answer_start": [4]}})
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = predict(predict_env(published, tmp_path, "bad", QA_PREDICT_INPUT_URI=str(path)))
    assert result.returncode == 3, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "questions.jsonl: row 'q-bad': answer_start 4 does not match" in line and "Traceback" not in line
    assert keys(published, "bad/") == []


def test_a_rerun_with_other_settings_is_refused(published, sharded, tmp_path):
    result = predict(sharded_env(published, tmp_path, QA_PREDICT_CHUNK_ROWS="5"))
    assert result.returncode == 2, result.stderr
    assert "differs in: QA_PREDICT_CHUNK_ROWS" in result.stderr
