"""The job shot's steps (bench/device/run --shot job): the real ``python -m job`` on the GPU, four ways.

1. ``job``: MiniLM (fp16 weights, trained as fp32 master weights) on the whole 15,304-row train
   sample for one epoch, scored on the whole dev sample, the CPU reference's recipe
   (``cpu-reference.json``) with ``QA_DEVICE=cuda`` and ``QA_COMPILE=auto``: F1 parity. The run is
   gated into the channel ``CHANNEL`` (no holder yet: it becomes the holder).
2. ``stop_and_resume``: ``QA_COMPILE=false``, SIGTERM once training is under way: exit 143 with the
   stop's checkpoint committed; the rerun resumes from exactly that step and completes.
3. ``distill_night``: one short night of ``CHANNEL`` distilled from the channel's holder, the job's
   own published model (``QA_TEACHER_CHANNEL``): the teacher's logits scored on the GPU, then the
   gate, which re-scores the holder on CUDA because tonight's eval set is another one
   (``holder_rescored``). The holder's F1 re-scored is set beside its own published predictions'
   F1 on the same questions. One run for both: each job start costs seconds of the five minutes.
   The night is never promoted (``QA_GATE_MIN=100``), so a rerun finds the same holder and teacher.
4. ``cuda_required`` (``--smoke`` only, no GPU there): ``QA_DEVICE=cuda`` is exit 2 with the reason.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _kit

CHANNEL = "gpu-nightly"
RECIPE = {  # the job's recipe on both machines (the CPU reference ran it too: cpu-reference.json)
    "QA_EPOCHS": "1", "QA_BATCH_SIZE": "16", "QA_LEARNING_RATE": "1e-4", "QA_WARMUP_RATIO": "0.1",
    "QA_MAX_LENGTH": "384", "QA_DOC_STRIDE": "128", "QA_PRECISION": "auto", "QA_COMPILE": "auto",
}
SMOKE = {"QA_MAX_TRAIN_SAMPLES": "64", "QA_MAX_EVAL_SAMPLES": "16", "QA_MAX_LENGTH": "128", "QA_DOC_STRIDE": "48",
         "QA_BATCH_SIZE": "8", "QA_MAX_STEPS": "6", "QA_LOGGING_STEPS": "1"}
PARITY_F1 = 1.5  # points: bf16 (fp32 head) against the reference's fp32, one training run each
NIGHT_EVAL = (300, 8)  # tonight's eval questions (GPU, --smoke): fewer than the holder's, so it is re-scored


def job_env(data: Path, kit: Path, smoke: bool, work: Path, run_id: str, **extra: str) -> dict:
    env = {"QA_RUN_ID": run_id, "QA_OUTPUT_URI": str(work / "out"), "QA_WORK_DIR": str(work / "work"),
           "QA_MODEL_NAME": str(kit / "minilm"), "QA_TRAIN_URI": str(data / _kit.DATA_FILES[0]),
           "QA_EVAL_URI": str(data / _kit.DATA_FILES[1]), "QA_LOG_FORMAT": "json", "QA_LOGGING_STEPS": "50",
           "QA_EXPORT": "none",  # the kit carries no onnxruntime (64 MiB): an export would fail, and it is not what is measured
           "QA_DEVICE": "cpu" if smoke else "cuda", **RECIPE}
    if smoke:
        env.update(SMOKE)
    env.update(extra)
    return env


class Job:
    """``python -m job`` in the background; its lines collected by a thread (and written to ``log``) as they come."""

    def __init__(self, env: dict, settings: dict, log: Path):
        import threading

        self.lines: list[str] = []
        self.seconds = None
        self._log = open(log, "a", encoding="utf-8", buffering=1)  # line by line: a killed run keeps its log
        self._log.write(f"=== python -m job, {settings['QA_RUN_ID']}, {time.strftime('%H:%M:%S')}\n")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "job"], env={**env, **settings}, cwd=_kit.ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            self._log.write(line)

    def events(self, name: str) -> list[dict]:
        out = []
        for line in list(self.lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == name:
                out.append(entry)
        return out

    def last(self, name: str) -> dict:
        return (self.events(name) or [{}])[-1]

    def wait_for(self, event: str, where, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            if any(where(e) for e in self.events(event)):
                return True
            time.sleep(0.1)
        return False

    def finish(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._pump.join(10)
        self._log.close()
        self.seconds = round(time.monotonic() - self.started, 1)
        return code


def job_end_to_end(env: dict, data: Path, args, work: Path, deadline, report: dict, device: str | None = None) -> None:
    """The CPU reference's recipe on this machine; on the GPU also gated into ``CHANNEL`` (it becomes the holder)."""
    extra = {"QA_DEVICE": device} if device else {"QA_CHANNEL": CHANNEL}
    settings = job_env(data, args.kit, args.smoke, work, "device-job", **extra)
    job = Job(env, settings, args.out / "job.log")
    code = job.finish(timeout=deadline.left() - 5)
    result = {"exit_code": code, "wall_seconds": job.seconds,
              "settings": {k: v for k, v in settings.items() if k in RECIPE or k in SMOKE}}
    for name in ("device", "speed_recipe", "setup", "features", "train_end", "compile", "checkpoint_saved", "eval", "promotion"):
        if job.events(name):
            result[name] = job.events(name)[-1] if name != "speed_recipe" else job.events(name)[0]
    result["speed_fallback"] = [e["msg"] for e in job.events("speed_fallback")]
    run_dir = work / "out" / "device-job"
    if (run_dir / "metrics.json").is_file():
        shutil.copy(run_dir / "metrics.json", args.out / "metrics.json")
        result["metrics"] = json.loads((run_dir / "metrics.json").read_text())
    if (run_dir / "model" / "training_curves.png").is_file():
        shutil.copy(run_dir / "model" / "training_curves.png", args.out / "training_curves.png")
    report["steps"]["job"] = result
    if code != 0:
        raise RuntimeError(f"the job exited {code} (job.log)")
    reference = report.get("cpu_reference") or {}
    f1 = (result.get("metrics") or {}).get("f1")
    if device is None and not args.smoke and reference.get("f1") is not None and f1 is not None:
        result["f1_parity"] = {"gpu": f1, "cpu_reference": reference["f1"], "difference": round(f1 - reference["f1"], 2),
                               "tolerance": PARITY_F1, "within": abs(f1 - reference["f1"]) <= PARITY_F1}
        if not result["f1_parity"]["within"]:
            raise RuntimeError(f"F1 {f1:.2f} on the GPU, {reference['f1']:.2f} on the CPU reference: more than "
                               f"{PARITY_F1} points apart")


