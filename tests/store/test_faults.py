"""Storage faults during a run, through our own TCP proxy and a real SeaweedFS server."""
import hashlib
import json
import time
import uuid

from tests.support.jobrun import RunningJob, job_env, run_job
from tests.support.s3_fixtures import s3_env

FAST = dict(QA_MAX_TRAIN_SAMPLES="24", QA_BATCH_SIZE="4", QA_LOGGING_STEPS="1", QA_STORAGE_ATTEMPTS="3",
            QA_STORAGE_BACKOFF_SECONDS="0.2", QA_STORAGE_TIMEOUT_SECONDS="3")


def verify_committed(client, bucket, run_prefix) -> list[int]:
    """Every committed checkpoint's files exist with the size and sha256 its marker lists."""
    keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=run_prefix + "checkpoints/")
            for o in page.get("Contents", [])}
    steps = []
    for marker in sorted(k for k in keys if k.endswith("/COMMIT.json")):
        base = marker[: -len("COMMIT.json")]
        manifest = json.loads(client.get_object(Bucket=bucket, Key=marker)["Body"].read())
        for name, meta in manifest["files"].items():
            body = client.get_object(Bucket=bucket, Key=base + name)["Body"].read()
            assert len(body) == meta["size"] and hashlib.sha256(body).hexdigest() == meta["sha256"], base + name
        steps.append(manifest["step"])
    return steps


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def new_bucket(server):
    name = f"faults-{uuid.uuid4().hex[:10]}"
    server.client().create_bucket(Bucket=name)
    return name


def test_connection_resets_during_uploads_are_survived(seaweed, fault_proxy, tmp_path, tiny_model):
    bucket, proxy = new_bucket(seaweed), fault_proxy(seaweed)
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{bucket}/runs", QA_MAX_STEPS="60", QA_CHECKPOINT_STEPS="2",
                  **{**FAST, **s3_env(seaweed, proxy.endpoint)})
    job = RunningJob(env, module="tests.support.killer", args=("slow:train_step=0.1",))
    job.wait_for("train_start")
    proxy.reset_next(4)  # the next connections (uploads, lease renewals) are reset
    job.wait_for("storage_retry", timeout=60)
    wait_until(lambda: proxy.resets_done >= 4)
    proxy.reset_after_bytes(20_000)  # then uploads are cut midway for a while
    wait_until(lambda: proxy.resets_done >= 6)
    proxy.pass_through()
    result = job.finish()
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    assert len(result.event("progress")) == 60  # training never stopped
    assert verify_committed(seaweed.client(), bucket, "runs/test-run/")
    assert seaweed.client().head_object(Bucket=bucket, Key="runs/test-run/COMPLETE")


class LocalCheckpoints:
    """Counts the local checkpoint folders many times a second, from a thread; keeps the largest count seen."""

    def __init__(self, trainer_dir):
        import threading

        self.trainer_dir, self.most, self._done = trainer_dir, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._done.wait(0.02):
            self.most = max(self.most, len(list(self.trainer_dir.glob("checkpoint-*"))))

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.most


