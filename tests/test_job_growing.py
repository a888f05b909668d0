"""A training prefix that grows while a night runs: the preempted night resumes on the files its first attempt read.

The first attempt is stopped by SIGTERM after step 5 (checkpoint committed, exit 143); a new file
lands under the prefix; the retry must resume from that checkpoint on exactly the files the first
attempt pinned in run.json, with or without QA_TRAIN_SELECT, instead of seeing new data (another
fingerprint: exit 2, the night lost).
"""
import json

import pytest

from tests.support.jobrun import DATA, job_env, run_job

ROWS = (DATA / "squad_v1_train_64.jsonl").read_text().splitlines()


def drop(folder, name, rows):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("".join(f"{r}\n" for r in rows))


@pytest.mark.parametrize("select, read", [("all", ["a.jsonl", "b.jsonl"]), ("newest:2", ["b.jsonl", "c.jsonl"])])
def test_a_retry_reads_the_files_its_first_attempt_read(tmp_path, tiny_model, select, read):
    drops = tmp_path / "drops"
    drop(drops, "a.jsonl", ROWS[:16])
    drop(drops, "b.jsonl", ROWS[16:32])
    if select != "all":
        drop(drops, "c.jsonl", ROWS[32:48])
    env = job_env(tmp_path, tiny_model, QA_TRAIN_URI=f"{drops}/", QA_MAX_STEPS="8", QA_CHECKPOINT_STEPS="4",
                  QA_BATCH_SIZE="4", **({"QA_TRAIN_SELECT": select} if select != "all" else {}))
    stopped = run_job(env, module="tests.support.killer", args=("term:train_step@5",))
    assert stopped.returncode == 143, stopped.stderr + stopped.stdout[-2000:]
    run = tmp_path / "out" / "test-run"
    record = (run / "run.json").read_text()

    drop(drops, "d.jsonl", ROWS[48:64])  # tonight's file lands while the night waits for its retry
    rerun = run_job(env)
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout[-2000:]
    assert rerun.event("resume")[0]["step"] == 5 and rerun.event("data_pinned")[0]["files"] == len(read)
    manifest = json.loads((run / "manifest.json").read_text())
    assert [f["key"] for f in manifest["data"]["train"]["files"]] == read
    pinned = json.loads(record)["data_files"]
    assert [f["key"] for f in pinned["train"]["files"]] == read and pinned["train"]["select"] == select
    assert (run / "run.json").read_text() == record  # the retry read the pin, it did not rewrite it
