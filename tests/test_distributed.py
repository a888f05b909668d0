"""Two processes under torchrun (gloo, CPU) through job.launch: train, publish once, resume, stop.

Also the paths where one process sees something the others do not, which must never leave a rank
waiting in a collective for one that went elsewhere: a channel night re-scoring its holder on
rank 0 alone, node 0's staged results on a rerun, a SIGTERM that reaches one node only, data that
changed between two nodes' reads.
"""
import json
import signal
import uuid

import pytest
import torch
from safetensors.torch import load as load_safetensors

from tests.support.jobrun import DATA, RunningJob, job_env, run_job
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
    # the node's first process tokenizes; the other reads its cache instead of tokenizing side by side
    assert {(e["rank"], e["cache"]) for e in uninterrupted.event("features")} == {(0, "miss"), (1, "local")}
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


def two_nodes(env, tmp, label, spec=None, timeout=300):
    """Two torchrun "nodes" on this machine: two launches, one process each, each with its own work dir."""
    port = free_port()
    jobs = []
    for node in (0, 1):
        args = ("--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}")
        if spec:
            args += ("--entry", "tests.support.killer", spec)
        jobs.append(RunningJob({**env, "QA_WORK_DIR": str(tmp / f"{label}-node{node}")}, module="job.launch", args=args))
    return [job.finish(timeout=timeout) for job in jobs]


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


def test_channel_night_rescoring_its_holder_under_torchrun_is_gated_in_normal_time(uninterrupted, bucket, tmp_path,
                                                                                      tiny_model, monkeypatch):
    """Only rank 0 promotes, after rank 1 has exited: re-scoring the holder must need no collective."""
    from job.channel import main as channel

    name, server = bucket
    for key, value in s3_env(server).items():
        monkeypatch.setenv(key, value)
    assert channel(["promote", "--output", f"s3://{name}/runs", "--channel", "dist", "--run", "dist-ref"]) == 0
    # another eval set than the holder's: its published predictions do not pair with tonight's, it is re-scored
    env = env_for(bucket, tmp_path, tiny_model, "dist-night", QA_CHANNEL="dist", QA_MAX_EVAL_SAMPLES="12",
                  QA_MAX_STEPS="4", QA_GATE_MAX_DROP="100")
    result = RunningJob(env, module="job.launch", args=LAUNCH).finish(timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    (rescored,) = result.event("holder_rescored")
    assert rescored["rank"] == 0 and rescored["holder"] == "dist-ref" and rescored["examples"] == 12
    (promotion,) = result.event("promotion")
    recorded = json.loads(server.client().get_object(Bucket=name, Key="runs/dist-night/promotion.json")["Body"].read())
    assert recorded["decision"] == promotion["decision"] == "promote"
    assert recorded["holder"]["scored_from"] == "re-scored on this run's eval set"


def test_one_node_stopped_then_node_0_lost_at_completion_resumes_and_publishes_exactly(two_node_reference, bucket,
                                                                                       tmp_path, tiny_model):
    """A SIGTERM that reaches one node only, then a rerun whose results are staged on node 0 only.

    1. The node that got no signal stops on the vote and waits for the commit like the other:
       the stop checkpoint is committed and both exit 143.
    2. The rerun resumes from it; rank 0 dies as it marks the run complete, its results staged.
    3. The next rerun: node 0 decides to publish what it staged, node 1 (nothing staged) follows
       instead of training and waiting for a rank that is not coming. The model is the reference's.
    """
    env = env_for(bucket, tmp_path, tiny_model, "two-nodes-term", QA_CHECKPOINT_STEPS="100")
    port = free_port()
    jobs = []
    for node in (0, 1):
        args = ("--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--master_addr=127.0.0.1",
                f"--master_port={port}", "--entry", "tests.support.killer", "slow:train_step=0.4")
        jobs.append(RunningJob({**env, "QA_WORK_DIR": str(tmp_path / f"term-node{node}")}, module="job.launch", args=args))
    jobs[1].wait_for("progress", where=lambda e: e["step"] >= 3)
    jobs[1].proc.send_signal(signal.SIGTERM)
    stopped = [job.finish(timeout=120) for job in jobs]
    assert [r.returncode for r in stopped] == [143, 143], [r.stderr[-2000:] for r in stopped]
    assert {e["committed"] for r in stopped for e in r.event("stopped")} == {True}
    (step,) = committed(bucket, "two-nodes-term")
    assert 3 <= step < 8

    resumed = two_nodes(env, tmp_path, "staged", "kill:put_bytes:COMPLETE@1")
    assert {e["resume_step"] for r in resumed for e in r.event("setup")} == {step}
    assert resumed[0].event("fault_injected") and resumed[0].returncode != 0
    assert (tmp_path / "staged-node0" / "two-nodes-term" / "publish" / ".staged").is_file()
    assert not (tmp_path / "staged-node1" / "two-nodes-term" / "publish").exists()

    rerun = two_nodes(env, tmp_path, "staged", timeout=120)
    assert [r.returncode for r in rerun] == [0, 0], [r.stderr[-2000:] for r in rerun]
    assert rerun[0].event("publish_staged") and not any(r.event("train_start") for r in rerun)
    a = weights(bucket, "two-nodes-term")
    assert all(torch.equal(a[k], two_node_reference[k]) for k in a)



def node_1_reads_late(tmp_path, tiny_model, hook: str, change, **settings) -> list:
    """Two nodes on a first attempt; node 1 waits at ``hook`` (before it reads the data) until node 0
    read both splits and ``change()`` altered the data. Both nodes' results."""
    meet = tmp_path / "meet"
    env = job_env(tmp_path, tiny_model, QA_MAX_STEPS="2", QA_BATCH_SIZE="2", QA_CHECKPOINT_STEPS="100",
                  KILLER_MEET_DIR=str(meet), **settings)
    port = free_port()
    jobs = []
    for node, spec in ((0, ()), (1, ("--entry", "tests.support.killer", f"meet:{hook}@1=2"))):
        args = ("--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--master_addr=127.0.0.1",
                f"--master_port={port}", *spec)
        jobs.append(RunningJob({**env, "QA_WORK_DIR": str(tmp_path / f"node{node}")}, module="job.launch", args=args))
    try:
        jobs[0].wait_for("data", where=lambda e: e["split"] == "eval")  # read after train
        change()
        meet.mkdir(exist_ok=True)
        (meet / "test").touch()  # the second party node 1 waits for: it reads the data now
    finally:
        done = [job.finish(timeout=300) for job in jobs]
    return done


def test_a_file_landing_between_the_nodes_listings_trains_both_on_rank_0s_files(tmp_path, tiny_model):
    """On a first attempt each node lists the data folder itself; a file that lands between node 0's
    listing and node 1's must not give node 1 other training data than the files run.json pins."""
    rows = (DATA / "squad_v1_train_64.jsonl").read_text().splitlines(keepends=True)
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(rows[:16]))
    done = node_1_reads_late(tmp_path, tiny_model, "data_list", lambda: (folder / "b.jsonl").write_text("".join(rows[16:32])),
                             QA_RUN_ID="late-file", QA_TRAIN_URI=f"{folder}/")
    assert [r.returncode for r in done] == [0, 0], [r.stderr[-2000:] for r in done]

    assert [e["files"] for e in done[1].event("data") if e["split"] == "train"][0] == 2  # it did see the late file
    assert done[1].event("data_from_rank0") and not done[0].event("data_from_rank0")
    keys = [{e["cache_key"] for e in r.event("features")} for r in done]
    assert keys[0] == keys[1] and len(keys[0]) == 1, keys  # the same windows: the same rows, tokenized alike
    pinned = json.loads((tmp_path / "out" / "late-file" / "run.json").read_text())["data_files"]["train"]["files"]
    assert [f["key"] for f in pinned] == ["a.jsonl"]