def stop_and_resume(env: dict, data: Path, args, work: Path, deadline, report: dict) -> None:
    """Eager (``QA_COMPILE=false``): SIGTERM once training is under way; exit 143 with the stop's checkpoint committed;
    the rerun resumes from that step and completes."""
    stop_at = 2 if args.smoke else 40
    settings = job_env(data, args.kit, args.smoke, work, f"device-resume-{time.strftime('%H%M%S')}", QA_COMPILE="false",
                       QA_MAX_STEPS="8" if args.smoke else "200", QA_MAX_TRAIN_SAMPLES="64" if args.smoke else "3200",
                       QA_MAX_EVAL_SAMPLES="16" if args.smoke else "200", QA_LOGGING_STEPS="1" if args.smoke else "5")
    log = args.out / "resume.log"
    first = Job(env, settings, log)
    first.wait_for("progress", lambda e: e["step"] >= stop_at, timeout=deadline.left() - 60)
    first.proc.send_signal(signal.SIGTERM)
    stopped_code = first.finish(timeout=deadline.left() - 40)
    stopped, saved = first.last("stopped"), first.last("checkpoint_saved")
    second = Job(env, settings, log)
    resumed_code = second.finish(timeout=deadline.left() - 5)
    resume = second.last("resume")
    result = {"stopped_exit_code": stopped_code, "stopped_at_step": stopped.get("step"), "committed": stopped.get("committed"),
              "stop_checkpoint_save_seconds": saved.get("seconds"), "stopped_wall_seconds": first.seconds,
              "rerun_exit_code": resumed_code, "resumed_from_step": resume.get("step"), "rerun_wall_seconds": second.seconds,
              "rerun_steps": second.last("train_end").get("step"), "compile": first.events("speed_recipe")[0].get("compile")
              if first.events("speed_recipe") else None}
    report["steps"]["stop_and_resume"] = result
    resumed_from_the_stop = stopped.get("step") is not None and resume.get("step") == stopped.get("step")
    if not (stopped_code == 143 and stopped.get("committed") and resumed_code == 0 and resumed_from_the_stop):
        raise RuntimeError(f"stop and resume did not go as promised: {result} (resume.log)")


