"""One process per run id: the storage lease, on a real S3 server and on local disk."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from job.errors import RunLocked, StorageDenied, StorageUnavailable
from job.store.lease import KEY, Lease, LeaseLost
from job.store.storage import LocalStorage
from tests.support.jobrun import ROOT, RunningJob, job_env, run_job


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
    stale = {"holder": "old", "host": "node-that-died", "pid": 1, "ttl_seconds": 2, "expires_at": time.time() - 5}
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=f"runs/test-run/{KEY}", Body=json.dumps(stale).encode())
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{s3_bucket.name}/runs", QA_MAX_STEPS="2", **s3_bucket.env)
    result = run_job(env)
    assert result.returncode == 0, result.stderr
    assert result.event("lease_wait")[0]["seconds"] == 2  # its own TTL unrenewed, whatever its expires_at said
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
    with renewing_holder(store, {"holder": "live", "host": "other-node", "pid": 1}, ttl=1.5):
        with pytest.raises(RunLocked, match="QA_RUN_ID=r is already running on other-node"):
            Lease(store, "r", ttl_seconds=1.5).acquire()


HOLD = """
import sys, time
from pathlib import Path
from job.store.lease import Lease
from job.store.storage import LocalStorage
ttl = float(sys.argv[3]) if len(sys.argv) > 3 else 300
lease = Lease(LocalStorage(Path(sys.argv[1])), "r", ttl_seconds=ttl, lock_dir=Path(sys.argv[2]))
lease.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_dead_holder_with_this_work_dir_is_taken_over_at_once(tmp_path):
    """The holder's lock file in the work dir is free once it died: no need to wait out its 300 s TTL."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out"), str(tmp_path / "work")],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match="already running in this work dir"):  # alive: refused at once
            Lease(LocalStorage(tmp_path / "out"), "r", ttl_seconds=300, lock_dir=tmp_path / "work").acquire()
    finally:
        holder.kill()
        holder.wait()
    started = time.monotonic()
    with Lease(LocalStorage(tmp_path / "out"), "r", ttl_seconds=300, lock_dir=tmp_path / "work"):
        pass
    assert time.monotonic() - started < 2


def test_a_copied_work_dir_does_not_prove_its_holder_dead(tmp_path):
    """A snapshot, an rsync or another node's view of a network volume carries lease.lock without its lock."""
    import shutil

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out"), str(tmp_path / "work"), "1.5"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "copy").mkdir()
        shutil.copy2(tmp_path / "work" / "lease.lock", tmp_path / "copy" / "lease.lock")
        started = time.monotonic()
        with pytest.raises(RunLocked, match="is already running"):  # watched, saw it renewed
            Lease(LocalStorage(tmp_path / "out"), "r", ttl_seconds=1.5, lock_dir=tmp_path / "copy").acquire()
        assert time.monotonic() - started > 0.2
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


class SkewedClock:
    """``time`` as this process sees it with its clock off by ``offset`` seconds (the monotonic clock is not)."""

    def __init__(self, offset: float):
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.mark.parametrize("whose, offset", [("replacement ahead", 10.0), ("holder behind", -10.0)])
def test_a_wrong_clock_never_steals_a_live_lease(tmp_path, monkeypatch, whose, offset):
    """Clocks differ by more than the TTL: an expires_at in the past is no proof of death, only an unrenewed TTL is."""
    import job.store.lease

    store = LocalStorage(tmp_path)
    if whose == "replacement ahead":
        monkeypatch.setattr(job.store.lease, "time", SkewedClock(offset))
    with renewing_holder(store, {"holder": "live", "host": "other-node", "ttl_seconds": 1.5}, ttl=1.5,
                         clock=offset if whose == "holder behind" else 0.0):
        with pytest.raises(RunLocked, match="already running on other-node"):
            Lease(store, "r", ttl_seconds=1.5).acquire()
        assert json.loads(store.get_bytes(KEY)[0])["holder"] == "live"