def test_a_data_file_that_differs_between_nodes_is_a_data_error_not_two_trainings(tmp_path, tiny_model):
    """One file, no listing to follow: node 1 reading other eval rows than node 0 ends the run, exit 3."""
    rows = (DATA / "squad_v1_dev_32.jsonl").read_text().splitlines(keepends=True)
    eval_file = tmp_path / "dev.jsonl"
    eval_file.write_text("".join(rows[:16]))
    done = node_1_reads_late(tmp_path, tiny_model, "data_fetch", lambda: eval_file.write_text("".join(rows[16:])),
                             QA_RUN_ID="other-eval", QA_EVAL_URI=str(eval_file))
    assert [r.returncode for r in done] == [3, 3], [r.stderr[-2000:] for r in done]
    assert f"{eval_file}: rank 1 read other eval data than rank 0" in done[1].stderr
    assert "another rank read other data than rank 0" in done[0].stderr
    assert not any(r.event("train_start") for r in done)


def test_a_node_leader_working_longer_than_the_process_group_timeout_and_a_shared_teacher_pass(bucket, tmp_path, tiny_model):
    """Under torchrun the others wait for their node's first process however long it works, not the training
    group's timeout: it is held 12 s tokenizing against an 8 s QA_PROCESS_GROUP_TIMEOUT_SECONDS and the run
    completes. The teacher, an s3:// model, is downloaded once on the node, and both processes score a share
    of the training windows into the node's one array of teacher logits."""
    name, server = bucket
    for file in tiny_model.iterdir():
        server.client().upload_file(str(file), name, f"teachers/tiny/{file.name}")
    env = env_for(bucket, tmp_path, tiny_model, "dist-held", QA_PROCESS_GROUP_TIMEOUT_SECONDS="8",
                  QA_TEACHER_MODEL=f"s3://{name}/teachers/tiny", QA_MAX_STEPS="4", QA_REPORT_TO="none")
    result = run_job(env, module="job.launch", args=(*LAUNCH, "--entry", "tests.support.killer", "pause:features#0=12"))
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert {(e["rank"], e["cache"]) for e in result.event("model_fetched")} == {(0, "miss"), (1, "local")}
    logits = {e["rank"]: e for e in result.event("teacher_logits")}
    assert {r: e["cache"] for r, e in logits.items()} == {0: "miss", 1: "miss"}
    (a, b), (c, d) = logits[0]["scored"], logits[1]["scored"]
    assert a == 0 < b == c < d == logits[0]["windows"]  # consecutive shares, every window scored once
    assert {e["rank"] for e in result.event("train_start")} == {0, 1}
