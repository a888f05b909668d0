"""The image, run the way Kubernetes runs it: read-only root, uid 10001, only volumes writable.

Each test runs ``python -m job`` inside the built image against a real S3 server (SeaweedFS on
127.0.0.1, reached through ``--network host``), with a tiny model and tiny data mounted read-only.
Skipped unless ``CONTAINER_IMAGE`` names a built image: ``.ci/container-check`` builds one and
sets it, with ``CONTAINER_DOCKER`` (the docker CLI) and ``DOCKER_HOST`` (its private daemon).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.support.jobrun import json_events

IMAGE = os.environ.get("CONTAINER_IMAGE", "")
DOCKER = os.environ.get("CONTAINER_DOCKER", "docker")
DATA = Path(__file__).parent / "data"
UID = 10001

pytestmark = pytest.mark.skipif(not IMAGE, reason="CONTAINER_IMAGE is not set (.ci/container-check builds the image and sets it)")


def docker(*args: str, timeout: float = 120, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, check=check,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny model and tiny train/eval JSONL files, readable by the container's uid."""
    from tests.support.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("container-assets")
    build_tiny_model(root / "model")
    (root / "data").mkdir()
    shutil.copy(DATA / "squad_v1_train_64.jsonl", root / "data" / "train.jsonl")
    eval_rows = (DATA / "squad_v1_dev_32.jsonl").read_text().splitlines()[:8]
    (root / "data" / "eval.jsonl").write_text("\n".join(eval_rows) + "\n")
    # pytest's temp dirs are 0700 root: the bind mounts must be readable by uid 10001
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


@pytest.fixture
def containers():
    """Names of the containers a test starts; each is removed afterwards, whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        docker("rm", "-f", "-v", name, check=False)


def job_env(bucket, run_id: str, **settings: str) -> dict[str, str]:
    env = {
        **bucket.env,
        "QA_RUN_ID": run_id,
        "QA_OUTPUT_URI": f"s3://{bucket.name}/out",
        "QA_MODEL_NAME": "/assets/model",
        "QA_TRAIN_URI": "/assets/data/train.jsonl",
        "QA_EVAL_URI": "file:///assets/data/eval.jsonl",
        "QA_MAX_LENGTH": "128",
        "QA_DOC_STRIDE": "32",
        "QA_BATCH_SIZE": "4",
        "QA_EVAL_BATCH_SIZE": "16",
        "QA_LOGGING_STEPS": "1",
        "QA_CHECKPOINT_MINUTES": "0",
        "HF_HUB_OFFLINE": "1",  # everything is local; a hub call would be a bug
    }
    env.update({f"QA_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def run_args(name: str, assets: Path, env: dict[str, str]) -> list[str]:
    """``docker run`` arguments as the Kubernetes manifest has them: nothing writable but volumes."""
    args = [
        "--name", name, "--network", "host", "--read-only", "--user", f"{UID}:{UID}",
        "--tmpfs", "/tmp:rw,mode=1777,size=256m",
        "--tmpfs", f"/scratch:rw,uid={UID},gid={UID},mode=0755,size=1g",
        "--tmpfs", f"/outputs:rw,uid={UID},gid={UID},mode=0755,size=64m",
        "--shm-size", "256m",  # DataLoader workers pass batches through /dev/shm
        "-v", f"{assets}:/assets:ro",
    ]
    for key in env:
        args += ["-e", key]  # the value comes from the CLI's environment: no secrets on the command line
    return args + [IMAGE]


def keys(bucket, prefix: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for page in bucket.client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"][len(prefix):]] = obj["Size"]
    return found


def read_json(bucket, key: str):
    return json.loads(bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read())


def events(log_text: str) -> list[dict]:
    return json_events(log_text.splitlines())


def test_image_runs_read_only_as_uid_10001():
    script = ("import os, pathlib, torch, transformers, job; "
              "print(os.getuid(), os.environ['HF_HOME'], os.environ['QA_WORK_DIR']); "
              "pathlib.Path('/scratch/work/probe').parent.mkdir(parents=True, exist_ok=True); "
              "pathlib.Path('/scratch/work/probe').write_text('ok')")
    out = docker("run", "--rm", "--network", "none", "--read-only", "--user", f"{UID}:{UID}",
                 "--tmpfs", "/tmp", "--tmpfs", f"/scratch:uid={UID},gid={UID}",
                 "--entrypoint", "python", IMAGE, "-c", script)
    assert out.stdout.split() == [str(UID), "/scratch/hf", "/scratch/work"]
    # and nothing else is writable
    denied = docker("run", "--rm", "--network", "none", "--read-only", "--user", f"{UID}:{UID}",
                    "--entrypoint", "python", IMAGE, "-c", "open('/app/x', 'w')", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    config = json.loads(docker("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["python", "-m", "job"]


def test_torch_compile_works_in_the_image():
    """The runtime image has the compilers and Python headers torch.compile needs (the C compiler and
    Python.h that Triton's CUDA launcher builds with; Inductor's CPU kernels, compiled here, need the
    C++ one): the recipe keeps compile on, and Inductor compiles and runs a graph, read-only, as uid 10001,
    its kernels in /scratch/cache (Docker mounts a tmpfs /tmp noexec: a shared object there cannot load)."""
    script = """
import torch, torch._dynamo
from job.runtime.recipe import probe_machine, resolve_recipe
from job.settings import load_settings
machine = probe_machine(cuda=False)
recipe = resolve_recipe(load_settings({"QA_COMPILE": "true"}), machine)
assert recipe.compile and not [f for f in recipe.fallbacks if f.startswith("QA_COMPILE")], (machine, recipe)
def attend(q, k, v):
    return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), -1), v).relu()
