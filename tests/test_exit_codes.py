"""Every bad input ends with the documented exit code, one line on stderr naming the culprit, and no traceback."""
import json
import subprocess
from pathlib import Path

import pytest

from tests.support.jobrun import DATA, job_env, run_job


def one_line_error(result, code, needle):
    assert result.returncode == code, (result.returncode, result.stderr, result.stdout[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert all(line.startswith("{") for line in result.stdout.splitlines())  # a traceback only inside a JSON line
    failed = [e for e in result.events if e.get("event") == "failed"]
    assert len(failed) == 1 and failed[0]["exit_code"] == code


def rows(n=6):
    return [json.loads(line) for line in (DATA / "squad_v1_train_64.jsonl").read_text().splitlines()[:n]]


def write_rows(path: Path, data) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


@pytest.mark.parametrize("settings, needle", [
    ({"QA_OUTPUT_URI": "s3://Bad_Bucket/runs"}, "QA_OUTPUT_URI: invalid bucket name 'Bad_Bucket'"),
    ({"QA_STOP_GRACE_SECONDS": "inf"}, "QA_STOP_GRACE_SECONDS"),
])
def test_settings_errors_exit_2_before_anything_is_written(tmp_path, tiny_model, settings, needle):
    """The whole table lives in tests/test_settings.py; these two go through the real entry point."""
    result = run_job(job_env(tmp_path, tiny_model, **settings))
    one_line_error(result, 2, needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_file_uri_output_is_a_folder_not_a_folder_named_file(tmp_path, tiny_model):
    result = run_job(job_env(tmp_path, tiny_model, QA_OUTPUT_URI=f"file://{tmp_path}/out", QA_MAX_STEPS="1",
                             QA_MAX_TRAIN_SAMPLES="8", QA_MAX_EVAL_SAMPLES="4", QA_CHECKPOINT_STEPS="0"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "test-run" / "COMPLETE").is_file()
    assert not list(Path.cwd().glob("file:*")) and not list(tmp_path.rglob("file:*"))


def test_bad_row_exits_3_naming_the_row_and_writes_nothing(tmp_path, tiny_model):
    """The whole table of bad rows lives in tests/test_data.py; this one goes through the real entry point."""
    data = rows()
    data[2]["context"] += "\ud800"  # json.dumps writes the lone surrogate as an escape, as a hostile file would
    result = run_job(job_env(tmp_path, tiny_model, QA_TRAIN_URI=write_rows(tmp_path / "train.jsonl", data)))
    one_line_error(result, 3, f"train.jsonl: row '{data[2]['id']}': field 'context' holds an invalid character")
    assert not (tmp_path / "out" / "test-run").exists(), "nothing may be written to the output on a data error"


def test_unanswerable_eval_rows_without_squad_v2_fail_before_training(tmp_path, tiny_model):
    result = run_job(job_env(tmp_path, tiny_model, QA_EVAL_URI=DATA / "squad_v2_dev_24.jsonl"))
    one_line_error(result, 3, "row(s) without an answer")
    assert "QA_SQUAD_V2=true" in result.stderr and not result.event("train_start") and not result.event("features")
    unanswerable = [json.loads(line)["id"] for line in (DATA / "squad_v2_dev_24.jsonl").read_text().splitlines()
                    if not json.loads(line)["answers"]["text"]]
    assert repr(unanswerable[0]) in result.stderr


def test_unwritable_work_dir_is_a_configuration_error(tmp_path, tiny_model):
    (tmp_path / "file").write_text("not a folder")
    result = run_job(job_env(tmp_path, tiny_model, QA_WORK_DIR=tmp_path / "file" / "work"))
    one_line_error(result, 2, "QA_WORK_DIR=")


@pytest.fixture
def mounted(tmp_path):
    """Real filesystems with real errors: a read-only one and a 1 MiB one (root only, as in CI)."""
    made = []

    def mount(name, options):
        path = tmp_path / name
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
            pytest.skip("needs root to mount a tmpfs")
        made.append(path)
        return path

    yield mount
    for path in made:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_output_is_a_configuration_error(tmp_path, tiny_model, mounted):
    out = mounted("ro", "ro,size=1m")
    one_line_error(run_job(job_env(tmp_path, tiny_model, QA_OUTPUT_URI=out / "runs")), 2, "QA_OUTPUT_URI=")


def test_full_output_disk_exits_75_and_leaves_no_part_files(tmp_path, tiny_model, mounted):
    out = mounted("small", "size=1m")  # room for markers, not for a model
    result = run_job(job_env(tmp_path, tiny_model, QA_OUTPUT_URI=out, QA_MAX_STEPS="2", QA_CHECKPOINT_STEPS="1",
                             QA_STOP_GRACE_SECONDS="3"))
    one_line_error(result, 75, "no space left")
    assert result.event("checkpoint_error") or result.event("checkpoint_retry"), "a dropped checkpoint must be reported"
    assert result.event("checkpoint_pending")
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")], list(out.rglob("*"))
    assert not (out / "test-run" / "COMPLETE").exists()
    # the staged results survive for a rerun with more room
    assert (tmp_path / "work" / "test-run" / "publish" / "model" / "model.safetensors").is_file()


def test_full_work_disk_exits_75(tmp_path, tiny_model, mounted):
    work = mounted("work", "size=64k")
    result = run_job(job_env(tmp_path, tiny_model, QA_WORK_DIR=work, QA_MAX_STEPS="1"))
    one_line_error(result, 75, "no space left")


@pytest.mark.parametrize("size", ["8m", "12m"])
def test_a_work_disk_that_fills_while_a_checkpoint_is_saved_exits_75(tmp_path, tiny_model, mounted, size):
    """Found by the soak (a full scratch disk): room for the data, the features and the weights, not for the
    optimizer state. torch.save reports the failed write without an errno ("iostream error", "unexpected pos")
    and the job exited 1 with that as an unexpected error."""
    work = mounted("work", f"size={size}")
    result = run_job(job_env(tmp_path, tiny_model, QA_WORK_DIR=work, QA_MAX_STEPS="4", QA_CHECKPOINT_STEPS="2"))
    one_line_error(result, 75, "no space left")


def test_long_questions_are_cut_not_a_crash(tmp_path, tiny_model):
    """QA_MAX_LENGTH=128 QA_DOC_STRIDE=100 leaves little room beside a question; the tokenizer used to panic."""
    data = rows(8)
    data[1]["question"] = " ".join(["which"] * 300) + "?"  # 300 tokens: longer than any window
    train = write_rows(tmp_path / "train.jsonl", data)
    result = run_job(job_env(tmp_path, tiny_model, QA_TRAIN_URI=train, QA_MAX_LENGTH="128", QA_DOC_STRIDE="100",
                             QA_MAX_STEPS="2", QA_MAX_EVAL_SAMPLES="8", QA_CHECKPOINT_STEPS="0"))
    assert result.returncode == 0, result.stderr[-3000:]
    cut = result.event("questions_truncated")
    assert cut and data[1]["id"] in sum((e["ids"] for e in cut), []) and cut[0]["max_question_tokens"] == 128 - 3 - 100 - 8
    assert "panicked" not in result.stderr


def test_a_panic_that_is_not_an_exception_still_ends_in_one_line(tmp_path, tiny_model):
    env = job_env(tmp_path, tiny_model, QA_MAX_STEPS="1")
    result = run_job(env, module="tests.support.killer", args=("raise:evaluate@1",))
    one_line_error(result, 1, "unexpected error: Panic: injected panic at evaluate")
    assert result.event("failed")[0]["traceback"]  # the traceback is kept, inside the JSON line


def test_a_model_with_nan_weights_is_never_published_or_promoted(tmp_path, tiny_model):
    """A base model with one NaN weight trains to NaN everywhere. It used to log a loss of 0.0, exit 0 and
    become a fresh channel's first model; now: exit 2 with one line, the loss shown as it is, nothing published."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = Path(shutil.copytree(tiny_model, tmp_path / "nan-model"))
    weights = load_file(base / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("LayerNorm.weight"))
    weights[name][0] = float("nan")
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    result = run_job(job_env(tmp_path, base, QA_CHANNEL="prod", QA_MAX_STEPS="2", QA_LOGGING_STEPS="1",
                             QA_CHECKPOINT_STEPS="0", QA_MAX_EVAL_SAMPLES="4"))
    one_line_error(result, 2, "training diverged")
    assert "weights are NaN or infinite after step 2" in result.stderr and "QA_RUN_ID" in result.stderr
    for line in result.stdout.splitlines():  # strict JSON: Python's reader would take a bare NaN
        json.loads(line, parse_constant=lambda word: pytest.fail(f"not JSON: {word} in {line}"))
    assert [p["loss"] for p in result.event("progress")] == ["nan", "nan"]  # it read 0.0
    assert result.event("nonfinite_loss")[0]["step"] == 1
    assert not result.event("eval") and not result.event("published") and not result.event("promotion")
    run = tmp_path / "out" / "test-run"
    assert not (run / "COMPLETE").exists() and not (run / "model").exists() and not (run / "metrics.json").exists()
    assert not (tmp_path / "out" / "channels").exists()  # no pointer, no history


def test_a_full_disk_during_the_teacher_pass_exits_75_not_with_a_bus_error(tmp_path, tiny_model, mounted):
    """The teacher's logits are a memory-mapped file: a page the full disk had no room for killed the job with
    SIGBUS (exit 135), no error line, no failed event. Its space is reserved up front now."""
    work = mounted("work", "size=16m")
    env = job_env(tmp_path, tiny_model, QA_WORK_DIR=work, QA_TEACHER_MODEL=tiny_model, QA_MAX_TRAIN_SAMPLES="16",
                  QA_MAX_EVAL_SAMPLES="4", QA_CHECKPOINT_STEPS="0", QA_REPORT_TO="none")
    result = run_job(env, module="tests.support.killer", args=("fill:teacher_score@1=8192",))  # room for 2 pages
    one_line_error(result, 75, "no space left on the local disk")
    assert "logits.npy" in result.stderr and not result.event("teacher_logits")
    assert not [p for p in work.rglob("*") if ".tmp" in p.name], "the half-made logits file is removed"


def test_a_base_model_whose_config_is_nested_too_deep_is_exit_2(tmp_path, tiny_model):
    """transformers parses config.json with json.loads: one nested 100,000 deep ended the run with exit 1."""
    import shutil

    model = tmp_path / "deep"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    result = run_job(job_env(tmp_path, model, QA_MAX_STEPS="1"))
    one_line_error(result, 2, f"QA_MODEL_NAME={model}: cannot load (config.json: nested deeper than")