def test_live_holder_with_our_host_name_and_pid_is_not_robbed(tmp_path):
    """Two containers on one node can share host name and pid (separate PID namespaces): neither is proof of death."""
    store = LocalStorage(tmp_path)
    # a live job in another container: same host name, same pid as ours, renewing
    with renewing_holder(store, {"holder": "other", "host": socket.gethostname(), "pid": os.getpid()}, ttl=2):
        with pytest.raises(RunLocked, match="already running"):
            Lease(store, "r", ttl_seconds=2, lock_dir=tmp_path / "work").acquire()


# "far future" is made inside the test: a parameter computed at collection differs between
# pytest-xdist workers, which then refuse to run
@pytest.mark.parametrize("expires_at", ["far future", "soon", None, float("nan")])
def test_unrenewed_lease_with_a_hostile_expiry_is_taken_over_after_one_ttl(tmp_path, expires_at):
    store = LocalStorage(tmp_path)
    if expires_at == "far future":
        expires_at = time.time() + 10 ** 7
    raw = json.dumps({"holder": "gone", "host": "elsewhere", "expires_at": expires_at}).replace("NaN", "1e999")
    store.put_bytes(KEY, raw.encode())
    started = time.monotonic()
    with Lease(store, "r", ttl_seconds=2):
        pass
    assert time.monotonic() - started < 6


class DenyAfter(LocalStorage):
    """Local storage that refuses writes of the lease once told to (an expired token, a revoked role)."""

    deny = False

    def put_bytes(self, key, data, **kw):
        if self.deny and key == KEY:
            raise StorageDenied("AccessDenied")
        return super().put_bytes(key, data, **kw)


@pytest.mark.parametrize("fault", ["deleted", "denied", "taken"])
def test_a_lease_that_cannot_be_renewed_is_lost_and_fences_every_write(tmp_path, fault):
    store = DenyAfter(tmp_path)
    lease = Lease(store, "r", ttl_seconds=1.5)
    lease.acquire()
    fenced = lease.guard(store)
    fenced.put_bytes("before.json", b"{}")
    if fault == "deleted":
        (tmp_path / KEY).unlink()
    elif fault == "denied":
        store.deny = True
    else:
        store.put_bytes(KEY, json.dumps({"holder": "thief", "expires_at": time.time() + 60}).encode())
    assert lease.lost.wait(5), "the renewal thread must notice"
    for write in (lambda: fenced.put_bytes("after.json", b"{}"), lambda: fenced.delete("before.json"),
                  lambda: fenced.put_file(tmp_path / "before.json", "copy.json")):
        with pytest.raises(LeaseLost):
            write()
    assert not (tmp_path / "after.json").exists() and not (tmp_path / "copy.json").exists()
    assert (tmp_path / "before.json").exists()
    lease.release()


def test_a_stolen_lease_is_noticed_before_the_next_commit(tmp_path):
    """Between renewals, a commit point reads the lease back: a thief is seen before anything is committed."""
    store = LocalStorage(tmp_path)
    lease = Lease(store, "r", ttl_seconds=60)  # no renewal during this test
    lease.acquire()
    store.put_bytes(KEY, json.dumps({"holder": "thief", "expires_at": time.time() + 60}).encode())
    with pytest.raises(LeaseLost):
        lease.guard(store).put_bytes("checkpoints/checkpoint-4/COMMIT.json", b"{}")
    assert lease.lost.is_set() and not (tmp_path / "checkpoints").exists()
    lease.release()