q, k, v = (torch.randn(2, 8, 16) for _ in range(3))
compiled = torch.compile(attend, backend="inductor", fullgraph=True)
assert torch.allclose(compiled(q, k, v), attend(q, k, v), atol=1e-5)
print("compiled", torch._dynamo.utils.counters["stats"]["unique_graphs"], machine.cxx_compiler, machine.python_headers)
"""
    out = docker("run", "--rm", "--network", "none", "--read-only", "--user", f"{UID}:{UID}", "--tmpfs", "/tmp",
                 "--tmpfs", f"/scratch:exec,uid={UID},gid={UID}", "--entrypoint", "python", IMAGE, "-c", script,
                 timeout=300, check=False)
    assert out.stdout.split() == ["compiled", "1", "True", "True"], out.stdout + out.stderr[-3000:]
    config = json.loads(docker("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert "QA_DEVICE=cpu" in config["Env"]  # .ci/container-check builds a CPU image (DEVICE=cpu); the default is cuda


def test_job_trains_and_publishes_to_s3(s3_bucket, assets, containers):
    from job.publish import COMPLETE

    run_id = f"ctr-{uuid.uuid4().hex[:8]}"
    env = job_env(s3_bucket, run_id, max_steps=4, checkpoint_steps=0, int8_max_f1_drop=100)  # a tiny model's F1 is noise
    name = f"qa-job-{run_id}"
    containers.append(name)
    proc = docker("run", *run_args(name, assets, env), env=env, timeout=420, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    run = f"out/{run_id}/"
    found = keys(s3_bucket, run)
    # the exports too (QA_EXPORT's default): the image's onnx, onnxscript and onnxruntime work read-only as uid 10001
    for expected in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/model.onnx",
                     "model/model_int8.onnx", "model/serving.json",
                     "metrics.json", "predictions.json", "manifest.json", COMPLETE):
        assert expected in found, f"{expected} missing from s3://{s3_bucket.name}/{run}: {sorted(found)}"
    metrics = read_json(s3_bucket, run + "metrics.json")
    assert metrics["global_step"] == 4
    manifest = read_json(s3_bucket, run + "manifest.json")
    assert manifest["run_id"] == run_id
    assert manifest["versions"].get("qa-finetune"), manifest["versions"]
    assert {"torch", "transformers"} <= set(manifest["versions"])
    assert any(e.get("event") == "published" for e in events(proc.stdout))
    assert not any(e.get("event") == "export_failed" for e in events(proc.stdout)), proc.stdout[-4000:]


def test_docker_stop_checkpoints_exits_143_and_rerun_resumes(s3_bucket, assets, containers):
    from job.publish import COMPLETE
    from job.store.checkpoints import MARKER, PREFIX

    run_id = f"ctr-{uuid.uuid4().hex[:8]}"
    # long enough that it is still training when stopped (CI saw ~60 steps pass between the
    # third step and the stop), short enough for the replacement to finish in seconds; no step or
    # time checkpoints, so the only checkpoint is the one SIGTERM asks for
    max_steps = 600
    env = job_env(s3_bucket, run_id, max_steps=max_steps, checkpoint_steps=0, stop_grace_seconds=50, export="none")
    name = f"qa-job-{run_id}"
    containers.append(name)
    docker("run", "-d", *run_args(name, assets, env), env=env)

    deadline = time.monotonic() + 300
    step = 0
    while step < 3:
        logs = docker("logs", name).stdout
        step = max((e.get("step", 0) for e in events(logs) if e.get("event") == "progress"), default=0)
        state = docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
        assert state == "true" or step >= 3, f"container ended before training:\n{logs[-4000:]}"
        assert time.monotonic() < deadline, f"no training progress in 300 s:\n{logs[-4000:]}"
        time.sleep(0.5)

    docker("stop", "-t", "60", name, timeout=90)
    code = int(docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout)
    logs = docker("logs", name)
    assert code == 143, f"exit {code}\n{logs.stdout[-4000:]}\n{logs.stderr[-2000:]}"
    assert docker("inspect", "-f", "{{.State.OOMKilled}}", name).stdout.strip() == "false"

    run = f"out/{run_id}/"
    found = keys(s3_bucket, run)
    markers = [k for k in found if k.startswith(PREFIX) and k.endswith("/" + MARKER)]
    assert len(markers) == 1, f"expected one committed checkpoint, found {sorted(found)}"
    folder = markers[0][: -len(MARKER)]
    stopped_at = int(folder.rstrip("/").rsplit("-", 1)[1])
    assert step <= stopped_at < max_steps
    commit = read_json(s3_bucket, run + markers[0])
    assert commit["step"] == stopped_at
    for file, meta in commit["files"].items():
        assert found.get(folder + file) == meta["size"], f"{folder}{file} missing or wrong size"
    assert "trainer_state.json" in commit["files"] and "optimizer.pt" in commit["files"]
    assert COMPLETE not in found, "a stopped run must not be marked complete"
    assert any(e.get("event") == "stopped" for e in events(logs.stdout))

    # the replacement pod: a fresh container (empty /scratch) with the same run id and settings
    # resumes from the committed checkpoint and finishes (other settings would be refused: exit 2)
    env = job_env(s3_bucket, run_id, max_steps=max_steps, checkpoint_steps=0, stop_grace_seconds=50, export="none")
    name = f"qa-job-{run_id}-again"
    containers.append(name)
    proc = docker("run", *run_args(name, assets, env), env=env, timeout=420, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert COMPLETE in keys(s3_bucket, run)
    assert read_json(s3_bucket, run + "manifest.json")["resumed_from_step"] == stopped_at
    assert read_json(s3_bucket, run + "metrics.json")["global_step"] == max_steps