def distill_night(env: dict, data: Path, args, work: Path, deadline, report: dict) -> None:
    """A short night of ``CHANNEL`` taught by the channel's holder (the job step's model), its holder re-scored."""
    holder = work / "out" / "device-job" / "model"
    if not holder.is_dir():
        raise RuntimeError(f"needs the job step's published model ({holder}): run the job step first")
    questions = NIGHT_EVAL[1] if args.smoke else NIGHT_EVAL[0]
    # a run id of its own in every call (a rerun with --only starts afresh), trained even if an earlier night had its
    # recipe, and never promoted (QA_GATE_MIN=100: below the floor; the holder is re-scored all the same), so the job's
    # model stays the holder and the teacher for a rerun
    settings = job_env(data, args.kit, args.smoke, work, f"device-night-{time.strftime('%H%M%S')}", QA_CHANNEL=CHANNEL,
                       QA_TEACHER_CHANNEL=CHANNEL, QA_SKIP_UNCHANGED="false", QA_GATE_MIN="100", QA_COMPILE="false",
                       QA_MAX_TRAIN_SAMPLES="48" if args.smoke else "1600", QA_MAX_STEPS="4" if args.smoke else "60",
                       QA_MAX_EVAL_SAMPLES=str(questions),
                       QA_LOGGING_STEPS="1" if args.smoke else "10")
    job = Job(env, settings, args.out / "distill-night.log")
    code = job.finish(timeout=deadline.left() - 5)
    teacher, logits, rescored = job.last("teacher"), job.last("teacher_logits"), job.last("holder_rescored")
    promotion = job.last("promotion")
    result = {"exit_code": code, "wall_seconds": job.seconds, "device": job.last("device").get("device"),
              "teacher_run": teacher.get("run"), "teacher_logits": {k: logits.get(k) for k in ("cache", "windows", "scored", "seconds")},
              "train_end_step": job.last("train_end").get("step"),
              "holder_rescored": {k: rescored.get(k) for k in ("holder", "examples", "f1")},
              "decision": promotion.get("decision"), "reason": promotion.get("reason")}
    predictions = work / "out" / "device-job" / "predictions.json"
    if predictions.is_file():  # the holder's own evaluation of the same questions (the first rows, in file order)
        sys.path.insert(0, str(_kit.ROOT))
        from job.squad.metrics import squad_scores

        with open(data / _kit.DATA_FILES[1], encoding="utf-8") as f:
            rows = [json.loads(line) for _, line in zip(range(questions), f)]
        result["holder_published_f1"] = round(squad_scores(rows, json.loads(predictions.read_text()))["f1"], 3)
    report["steps"]["distill_night"] = result
    problems = []
    if code != 0:
        problems.append(f"exit {code}")
    if teacher.get("run") != "device-job" or logits.get("cache") != "miss" or not logits.get("scored"):
        problems.append("the teacher was not the job's model, scored here")
    if rescored.get("holder") != "device-job" or rescored.get("examples") != questions:
        problems.append("the holder was not re-scored on tonight's questions")
    if problems:
        raise RuntimeError(f"distilled night: {'; '.join(problems)}: {result} (distill-night.log)")


def cuda_required(env: dict, data: Path, args, work: Path, deadline, report: dict) -> None:
    """Smoke only (no GPU here): QA_DEVICE=cuda must stop at once with exit 2 and the reason."""
    job = Job(env, job_env(data, args.kit, args.smoke, work, "device-cuda", QA_DEVICE="cuda"), work / "cuda-required.log")
    code = job.finish(timeout=120)
    failed = job.last("failed")
    report["steps"]["cuda_required"] = {"exit_code": code, "message": failed.get("msg")}
    if code != 2 or "no usable GPU" not in str(failed.get("msg")):
        raise RuntimeError(f"QA_DEVICE=cuda without a GPU gave exit {code}: {failed.get('msg')}")
