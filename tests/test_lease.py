"""One process per run id: the storage lease, on a real S3 server and on local disk."""
import json
import socket
import threading
import time

import pytest

from job.errors import RunLocked
from job.lease import KEY, Lease
from job.storage import LocalStorage
from tests.support.jobrun import RunningJob, job_env, run_job


def test_two_jobs_started_together_exactly_one_trains(s3_bucket, tmp_path, tiny_model):
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{s3_bucket.name}/runs", QA_LEASE_SECONDS="6",
                  QA_STORAGE_TIMEOUT_SECONDS="3", QA_MAX_STEPS="40", **s3_bucket.env)
    jobs = [RunningJob({**env, "QA_WORK_DIR": str(tmp_path / f"work{i}")}, module="tests.support.killer",
                       args=("slow:train_step=0.3",)) for i in range(2)]
    results = [job.finish() for job in jobs]
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 4], [(r.returncode, r.stderr) for r in results]
    loser = next(r for r in results if r.returncode == 4)
    assert "is already running" in loser.stderr and len(loser.stderr.strip().splitlines()) == 1
    assert not loser.event("train_start")
    assert sum(bool(r.event("train_start")) for r in results) == 1


def test_stale_lease_of_a_dead_holder_is_taken_over(s3_bucket, tmp_path, tiny_model):
    stale = {"holder": "old", "host": "node-that-died", "pid": 1, "expires_at": time.time() - 5}
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=f"runs/test-run/{KEY}", Body=json.dumps(stale).encode())
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{s3_bucket.name}/runs", QA_MAX_STEPS="2", **s3_bucket.env)
    result = run_job(env)
    assert result.returncode == 0, result.stderr
    assert result.event("lease_takeover")[0]["previous_host"] == "node-that-died"


def test_unrenewed_lease_is_waited_out_not_failed(tmp_path):
    store = LocalStorage(tmp_path)
    body = {"holder": "gone", "host": "elsewhere", "pid": 7, "expires_at": time.time() + 2}
    store.put_bytes(KEY, json.dumps(body).encode())
    started = time.monotonic()
    lease = Lease(store, "r", ttl_seconds=2)
    with lease:
        assert json.loads(store.get_bytes(KEY)[0])["holder"] == lease.token
    assert 1.5 < time.monotonic() - started < 6
    assert not (tmp_path / KEY).exists()  # released


def test_live_holder_on_another_host_keeps_its_lease(tmp_path):
    store = LocalStorage(tmp_path)
    stop = threading.Event()

    def holder():  # renews like a live job on another machine would
        while not stop.is_set():
            body = {"holder": "live", "host": "other-node", "pid": 1, "expires_at": time.time() + 1.5}
            store.put_bytes(KEY, json.dumps(body).encode())
            stop.wait(0.3)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        time.sleep(0.1)
        with pytest.raises(RunLocked, match="QA_RUN_ID=r is already running on other-node"):
            Lease(store, "r", ttl_seconds=1.5).acquire()
    finally:
        stop.set()
        thread.join()


def test_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    store = LocalStorage(tmp_path)
    body = {"holder": "x", "host": socket.gethostname(), "pid": 2 ** 22 + 7, "expires_at": time.time() + 300}
    store.put_bytes(KEY, json.dumps(body).encode())
    started = time.monotonic()
    with Lease(store, "r", ttl_seconds=300):
        pass
    assert time.monotonic() - started < 1
