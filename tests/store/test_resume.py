"""Kill the job anywhere, rerun it with the same run id: it finishes with the uninterrupted model.

Real Trainer, tiny model, real SeaweedFS. Each fault point SIGKILLs the process (no cleanup of
any kind runs); the rerun must resume only from a committed checkpoint and end at the same step
with the same weights as a run that was never interrupted.
"""
import json
import uuid

import pytest
import torch
from safetensors.torch import load as load_safetensors

from tests.support.jobrun import job_env, run_job

# 24 examples give 4 steps per epoch at this window size: 12 steps cross two epoch boundaries.
RESUME = dict(QA_MAX_TRAIN_SAMPLES="24", QA_MAX_STEPS="12", QA_CHECKPOINT_STEPS="2", QA_CHECKPOINTS_TO_KEEP="2",
              QA_BATCH_SIZE="4", QA_LOGGING_STEPS="1")
# CPU kernels are deterministic for a fixed seed and thread count, and resume restores the RNG,
# optimizer, scheduler and data position: any difference is a resume bug, so the tolerance is 0.
ATOL = 0.0
SLOW = "slow:train_step=0.15"


@pytest.fixture(scope="module")
def bucket(seaweed):
    from tests.support.s3_fixtures import s3_env

    name = f"resume-{uuid.uuid4().hex[:10]}"
    seaweed.client().create_bucket(Bucket=name)
    return name, s3_env(seaweed), seaweed.client()


def env_for(bucket, tmp, model, run_id, **extra):
    name, s3, _ = bucket
    return job_env(tmp, model, QA_RUN_ID=run_id, QA_OUTPUT_URI=f"s3://{name}/runs", **{**RESUME, **s3, **extra})


def keys(bucket, prefix):
    name, _, client = bucket
    return {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix)
            for o in page.get("Contents", [])}


def committed(bucket, run_id):
    return {int(k.split("/checkpoint-")[1].split("/")[0]) for k in keys(bucket, f"runs/{run_id}/checkpoints/")
            if k.endswith("/COMMIT.json")}


def weights(bucket, run_id):
    name, _, client = bucket
    raw = client.get_object(Bucket=name, Key=f"runs/{run_id}/model/model.safetensors")["Body"].read()
    return load_safetensors(raw)


def final_step(bucket, run_id):
    name, _, client = bucket
    return json.loads(client.get_object(Bucket=name, Key=f"runs/{run_id}/metrics.json")["Body"].read())["global_step"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=ATOL), (k, (a[k] - b[k]).abs().max().item())


