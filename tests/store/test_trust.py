"""Nothing read from storage or left in the work dir is trusted: results, markers, names and caches are checked first."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.support.jobrun import job_env, run_job

SMALL = dict(QA_MAX_TRAIN_SAMPLES="16", QA_MAX_EVAL_SAMPLES="8", QA_MAX_STEPS="4", QA_CHECKPOINT_STEPS="2", QA_BATCH_SIZE="4")


def killed(tmp_path, tiny_model, point, **extra):
    env = job_env(tmp_path, tiny_model, **{**SMALL, **extra})
    result = run_job(env, module="tests.support.killer", args=(point,))
    assert result.returncode == -9, result.stderr[-2000:]
    return env


def manifest(tmp_path, run="test-run"):
    return json.loads((tmp_path / "out" / run / "manifest.json").read_text())


def test_staged_results_are_only_published_for_the_run_that_made_them(tmp_path, tiny_model):
    env = killed(tmp_path, tiny_model, "kill:put_bytes:COMPLETE@1")  # staged, uploaded, not marked complete
    assert (tmp_path / "work" / "test-run" / "publish" / "model").is_dir()
    # the README's restart recipe: delete the run folder, then rerun with another learning rate and seed
    shutil.rmtree(tmp_path / "out" / "test-run")
    rerun = run_job({**env, "QA_LEARNING_RATE": "1e-3", "QA_SEED": "7"})
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.event("staged_discarded") and rerun.event("train_start") and not rerun.event("publish_staged")
    assert manifest(tmp_path)["settings"]["learning_rate"] == 1e-3 and manifest(tmp_path)["settings"]["seed"] == 7
    assert not (tmp_path / "work" / "test-run" / "publish").exists(), "published staging is cleared"


def test_staged_results_are_not_published_to_another_output(tmp_path, tiny_model):
    env = killed(tmp_path, tiny_model, "kill:put_bytes:COMPLETE@1")
    other = run_job({**env, "QA_OUTPUT_URI": str(tmp_path / "other")})
    assert other.returncode == 0, other.stderr
    assert other.event("staged_discarded") and other.event("train_start")
    assert (tmp_path / "other" / "test-run" / "COMPLETE").is_file()


def test_a_run_folder_is_not_continued_with_other_settings(tmp_path, tiny_model):
    env = killed(tmp_path, tiny_model, "kill:train_step@3")
    result = run_job({**env, "QA_LEARNING_RATE": "1e-3"})
    assert result.returncode == 2, result.stderr
    assert "QA_RUN_ID=test-run" in result.stderr and "learning_rate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not result.event("train_start")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_model):
    """A run killed in its third step, checkpoint-2 committed and the features cached; each test gets a copy."""
    base = tmp_path_factory.mktemp("interrupted")
    killed(base, tiny_model, "slow:train_step=0.3,kill:train_step@3")
    assert (base / "out" / "test-run" / "checkpoints" / "checkpoint-2" / "COMMIT.json").is_file()
    return base


@pytest.fixture
def copy_of(interrupted, tmp_path, tiny_model):
    shutil.copytree(interrupted / "out", tmp_path / "out")
    shutil.copytree(interrupted / "work", tmp_path / "work")
    return job_env(tmp_path, tiny_model, **SMALL)


def rewrite_marker(tmp_path, step, change):
    path = tmp_path / "out" / "test-run" / "checkpoints" / f"checkpoint-{step}" / "COMMIT.json"
    marker = json.loads(path.read_text())
    path.write_text(json.dumps(change(marker)))


@pytest.mark.parametrize("name", ["../../../../escape.txt", "/tmp/qa-escape-{uid}/escape.txt"])
def test_a_marker_naming_a_file_outside_its_folder_is_skipped_and_nothing_is_written(tmp_path, copy_of, name):
    name = name.format(uid=tmp_path.name)
    payload = b"written by a hostile marker\n"
    source = tmp_path / "out" / "test-run" / "checkpoints" / "checkpoint-2" / name.lstrip("/")
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(payload)  # what the hostile bucket serves under that key

    def add(marker):
        marker["files"][name] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        return marker

    rewrite_marker(tmp_path, 2, add)
    # a deeper work dir than the output, so a '..' name lands somewhere else than its source
    rerun = run_job({**copy_of, "QA_WORK_DIR": str(tmp_path / "fresh" / "deeper" / "still")})
    assert rerun.returncode == 0, rerun.stderr
    assert [e["step"] for e in rerun.event("checkpoint_skipped")] == [2] and not rerun.event("resume")
    assert "leaves its folder" in rerun.event("checkpoint_skipped")[0]["reason"]
    escaped = [p for p in tmp_path.rglob("escape.txt") if p.resolve() != source.resolve()]
    escaped += list(Path("/tmp").glob(f"qa-escape-{tmp_path.name}"))
    assert not escaped, escaped


@pytest.mark.parametrize("marker", [{"files": []}, {"step": 2, "files": {"trainer_state.json": {"size": "big", "sha256": "0"}}}])
def test_a_malformed_marker_is_skipped(tmp_path, copy_of, marker):
    rewrite_marker(tmp_path, 2, lambda _: marker)
    rerun = run_job({**copy_of, "QA_WORK_DIR": str(tmp_path / "fresh")})
    assert rerun.returncode == 0, rerun.stderr
    assert [e["step"] for e in rerun.event("checkpoint_skipped")] == [2]


@pytest.mark.parametrize("where, damage, used", [("remote", "replace", "miss"), ("remote", "truncate", "miss"),
                                                 ("local", "replace", "remote")])
def test_a_feature_cache_that_does_not_verify_is_not_used(tmp_path, copy_of, where, damage, used):
    root = tmp_path / ("out/test-run/cache" if where == "remote" else "work/test-run/features")
    train, evals = next(root.rglob("train.parquet")), next(root.rglob("eval.parquet"))
    if damage == "replace":  # a valid Parquet file, just not these features
        shutil.copyfile(evals, train)
    else:
        train.write_bytes(train.read_bytes()[:200])
    work = tmp_path / ("fresh" if where == "remote" else "work")
    rerun = run_job({**copy_of, "QA_WORK_DIR": str(work)})
    assert rerun.returncode == 0, rerun.stderr
    features = rerun.event("features")[0]
    assert rerun.event("features_cache_invalid")[0]["where"] == where and features["cache"] == used
    assert features["train_windows"] > features["eval_windows"]  # the real train features, not the substitute


def test_checkpoint_names_count_ascii_steps_only(tmp_path):
    from job.store.checkpoints import committed_steps
    from job.store.storage import LocalStorage

    store = LocalStorage(tmp_path / "run")
    for name in ("checkpoint-4", "checkpoint-١٢", "checkpoint-²", "checkpoint-007"):
        store.put_bytes(f"checkpoints/{name}/COMMIT.json", b"{}")
    assert committed_steps(store) == [4]  # "١٢" read as step 12 would fetch checkpoint-12, which does not exist
