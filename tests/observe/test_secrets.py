"""No secret leaves the job: every failure path is run with secret-looking credentials and every byte is searched."""
import socket
import uuid

import pytest

from tests.support.jobrun import job_env, run_job
from tests.support.s3_fixtures import s3_env

ENDPOINT_PASSWORD = "pw-Marmalade-4242"
SECRET = "s3cr3t-Zebra-Kumquat-991"
TOKEN = "tok-Quasar-55555"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def everything_written(tmp_path, result, client=None, bucket=None) -> bytes:
    blobs = [result.stdout.encode(), result.stderr.encode()]
    blobs += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    if client is not None:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            blobs += [client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in page.get("Contents", [])]
    return b"\n".join(blobs)


def assert_no_secret(blob: bytes, *secrets: str) -> None:
    for secret in secrets:
        assert secret.encode() not in blob, f"{secret!r} leaked"


@pytest.fixture(scope="module")
def bucket(seaweed):
    name = f"secrets-{uuid.uuid4().hex[:10]}"
    seaweed.client().create_bucket(Bucket=name)
    return name


def failure_cases(seaweed, bucket):
    real = s3_env(seaweed)
    base = {**real, "QA_OUTPUT_URI": f"s3://{bucket}/runs", "HF_TOKEN": TOKEN,
            "QA_STORAGE_ATTEMPTS": "2", "QA_STORAGE_BACKOFF_SECONDS": "0.1", "QA_STORAGE_TIMEOUT_SECONDS": "2"}
    with_pw = seaweed.endpoint.replace("http://", f"http://admin:{ENDPOINT_PASSWORD}@")
    return {
        "bad setting beside a password URL": (2, {**base, "QA_S3_ENDPOINT_URL": with_pw + "/ x"}),
        "endpoint botocore refuses": (2, {**base, "QA_S3_ENDPOINT_URL": f"http://admin:{ENDPOINT_PASSWORD}@under_score.local:9000"}),
        "storage unreachable": (75, {**base, "QA_S3_ENDPOINT_URL": f"http://admin:{ENDPOINT_PASSWORD}@127.0.0.1:{closed_port()}"}),
        "wrong secret": (2, {**base, "AWS_SECRET_ACCESS_KEY": SECRET}),
        "credentials in the output URI": (2, {**base, "QA_OUTPUT_URI": f"s3://AKIAEXAMPLE:{SECRET}@{bucket}/runs"}),
        "bad data": (3, {**base, "QA_TRAIN_URI": f"s3://{bucket}/no/such/train.jsonl"}),
    }


def test_no_failure_path_prints_or_writes_a_secret(seaweed, bucket, tmp_path, tiny_model):
    real_secret = s3_env(seaweed)["AWS_SECRET_ACCESS_KEY"]
    for name, (code, env) in failure_cases(seaweed, bucket).items():
        work = tmp_path / name.replace(" ", "-")
        result = run_job(job_env(work, tiny_model, QA_RUN_ID=f"r-{uuid.uuid4().hex[:6]}", **env))
        assert result.returncode == code, (name, result.returncode, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
        assert_no_secret(everything_written(work, result), ENDPOINT_PASSWORD, SECRET, TOKEN, real_secret)


def test_an_unexpected_error_quoting_a_secret_is_redacted(seaweed, bucket, tmp_path, tiny_model):
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{bucket}/runs", QA_RUN_ID="unexpected", QA_MAX_STEPS="1",
                  HF_TOKEN=TOKEN, KILLER_PANIC_MESSAGE=f"{TOKEN} {SECRET}", **s3_env(seaweed))
    env["AWS_SECRET_ACCESS_KEY_OLD"] = SECRET  # any credential-looking variable counts, not only the one in use
    result = run_job(env, module="tests.support.killer", args=("raise:evaluate@1",))
    assert result.returncode == 1 and "injected panic" in result.stderr
    assert_no_secret(everything_written(tmp_path, result, seaweed.client(), bucket), TOKEN, SECRET,
                     env["AWS_SECRET_ACCESS_KEY"])


def test_a_successful_run_writes_no_secret(seaweed, bucket, tmp_path, tiny_model):
    # switches in credential-named variables (the usual way to silence the tokenizers fork warning)
    # are not secrets: they once masked every `false` and `1`, and no line was JSON any more
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{bucket}/runs", QA_RUN_ID="success", QA_MAX_STEPS="2",
                  HF_TOKEN=TOKEN, TOKENIZERS_PARALLELISM="false", SOME_TOKEN="true", SOME_KEY="1", **s3_env(seaweed))
    result = run_job(env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and len(result.events) == len(lines), [line for line in lines if not line.startswith("{")][:3]
    (final,) = [e for e in result.event("eval") if not e["during_training"]]
    assert final["during_training"] is False and result.event("start")[0]["settings"]["squad_v2"] is False
    assert result.event("done")[0]["exit_code"] == 0
    assert_no_secret(everything_written(tmp_path, result, seaweed.client(), bucket), TOKEN, env["AWS_SECRET_ACCESS_KEY"],
                     env["AWS_ACCESS_KEY_ID"])