def test_a_job_that_loses_its_lease_stops_and_writes_nothing_more(tmp_path, tiny_model):
    env = job_env(tmp_path, tiny_model, QA_MAX_STEPS="300", QA_CHECKPOINT_STEPS="2", QA_LEASE_SECONDS="6",
                  QA_STORAGE_TIMEOUT_SECONDS="3")
    job = RunningJob(env, module="tests.support.killer", args=("slow:train_step=0.2",))
    job.wait_for("checkpoint_committed", timeout=120)
    run = tmp_path / "out" / "test-run"
    (run / KEY).write_text(json.dumps({"holder": "thief", "host": "elsewhere", "ttl_seconds": 6, "expires_at": time.time() + 60}))
    result = job.finish(timeout=120)
    assert result.returncode == 4, result.stderr[-2000:]
    events = [e.get("event") for e in result.events]
    lost = events.index("lease_lost")
    assert "checkpoint_committed" not in events[lost:] and "published" not in events
    committed_before = max(e["step"] for e in result.event("checkpoint_committed"))
    on_disk = [int(p.parent.name.split("-")[1]) for p in run.glob("checkpoints/*/COMMIT.json")]
    assert on_disk and max(on_disk) == committed_before
    assert json.loads((run / KEY).read_text())["holder"] == "thief"  # not released, not overwritten


def test_a_job_that_waited_for_the_lease_does_not_publish_a_run_its_holder_completed(tmp_path, tiny_model):
    """Found by the soak (bench/soak.py, a run id started twice): the second process saw no COMPLETE, waited for
    the lease, took it once the first released it, and trained, evaluated and published the complete run again."""
    env = job_env(tmp_path, tiny_model, QA_MAX_STEPS="4", QA_LEASE_SECONDS="60")  # no renewal while the second watches
    first = RunningJob({**env, "QA_WORK_DIR": str(tmp_path / "work-a")}, module="tests.support.killer",
                       args=("slow:train_step=1.0",))
    first.wait_for("train_start")
    second = RunningJob({**env, "QA_WORK_DIR": str(tmp_path / "work-b")})
    second.wait_for("lease_wait")  # it looked for COMPLETE before the first finished
    assert first.finish().returncode == 0
    run = tmp_path / "out" / "test-run"
    published = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    waited = second.finish(timeout=120)
    assert waited.returncode == 0, waited.stderr[-2000:]
    assert waited.event("already_complete") and not waited.event("train_start") and not waited.event("published")
    assert {p: p.read_bytes() for p in published} == published


class Partitioned(LocalStorage):
    """This process's view of the storage: unreachable while ``down`` (another process sees it fine)."""

    down = False

    def _fail(self):
        if self.down:
            raise StorageUnavailable("partitioned")

    def put_bytes(self, key, data, **kw):
        self._fail()
        return super().put_bytes(key, data, **kw)

    def get_bytes(self, key):
        self._fail()
        return super().get_bytes(key)

    def put_file(self, local, key):
        self._fail()
        return super().put_file(local, key)


def test_a_partitioned_holder_keeps_training_but_a_taken_over_lease_stops_its_next_write(tmp_path):
    mine = Partitioned(tmp_path)
    lease = Lease(mine, "r", ttl_seconds=1.5)
    lease.acquire()
    fenced = lease.guard(mine)
    mine.down = True
    time.sleep(1.2)
    assert not lease.lost.is_set(), "an outage alone is not a lost lease: training goes on"
    with Lease(LocalStorage(tmp_path), "r", ttl_seconds=1.5) as other:  # watches a whole TTL unrenewed, takes over
        mine.down = False
        with pytest.raises(LeaseLost):
            fenced.put_file(tmp_path / KEY, "checkpoints/checkpoint-9/weights.bin")
        assert not (tmp_path / "checkpoints").exists()
        assert json.loads((tmp_path / KEY).read_text())["holder"] == other.token
    lease.release()


@contextlib.contextmanager
def renewing_holder(store, body: dict, ttl: float, clock: float = 0.0):
    """Another live job holding the lease: it renews every 0.3 s, as a job on another machine would (whose clock is ``clock`` s off)."""
    stop = threading.Event()

    def renew():
        while not stop.is_set():
            store.put_bytes(KEY, json.dumps({**body, "expires_at": time.time() + clock + ttl}).encode())
            stop.wait(0.3)

    thread = threading.Thread(target=renew)
    thread.start()
    try:
        time.sleep(0.1)
        yield
    finally:
        stop.set()
        thread.join()