@pytest.fixture(scope="module")
def reference(bucket, tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("reference")
    result = run_job(env_for(bucket, tmp, tiny_model, "reference"))
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    assert final_step(bucket, "reference") == 12
    # QA_CHECKPOINTS_TO_KEEP=2: older ones deleted once newer ones were committed, nothing half-left
    # (which ones depends on upload timing: a queued checkpoint is superseded by a newer one)
    kept = committed(bucket, "reference")
    assert len(kept) == 2 and 12 in kept
    assert {k.split("/")[3] for k in keys(bucket, "runs/reference/checkpoints/")} == {f"checkpoint-{s}" for s in kept}
    return weights(bucket, "reference")


KILL_POINTS = [
    "kill:train_step@1",                       # mid-step, before any checkpoint exists
    "kill:train_step@3",                       # mid-step, after a committed checkpoint
    "kill:train_step@10",                      # mid-step in the third epoch
    "kill:save_optimizer@2",                   # during the local save (weights written, optimizer not)
    "kill:put_file:optimizer.pt@2",            # during a checkpoint upload
    "kill:put_bytes:COMMIT.json@3",            # files uploaded, commit marker not yet written
    "kill:delete:checkpoints/@1",              # while pruning an older checkpoint
    "kill:put_file:cache/features@1",          # while caching the features
    "kill:lease@1",                            # right after taking the lease
    "kill:train_end@1",                        # training done, before evaluation
    "kill:evaluate@1",                         # during evaluation
    "kill:put_file:model/model.safetensors@1",  # during the final publish
    "kill:put_bytes:COMPLETE@1",               # everything published but the completion marker
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_anywhere_then_resume(point, bucket, tmp_path, tiny_model, reference):
    run_id = "k-" + point.split(":", 1)[1].replace(":", "-").replace("/", "-").replace("@", "-").replace(".", "-")
    env = env_for(bucket, tmp_path, tiny_model, run_id)
    # slow steps let uploads keep up, so the Nth upload or commit a point names really happens
    killed = run_job(env, module="tests.support.killer", args=(f"{SLOW},{point}",))
    assert killed.returncode == -9, killed.stderr + killed.stdout[-2000:]
    assert killed.event("fault_injected")
    committed_at_kill = committed(bucket, run_id)

    # a fresh machine: nothing local survives, only what is in storage
    rerun = run_job({**env, "QA_WORK_DIR": str(tmp_path / "fresh-work")})
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout[-3000:]
    for event in rerun.event("resume"):
        assert event["step"] in committed_at_kill, (event, committed_at_kill)
    assert final_step(bucket, run_id) == 12
    assert_same_weights(weights(bucket, run_id), reference)
    assert f"runs/{run_id}/COMPLETE" in keys(bucket, f"runs/{run_id}/")


def test_resume_on_the_same_machine_reuses_local_files(bucket, tmp_path, tiny_model, reference):
    env = env_for(bucket, tmp_path, tiny_model, "same-machine")
    # under load the uploads may lag the steps: the kill waits for a committed checkpoint, so there is one to resume
    killer = f"{SLOW},wait:train_step@7=committed,kill:train_step@7"
    assert run_job(env, module="tests.support.killer", args=(killer,)).returncode == -9
    rerun = run_job(env)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.event("resume") and rerun.event("features")[0]["cache"] == "local"
    assert_same_weights(weights(bucket, "same-machine"), reference)


def test_sigterm_checkpoints_and_exits_143(bucket, tmp_path, tiny_model, reference):
    env = env_for(bucket, tmp_path, tiny_model, "sigterm", QA_CHECKPOINT_STEPS="100")
    stopped = run_job(env, module="tests.support.killer", args=("term:train_step@5",))
    assert stopped.returncode == 143, stopped.stderr + stopped.stdout[-2000:]
    assert committed(bucket, "sigterm") == {5}
    assert "qa-finetune: error: stopped by SIGTERM" in stopped.stderr
    rerun = run_job({**env, "QA_WORK_DIR": str(tmp_path / "fresh")})
    assert rerun.returncode == 0 and rerun.event("resume")[0]["step"] == 5
    assert_same_weights(weights(bucket, "sigterm"), reference)


def test_corrupt_checkpoint_is_skipped(bucket, tmp_path, tiny_model, reference):
    env = env_for(bucket, tmp_path, tiny_model, "corrupt")
    # killed as the third checkpoint is about to be committed: two committed ones are left
    assert run_job(env, module="tests.support.killer", args=(f"{SLOW},kill:put_bytes:COMMIT.json@3",)).returncode == -9
    assert len(committed(bucket, "corrupt")) == 2
    newest = max(committed(bucket, "corrupt"))
    name, _, client = bucket
    client.put_object(Bucket=name, Key=f"runs/corrupt/checkpoints/checkpoint-{newest}/optimizer.pt", Body=b"garbage")
    rerun = run_job({**env, "QA_WORK_DIR": str(tmp_path / "fresh")})
    assert rerun.returncode == 0, rerun.stderr
    assert [e["step"] for e in rerun.event("checkpoint_skipped")] == [newest]
    assert rerun.event("resume")[0]["step"] < newest
    assert_same_weights(weights(bucket, "corrupt"), reference)
