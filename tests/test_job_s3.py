"""The job end to end against a real S3 server (SeaweedFS on 127.0.0.1), and its storage errors."""
import json
import socket

from transformers import AutoModelForQuestionAnswering

from tests.support.jobrun import DATA, job_env, run_job
from tests.test_job_local import one_line_error


def test_s3_data_in_s3_output_out(s3_bucket, tmp_path, tiny_model):
    client, bucket = s3_bucket.client, s3_bucket.name
    client.upload_file(str(DATA / "squad_v1_train_64.jsonl"), bucket, "data/train.jsonl")
    client.upload_file(str(DATA / "squad_v1_dev_nested_small.json"), bucket, "data/dev.json")
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{bucket}/runs",
                  QA_TRAIN_URI=f"s3://{bucket}/data/train.jsonl", QA_EVAL_URI=f"s3://{bucket}/data/dev.json", **s3_bucket.env)
    result = run_job(env)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="runs/test-run/")
            for o in page.get("Contents", [])}
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/README.md",
                 "metrics.json", "predictions.json", "manifest.json", "COMPLETE"):
        assert f"runs/test-run/{name}" in keys, name
    assert any(k.endswith("/COMMIT.json") for k in keys)
    assert "lease.json" not in {k.rsplit("/", 1)[-1] for k in keys}  # released at the end
    manifest = json.loads(client.get_object(Bucket=bucket, Key="runs/test-run/manifest.json")["Body"].read())
    assert s3_bucket.server.secret_key not in json.dumps(manifest)
    assert s3_bucket.server.secret_key not in result.stdout + result.stderr
    assert manifest["data"]["eval"]["source"] == f"s3://{bucket}/data/dev.json"

    local = tmp_path / "downloaded"
    for key in (k for k in keys if k.startswith("runs/test-run/model/")):
        (local / key.rsplit("/", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(local / key.rsplit("/", 1)[-1]))
    assert AutoModelForQuestionAnswering.from_pretrained(str(local)) is not None
    answered = run_job(s3_bucket.env, module="job.answer",
                       args=("--model", f"s3://{bucket}/runs/test-run/model", "--question", "Who won?",
                             "--context", "The Denver Broncos won Super Bowl 50."))
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout)["answer"] in "The Denver Broncos won Super Bowl 50."


def test_missing_s3_object_is_a_data_error(s3_bucket, tmp_path, tiny_model):
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{s3_bucket.name}/runs",
                  QA_TRAIN_URI=f"s3://{s3_bucket.name}/nope.jsonl", **s3_bucket.env)
    one_line_error(run_job(env), 3, f"s3://{s3_bucket.name}/nope.jsonl: data object not found")


def test_wrong_credentials_are_a_config_error(s3_bucket, tmp_path, tiny_model):
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{s3_bucket.name}/runs",
                  **{**s3_bucket.env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"})
    result = run_job(env)
    one_line_error(result, 2, "check credentials")
    assert "wrong-secret-value" not in result.stdout + result.stderr


def test_unreachable_endpoint_exits_75(s3_bucket, tmp_path, tiny_model):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{s3_bucket.name}/runs",
                  **{**s3_bucket.env, "QA_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    one_line_error(run_job(env), 75, "unreachable")
