"""Stopping: SIGTERM/SIGINT are honoured at every stage, within one deadline, with the code that tells the truth."""
import json
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.support.jobrun import RunningJob, job_env, run_job
from tests.support.s3_fixtures import s3_env

FAST = dict(QA_MAX_TRAIN_SAMPLES="24", QA_BATCH_SIZE="4", QA_LOGGING_STEPS="1", QA_STORAGE_ATTEMPTS="3",
            QA_STORAGE_BACKOFF_SECONDS="0.2", QA_STORAGE_TIMEOUT_SECONDS="3")


def new_bucket(server):
    name = f"stops-{uuid.uuid4().hex[:10]}"
    server.client().create_bucket(Bucket=name)
    return name


def keys(server, bucket, prefix):
    return {o["Key"] for o in server.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


def assert_one_line(result, code, needle):
    assert result.returncode == code, (result.returncode, result.stderr, result.stdout[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_sigterm_during_a_partition_exits_within_the_grace_period(seaweed, fault_proxy, tmp_path, tiny_model):
    """Every step after SIGTERM shares one deadline; the checkpoint could not be committed, so not 143."""
    bucket, proxy = new_bucket(seaweed), fault_proxy(seaweed)
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{bucket}/runs", QA_MAX_STEPS="200", QA_CHECKPOINT_STEPS="3",
                  QA_STOP_GRACE_SECONDS="5", **{**FAST, **s3_env(seaweed, proxy.endpoint)})
    job = RunningJob(env, module="tests.support.killer", args=("slow:train_step=0.2",))
    job.wait_for("checkpoint_committed", timeout=120)
    proxy.blackhole()
    job.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    result = job.finish(timeout=60)
    took = time.monotonic() - sent
    assert took < 5 + 3, f"exited {took:.1f} s after SIGTERM with a 5 s grace"
    assert_one_line(result, 75, "stopped by SIGTERM")
    proxy.pass_through()
    # the lease was not released (storage was unreachable), but nothing was committed for the stop
    committed = {k for k in keys(seaweed, bucket, "runs/test-run/checkpoints/") if k.endswith("COMMIT.json")}
    last_committed = max(int(k.split("checkpoint-")[1].split("/")[0]) for k in committed)
    assert last_committed < max(e["step"] for e in result.event("progress"))
    assert result.event("failed")[0]["error_type"] == "GraceExpired"


def pester(proc, sig, every: float = 0.002) -> threading.Thread:
    """Send ``sig`` to ``proc`` again and again until it has exited: Ctrl-C held down."""
    def send():
        while proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                return
            time.sleep(every)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_sigterm_with_storage_up_commits_and_exits_143_and_later_signals_change_nothing(tmp_path, tiny_model):
    """Ctrl-C pressed again and again, until the very end: once killed during interpreter shutdown, after "(exit 143)"."""
    env = job_env(tmp_path, tiny_model, QA_MAX_STEPS="200", QA_CHECKPOINT_STEPS="100", **FAST)
    job = RunningJob(env, module="tests.support.killer", args=("slow:train_step=0.2",))
    job.wait_for("progress", where=lambda e: e["step"] >= 3)
    job.proc.send_signal(signal.SIGINT)
    job.wait_for("stop_requested")
    pester(job.proc, signal.SIGINT)
    result = job.finish(timeout=60)
    assert_one_line(result, 143, "stopped by SIGINT")
    assert len(result.event("stop_requested")) == 1
    stopped = result.event("stopped")[0]
    assert stopped["committed"] is True
    assert (tmp_path / "out" / "test-run" / "checkpoints" / f"checkpoint-{stopped['step']}" / "COMMIT.json").is_file()


def test_sigterm_during_evaluation_stops_it_and_the_rerun_completes(tmp_path, tiny_model):
    env = job_env(tmp_path, tiny_model, QA_MAX_STEPS="2", QA_EVAL_BATCH_SIZE="1", **FAST)
    result = run_job(env, module="tests.support.killer", args=("term:evaluate@1",))
    assert_one_line(result, 143, "stopped by SIGTERM")
    assert not result.event("eval") and not (tmp_path / "out" / "test-run" / "COMPLETE").exists()
    rerun = run_job(env)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.event("resume")[0]["step"] == 2 and rerun.event("published")


def test_sigterm_during_publish_leaves_nothing_half_published(tmp_path, tiny_model):
    env = job_env(tmp_path, tiny_model, QA_MAX_STEPS="2", **FAST)
    result = run_job(env, module="tests.support.killer", args=("term:put_file:model/config.json@1",))
    assert_one_line(result, 143, "stopped by SIGTERM")
    run = tmp_path / "out" / "test-run"
    assert not (run / "COMPLETE").exists() and not (run / "model" / "model.safetensors").exists()
    rerun = run_job(env)
    assert rerun.returncode == 0 and rerun.event("publish_staged") and not rerun.event("train_start"), rerun.stderr
    assert (run / "COMPLETE").is_file() and (run / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "work" / "test-run" / "publish").exists(), "published staging is cleared"


def test_sigterm_during_the_lease_wait_exits_at_once(tmp_path, tiny_model):
    run = tmp_path / "out" / "test-run"
    run.mkdir(parents=True)
    # a lease nobody renews, claiming a one-hour TTL: the job would watch it for an hour
    (run / "lease.json").write_text(json.dumps({"holder": "gone", "host": "elsewhere", "ttl_seconds": 3600,
                                                "expires_at": time.time() + 3600}))
    job = RunningJob(job_env(tmp_path, tiny_model, **FAST))
    job.wait_for("lease_wait", timeout=60)
    job.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    result = job.finish(timeout=30)
    assert time.monotonic() - sent < 5
    assert_one_line(result, 143, "stopped by SIGTERM")
    assert json.loads((run / "lease.json").read_text())["holder"] == "gone"  # not touched


def handles_sigterm(pid: int) -> bool:
    """Whether the process has its own SIGTERM handler yet (Python itself catches only SIGINT)."""
    try:
        caught = int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigCgt:")).split()[1], 16)
    except (OSError, StopIteration):
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def test_ctrl_c_twice_during_start_up_ends_in_one_line_143(tmp_path, tiny_model):
    """The handler is installed before the slow imports: no KeyboardInterrupt, no 130, no traceback."""
    job = RunningJob(job_env(tmp_path, tiny_model, **FAST))
    deadline = time.monotonic() + 20
    while not handles_sigterm(job.proc.pid):
        assert time.monotonic() < deadline and job.proc.poll() is None, "the job never installed its handler"
        time.sleep(0.01)
    job.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    job.proc.send_signal(signal.SIGINT)
    result = job.finish(timeout=60)
    assert_one_line(result, 143, "stopped by SIGINT")
    assert "Traceback" not in result.stderr and not result.event("train_start")


# A Ctrl-C in a terminal reaches the whole process group: the job and its forked preprocessing
# workers. Each worker once ran the job's handler and logged its own stop_requested.
WORKERS = """
import logging, os, signal, sys, time
from job.observe.logs import setup_logging
from job.runtime.parallel import map_chunks
from job.runtime.preemption import StopRequest

stop = StopRequest(grace_seconds=30).install()
setup_logging(fmt="json")

def chunk(_tokenizer, _rows, begin):
    if begin == 0:
        os.killpg(0, signal.SIGINT)  # Ctrl-C, while both workers are alive
    time.sleep(0.5)
    return begin

print(list(map_chunks(chunk, [0, 1], 2, None, None)), stop.requested, flush=True)
"""


def test_forked_workers_leave_the_stop_to_the_job(tmp_path):
    from tests.support.jobrun import ROOT, JobResult

    proc = subprocess.run([sys.executable, "-c", WORKERS], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          start_new_session=True)  # its own process group, so the Ctrl-C reaches nobody else
    result = JobResult(proc.returncode, proc.stdout, proc.stderr)
    assert proc.returncode == 0 and "[0, 1] True" in proc.stdout, (proc.stdout, proc.stderr)
    assert len(result.event("stop_requested")) == 1, proc.stdout


def test_a_stop_that_outlives_its_grace_period_says_how_a_prediction_shard_resumes(monkeypatch, capsys):
    """job.predict has no run id: its watchdog line says what resumes a shard (it used to say QA_RUN_ID)."""
    import job.predict
    import job.runtime.preemption as preemption
    from job.runtime.preemption import StopRequest

    def leave(code):
        raise SystemExit(code)

    monkeypatch.setattr(preemption.os, "_exit", leave)
    stop = StopRequest(grace_seconds=2)
    stop.signal_name = "SIGTERM"
    with pytest.raises(SystemExit) as ended:
        job.predict.out_of_time(stop)
    err = capsys.readouterr().err.strip()
    assert ended.value.code == 143 and err.startswith("qa-finetune predict: error: stopped by SIGTERM")
    assert "first uncommitted chunk" in err and "QA_RUN_ID" not in err
