"""One work dir, several runs: each run's downloads are its own, and what a killed run left is swept by the next start.

The killed run leaves its rows and its download half-done (SIGKILL after its eval file is fetched); two runs with
other data then share the work dir at once (each holds its downloaded file while the other starts and sweeps). They
once shared ``<work>/data/<split>/`` and its ``.part`` name: one exited 1, the other trained on its own file and
recorded the other's sha256 (manifest.json, run.json).
"""
import hashlib
import json
import time

from tests.support.jobrun import DATA, RunningJob, job_env, run_job

ROWS = (DATA / "squad_v1_train_64.jsonl").read_text().splitlines(keepends=True)
SMALL = dict(QA_MAX_STEPS="1", QA_MAX_EVAL_SAMPLES="4", QA_CHECKPOINT_STEPS="0", QA_REPORT_TO="none")


def temporary(work):
    """What the job names temporary (``job.store.scratch``) or a download in progress, anywhere under ``work``."""
    return sorted(p.relative_to(work).as_posix() for p in work.rglob("*")
                  if p.name.endswith((".tmp", ".part")) or ".tmp." in p.name or p.name.startswith(".downloads"))


def test_runs_sharing_a_work_dir_keep_their_own_files_and_sweep_a_killed_ones(tmp_path, tiny_model, s3_bucket):
    put = lambda key, text: s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=text.encode())  # noqa: E731
    data = {"a": "".join(ROWS[:24]), "b": "".join(ROWS[24:64])}  # same name, other rows
    for run, text in data.items():
        put(f"{run}/train.jsonl", text)
    put("eval/dev.jsonl", (DATA / "squad_v1_dev_32.jsonl").read_text())
    work = tmp_path / "work"

    def env(run, run_id=None):
        return job_env(tmp_path, tiny_model, QA_RUN_ID=run_id or f"run-{run}", QA_WORK_DIR=work, **s3_bucket.env, **SMALL,
                       QA_TRAIN_URI=f"s3://{s3_bucket.name}/{run}/train.jsonl", QA_EVAL_URI=f"s3://{s3_bucket.name}/eval/dev.jsonl",
                       KILLER_MEET_DIR=tmp_path / "meet")

    killed = run_job(env("a", "killed"), module="tests.support.killer", args=("kill:data_fetched@2",))
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = temporary(work)
    assert any(p.startswith("killed/rows/.eval.arrow.") for p in left) and any("/data/eval/.downloads" in p for p in left), left

    # b sweeps what the killed run left, downloads its file and waits, holding it (and its rows' temporary
    # file), until a has started, swept the work dir (b is alive: nothing of b's goes) and downloaded its own
    b = RunningJob(env("b"), module="tests.support.killer", args=("meet:data_fetched@1=2",))
    deadline = time.monotonic() + 120
    while not (tmp_path / "meet").is_dir() and time.monotonic() < deadline and b.proc.poll() is None:
        time.sleep(0.05)
    a = RunningJob(env("a"), module="tests.support.killer", args=("meet:data_fetched@1=2",))
    results = {"a": a.finish(), "b": b.finish()}
    for run, result in results.items():
        assert result.returncode == 0, (run, result.stderr[-3000:])
        manifest = json.loads((tmp_path / "out" / f"run-{run}" / "manifest.json").read_text())
        record = json.loads((tmp_path / "out" / f"run-{run}" / "run.json").read_text())
        own = hashlib.sha256(data[run].encode()).hexdigest()
        assert manifest["data"]["train"]["sha256"] == own and record["inputs"]["train_sha256"] == own, run
        assert manifest["data"]["train"]["examples"] == len(data[run].splitlines()), run
    swept = results["b"].event("work_dir_swept")
    assert swept and sorted(swept[0]["paths"]) == left, (swept, left)
    assert not results["a"].event("work_dir_swept")  # b's files, in use, were not a's to sweep
    assert temporary(work) == [] and not (work / "data").exists()
