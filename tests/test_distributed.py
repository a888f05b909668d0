"""Two processes under torchrun (gloo, CPU) through job.launch: train, publish once, resume, stop."""
import json
import signal
import uuid

import pytest
import torch
from safetensors.torch import load as load_safetensors

from tests.support.jobrun import RunningJob, job_env, run_job
from tests.support.s3_fixtures import s3_env

LAUNCH = ("--nproc_per_node=2", "--standalone")
SETTINGS = dict(QA_MAX_TRAIN_SAMPLES="24", QA_MAX_STEPS="8", QA_CHECKPOINT_STEPS="2", QA_BATCH_SIZE="2",
                QA_LOGGING_STEPS="1")


@pytest.fixture(scope="module")
def bucket(seaweed):
    name = f"dist-{uuid.uuid4().hex[:10]}"
    seaweed.client().create_bucket(Bucket=name)
    return name, seaweed


def env_for(bucket, tmp, model, run_id, **extra):
    name, server = bucket
    return job_env(tmp, model, QA_RUN_ID=run_id, QA_OUTPUT_URI=f"s3://{name}/runs", **{**SETTINGS, **s3_env(server), **extra})


def weights(bucket, run_id):
    name, server = bucket
    return load_safetensors(server.client().get_object(Bucket=name, Key=f"runs/{run_id}/model/model.safetensors")["Body"].read())


def committed(bucket, run_id):
    name, server = bucket
    keys = [o["Key"] for o in server.client().list_objects_v2(Bucket=name, Prefix=f"runs/{run_id}/checkpoints/").get("Contents", [])]
    return {int(k.split("checkpoint-")[1].split("/")[0]) for k in keys if k.endswith("COMMIT.json")}


@pytest.fixture(scope="module")
def uninterrupted(bucket, tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("dist")
    result = run_job(env_for(bucket, tmp, tiny_model, "dist-ref"), module="job.launch", args=LAUNCH)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return result


def test_both_ranks_train_only_rank_0_writes(uninterrupted, bucket):
    assert {e["rank"] for e in uninterrupted.event("train_start")} == {0, 1}
    writes = uninterrupted.event("checkpoint_committed") + uninterrupted.event("published") + uninterrupted.event("lease")
    assert writes and {e["rank"] for e in writes} == {0}
    name, server = bucket
    metrics = json.loads(server.client().get_object(Bucket=name, Key="runs/dist-ref/metrics.json")["Body"].read())
    assert metrics["global_step"] == 8
    manifest = json.loads(server.client().get_object(Bucket=name, Key="runs/dist-ref/manifest.json")["Body"].read())
    assert manifest["world_size"] == 2
    assert weights(bucket, "dist-ref")  # the published model loads


def test_killed_under_torchrun_resumes_under_torchrun(uninterrupted, bucket, tmp_path, tiny_model):
    env = env_for(bucket, tmp_path, tiny_model, "dist-kill")
    killed = run_job(env, module="job.launch", args=(*LAUNCH, "--entry", "tests.support.killer",
                                                        "slow:train_step=0.2,kill:put_bytes:COMMIT.json@2"))
    assert killed.returncode != 0 and killed.event("fault_injected")
    at_kill = committed(bucket, "dist-kill")
    assert at_kill
    rerun = run_job({**env, "QA_WORK_DIR": str(tmp_path / "fresh")}, module="job.launch", args=LAUNCH)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [e["step"] for e in rerun.event("resume")] == [max(at_kill)]  # rank 0 picks and fetches it
    assert {(e["rank"], e["resume_step"]) for e in rerun.event("setup")} == {(0, max(at_kill)), (1, max(at_kill))}
    a, b = weights(bucket, "dist-kill"), weights(bucket, "dist-ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_to_the_launcher_exits_143_with_a_checkpoint(bucket, tmp_path, tiny_model):
    env = env_for(bucket, tmp_path, tiny_model, "dist-term", QA_MAX_STEPS="200", QA_CHECKPOINT_STEPS="1000")
    job = RunningJob(env, module="job.launch", args=(*LAUNCH, "--entry", "tests.support.killer", "slow:train_step=0.2"))
    job.wait_for("progress", where=lambda e: e["step"] >= 3)
    job.proc.send_signal(signal.SIGTERM)
    result = job.finish(timeout=120)
    assert result.returncode == 143, result.stderr[-3000:]
    assert len(committed(bucket, "dist-term")) == 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(env, tmp, label, spec=None):
    """Two torchrun "nodes" on this machine: two launches, one process each, each with its own work dir."""
    port = free_port()
    jobs = []
    for node in (0, 1):
        args = ("--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}")
        if spec:
            args += ("--entry", "tests.support.killer", spec)
        jobs.append(RunningJob({**env, "QA_WORK_DIR": str(tmp / f"{label}-node{node}")}, module="job.launch", args=args))
    return [job.finish(timeout=300) for job in jobs]


@pytest.fixture(scope="module")
def two_node_reference(bucket, tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("two-node-ref")
    results = two_nodes(env_for(bucket, tmp, tiny_model, "two-nodes-ref"), tmp, "ref")
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    return weights(bucket, "two-nodes-ref")


def test_two_nodes_killed_resume_exactly(two_node_reference, bucket, tmp_path, tiny_model):
    """Each node uploads the RNG state of its own ranks; the marker lists every rank's files before it counts."""
    env = env_for(bucket, tmp_path, tiny_model, "two-nodes")
    killed = two_nodes(env, tmp_path, "first", "slow:train_step=0.4,kill:train_step@5")
    assert all(r.returncode != 0 for r in killed) and any(r.event("fault_injected") for r in killed)
    at_kill = committed(bucket, "two-nodes")
    assert at_kill and max(at_kill) < 8
    name, server = bucket
    marker = json.loads(server.client().get_object(
        Bucket=name, Key=f"runs/two-nodes/checkpoints/checkpoint-{max(at_kill)}/COMMIT.json")["Body"].read())
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(marker["files"]) and marker["world_size"] == 2
    assert killed[1].event("checkpoint_part")  # node 1 uploaded its own share
    rerun = two_nodes(env, tmp_path, "fresh")  # fresh work dirs: only storage survives
    assert [r.returncode for r in rerun] == [0, 0], [r.stderr[-2000:] for r in rerun]
    assert {e["resume_step"] for r in rerun for e in r.event("setup")} == {max(at_kill)}
    a = weights(bucket, "two-nodes")
    assert all(torch.equal(a[k], two_node_reference[k]) for k in a)