def test_server_down_for_20_seconds_mid_run(seaweed_private, tmp_path, tiny_model):
    """Training goes on through the outage, and the checkpoints it cannot upload do not pile up on the scratch disk."""
    server = seaweed_private
    bucket = new_bucket(server)
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{bucket}/runs", QA_MAX_STEPS="60", QA_CHECKPOINT_STEPS="2",
                  **{**FAST, **s3_env(server)})
    job = RunningJob(env, module="tests.support.killer", args=("slow:train_step=0.5",))
    job.wait_for("checkpoint_committed", timeout=120)
    local = LocalCheckpoints(tmp_path / "work" / "test-run" / "trainer")
    server.stop()
    down_at = time.time()
    time.sleep(20)
    server.start()
    up_at = time.time()
    result = job.finish()
    most_local = local.stop()
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    # ~20 checkpoints were saved during the outage; at most the committed one, the one in upload,
    # one waiting and the one being written exist at once (job/store/uploader.py)
    assert 2 <= most_local <= 4, most_local

    def when(event):
        return time.mktime(time.strptime(event["ts"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone

    steps_during_outage = [e["step"] for e in result.event("progress") if down_at + 1 < when(e) < up_at - 1]
    assert len(steps_during_outage) >= 10, "training must go on while storage is down"
    assert result.event("checkpoint_retry")
    assert max(verify_committed(server.client(), bucket, "runs/test-run/")) == 60


def test_storage_unreachable_at_publish_exits_75_then_rerun_publishes(seaweed, fault_proxy, tmp_path, tiny_model):
    bucket, proxy = new_bucket(seaweed), fault_proxy(seaweed)
    env = job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"s3://{bucket}/runs", QA_MAX_STEPS="4",
                  **{**FAST, **s3_env(seaweed, proxy.endpoint)})
    job = RunningJob(env, module="tests.support.killer", args=("pause:stage=2",))
    job.wait_for("eval", timeout=120)
    proxy.reset_next(1_000_000)
    result = job.finish()
    assert result.returncode == 75, result.stderr + result.stdout[-3000:]
    assert "unreachable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "work" / "test-run" / "publish" / "model" / "model.safetensors").is_file()

    proxy.pass_through()
    rerun = run_job(env)
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout[-3000:]
    assert rerun.event("publish_staged") and not rerun.event("train_start")
    client = seaweed.client()
    metrics = json.loads(client.get_object(Bucket=bucket, Key="runs/test-run/metrics.json")["Body"].read())
    assert metrics["global_step"] == 4 and client.head_object(Bucket=bucket, Key="runs/test-run/COMPLETE")


def test_a_store_that_refuses_conditional_writes_is_a_configuration_error(seaweed, fault_proxy, monkeypatch):
    """501 NotImplemented to IfNoneMatch/IfMatch is a missing feature, not an outage: exit 2 at once, not 75 after retries."""
    from job.channels.channel import Channel
    from job.errors import EXIT_CONFIG
    from job.store.lease import Lease
    from job.store.storage import RetryPolicy, open_storage

    bucket, proxy = new_bucket(seaweed), fault_proxy(seaweed)
    for k, v in s3_env(seaweed).items():
        monkeypatch.setenv(k, v)
    store = open_storage(f"s3://{bucket}/out", RetryPolicy(attempts=3, backoff_seconds=0.5, timeout_seconds=5), proxy.endpoint)
    proxy.refuse_conditional_writes()
    store.put_bytes("plain.json", b"{}")  # unconditional writes still go through
    started = time.monotonic()
    for attempt in (lambda: Channel(store, "production").check_conditional_writes(),
                    lambda: Lease(store, "r", ttl_seconds=6).acquire()):
        try:
            attempt()
        except Exception as exc:  # noqa: BLE001  the exit code is what is asserted
            assert getattr(exc, "exit_code", None) == EXIT_CONFIG, repr(exc)
            assert "conditional writes" in str(exc)
        else:
            raise AssertionError("a store refusing conditional writes was accepted")
    assert time.monotonic() - started < 1.5, "retried as if transient"
    assert seaweed.client().list_objects_v2(Bucket=bucket, Prefix="out/").get("KeyCount") == 1  # plain.json alone


def test_a_renewal_that_landed_but_whose_reply_was_lost_keeps_the_lease(seaweed, fault_proxy, monkeypatch):
    """The retried compare-and-swap finds the lease already moved, by this process: still held, not 'taken over'."""
    from job.store.lease import KEY, Lease
    from job.store.storage import RetryPolicy, open_storage

    bucket, proxy = new_bucket(seaweed), fault_proxy(seaweed)
    for k, v in s3_env(seaweed).items():
        monkeypatch.setenv(k, v)
    store = open_storage(f"s3://{bucket}/out", RetryPolicy(attempts=3, backoff_seconds=0.1, timeout_seconds=5), proxy.endpoint)
    lease = Lease(store, "r", ttl_seconds=60)
    lease.acquire()
    before = lease.etag
    proxy.lose_next_replies(1)
    lease._renew()  # one renewal, as the renewal thread and ensure_held make it
    assert proxy.resets_done == 1, "the reply was not lost: the test did not test anything"
    assert not lease.lost.is_set()
    assert lease.etag != before and lease.etag == store.get_bytes(KEY)[1], "the lease's own write is the one it holds"
    lease.verify()  # and the next commit point still sees it held
    lease.release()
    assert not seaweed.client().list_objects_v2(Bucket=bucket, Prefix="out/").get("KeyCount")
