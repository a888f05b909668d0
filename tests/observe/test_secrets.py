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
    """Nothing secret in any line or object; and a credential inside a data file's key, the eval file's key and a
    teacher's path is masked in every artifact (manifest.json, run.json and the model card published it raw).
    A retry reads the masked keys back from run.json's pins: tests/test_data_prefix.py."""
    import shutil

    from tests.support.jobrun import DATA

    client = seaweed.client()
    client.put_object(Bucket=bucket, Key=f"drops/{TOKEN}/part-1.jsonl", Body=(DATA / "squad_v1_train_64.jsonl").read_bytes())
    client.put_object(Bucket=bucket, Key=f"eval-{TOKEN}.jsonl", Body=(DATA / "squad_v1_dev_32.jsonl").read_bytes())
    teacher = shutil.copytree(tiny_model, tmp_path / f"teacher-{TOKEN}")
    # switches in credential-named variables (the usual way to silence the tokenizers fork warning)
    # are not secrets: they once masked every `false` and `1`, and no line was JSON any more
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{bucket}/runs", QA_RUN_ID="success", QA_MAX_STEPS="2",
                  QA_TRAIN_URI=f"s3://{bucket}/drops/", QA_EVAL_URI=f"s3://{bucket}/eval-{TOKEN}.jsonl",
                  QA_MAX_TRAIN_SAMPLES="16", QA_MAX_EVAL_SAMPLES="8", QA_TEACHER_MODEL=teacher,
                  HF_TOKEN=TOKEN, TOKENIZERS_PARALLELISM="false", SOME_TOKEN="true", SOME_KEY="1", **s3_env(seaweed))
    result = run_job(env)
    assert result.returncode == 0, result.stderr
    assert result.event("teacher_logits")
    lines = result.stdout.splitlines()
    assert lines and len(result.events) == len(lines), [line for line in lines if not line.startswith("{")][:3]
    (final,) = [e for e in result.event("eval") if not e["during_training"]]
    assert final["during_training"] is False and result.event("start")[0]["settings"]["squad_v2"] is False
    assert result.event("done")[0]["exit_code"] == 0
    run = lambda name: client.get_object(Bucket=bucket, Key=f"runs/success/{name}")["Body"].read().decode()  # noqa: E731
    assert '"key": "***/part-1.jsonl"' in run("run.json")  # the pin, masked
    assert f"s3://{bucket}/eval-***.jsonl" in run("manifest.json") and "teacher-***" in run("manifest.json")
    assert "eval-***.jsonl" in run("model/README.md")
    blob = everything_written(tmp_path, result, client, bucket)
    assert_no_secret(blob, TOKEN, env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"])


def test_the_artifact_encoder_masks_values_and_keys_and_stays_json():
    import json

    from job.observe.redaction import artifact_json, register_secrets

    register_secrets({"ART_TEST_SECRET": 'art-"quoted"\\-Secret-88'})  # quotes and a backslash: JSON escapes them
    doc = {"data": {"files": [{"key": 'drops/art-"quoted"\\-Secret-88/x.jsonl'}]}, 'k-art-"quoted"\\-Secret-88': 1,
           "loss": float("nan"), "f1": float("inf"), "n": 3, "ok": True, "none": None}
    raw = artifact_json(doc, indent=1)
    back = json.loads(raw, parse_constant=lambda word: pytest.fail(f"not JSON: {word}"))
    assert b"Secret-88" not in raw and back["data"]["files"][0]["key"] == "drops/***/x.jsonl" and back["k-***"] == 1
    assert (back["loss"], back["f1"], back["n"], back["ok"], back["none"]) == (None, None, 3, True, None)


def test_every_json_artifact_goes_through_the_one_encoder():
    """json.dumps elsewhere would write a credential raw: only hashes, the store's own records of job-made names and
    hashes (below redaction's layer), the log formatter and job.answer's stdout may use it."""
    import ast
    from pathlib import Path

    job = Path(__file__).resolve().parents[2] / "job"
    allowed = {"observe/redaction.py", "observe/logs.py", "answer.py",  # the encoders; stdout of a command
               "data.py", "distill.py", "store/fingerprint.py", "store/feature_cache.py",  # hashes and cache manifests
               "store/checkpoints.py", "store/lease.py"}  # commit markers (file names, sha256), the lease (a token)
    users = set()
    for path in job.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("dumps", "dump") and isinstance(node.value, ast.Name)
                    and node.value.id == "json"):
                users.add(path.relative_to(job).as_posix())
    assert users <= allowed, sorted(users - allowed)
