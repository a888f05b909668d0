"""A distilled run end to end (the tiny model as teacher and student): killed mid-training, then resumed on a
fresh machine to exactly the weights and answers of a run never interrupted, the teacher's logits downloaded,
with the teacher's channel moved in between; and a teacher that cannot teach, refused at start with one line.

(Another teacher for the same run id is refused by the run's fingerprint, as any changed setting is:
tests/test_distill.py shows the fingerprint differs in ``teacher``; the refusal itself is the claim's.)
"""
import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from tests.support.jobrun import job_env, run_job

# 16 examples, batch 4: 4 steps, a checkpoint every 2; small eval, no trackers: the cheapest real run
DISTIL = dict(QA_MAX_TRAIN_SAMPLES="16", QA_MAX_EVAL_SAMPLES="8", QA_MAX_STEPS="4", QA_BATCH_SIZE="4",
              QA_CHECKPOINT_STEPS="2", QA_LOGGING_STEPS="1", QA_REPORT_TO="none", QA_DISTILL_ALPHA="0.3",
              QA_DISTILL_TEMPERATURE="3")


def published(out, run_id):
    folder = out / run_id
    return (load_file(str(folder / "model" / "model.safetensors")), json.loads((folder / "predictions.json").read_text()),
            json.loads((folder / "manifest.json").read_text()))


def teacher_run(out, run_id, model, nudge=0.0):
    """A published run holding ``model`` (its weights moved by ``nudge``: another model by content)."""
    from tests.support.runs import GOLD, publish_run

    publish_run(out, run_id, GOLD)
    for file in model.iterdir():
        shutil.copy(file, out / run_id / "model" / file.name)
    weights = out / run_id / "model" / "model.safetensors"
    save_file({k: v + nudge if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}, str(weights))


def test_a_distilled_run_killed_resumes_bit_for_bit(tmp_path, tiny_model):
    """The resumed run's teacher is a channel's (the tiny model, by content the reference's teacher); the
    channel moves on two nights while the run is down, and its retention (one run kept) would prune the
    teacher's model; the retry keeps the teacher it started with, whose model retention kept for it."""
    from tests.support.runs import gate

    out = tmp_path / "out"
    for n, nudge in ((1, 0.0), (2, 0.01), (3, 0.02)):
        teacher_run(out, f"teacher-{n}", tiny_model, nudge=nudge)
    assert gate(out, "teacher-1", "teachers", QA_KEEP_RUNS="1")["decision"] == "promote"

    def env(run_id, work, **teacher):
        return job_env(tmp_path, tiny_model, QA_RUN_ID=run_id, QA_OUTPUT_URI=str(out), QA_WORK_DIR=str(tmp_path / work),
                       **(teacher or {"QA_TEACHER_CHANNEL": "teachers"}), **DISTIL)

    reference = run_job(env("reference", "work-ref", QA_TEACHER_MODEL=str(tiny_model)))
    assert reference.returncode == 0, reference.stderr + reference.stdout[-3000:]
    assert reference.event("teacher_logits")[0]["cache"] == "miss"
    ref_weights, ref_answers, ref_manifest = published(out, "reference")
    assert ref_manifest["distillation"]["teacher"] == str(tiny_model)
    assert ref_manifest["distillation"]["alpha"] == 0.3 and ref_manifest["distillation"]["temperature"] == 3.0
    assert "distilled from" in (out / "reference" / "model" / "README.md").read_text()

    killed = run_job(env("resumed", "work-1"), module="tests.support.killer", args=("slow:train_step=0.15,kill:train_step@3",))
    assert killed.returncode == -9, killed.stderr + killed.stdout[-2000:]
    committed = {int(p.parent.name.split("-")[1]) for p in (out / "resumed" / "checkpoints").glob("*/COMMIT.json")}
    assert committed and not (out / "resumed" / "model").exists()
    assert killed.event("teacher")[0]["run"] == "teacher-1"
    student = out / "channels" / "teachers" / "students" / "resumed.json"
    assert json.loads(student.read_text()) == {"run_id": "resumed", "from_run": "teacher-1"}
    for night in ("teacher-2", "teacher-3"):  # teacher-1 leaves the channel's history window (QA_KEEP_RUNS=1)
        assert gate(out, night, "teachers", QA_KEEP_RUNS="1")["decision"] == "promote"
    assert (out / "teacher-1" / "model" / "model.safetensors").is_file()  # its retry exited 2: the model was pruned

    # a fresh machine: the checkpoint, the features and the teacher's logits come from storage; the teacher
    # is the run the first attempt pinned, not the channel's new holder
    rerun = run_job(env("resumed", "work-3"))
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout[-3000:]
    assert rerun.event("teacher")[0]["run"] == "teacher-1" and rerun.event("teacher")[0]["pinned"]
    assert rerun.event("resume")[0]["step"] in committed
    assert rerun.event("teacher_logits")[0]["cache"] == "remote"
    weights, answers, manifest = published(out, "resumed")
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    assert answers == ref_answers and manifest["distillation"]["logits_cache"] == "remote"
    assert not student.exists()  # complete: teacher-1 is the channel's retention's business again


def test_a_teacher_that_is_not_a_qa_model_is_exit_2_before_the_run_folder_is_bound(tmp_path, tiny_model):
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_model, encoder)
    config = json.loads((encoder / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps({**config, "architectures": ["DistilBertModel"]}))
    env = job_env(tmp_path, tiny_model, QA_TEACHER_MODEL=str(encoder), **DISTIL)
    refused = run_job(env)
    assert refused.returncode == 2, refused.stderr + refused.stdout[-2000:]
    assert refused.stderr.strip().splitlines() == [
        f"qa-finetune: error: QA_TEACHER_MODEL={encoder}: not a question-answering model (DistilBertModel in its "
        "config.json); the teacher must be a model fine-tuned for extractive QA (exit 2)"]
    # nothing bound the run id to this teacher: fixed, the same QA_RUN_ID starts afresh
    assert not (tmp_path / "out" / "test-run" / "run.json").exists() and not refused.event("features")
