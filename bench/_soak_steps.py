"""The soak's operations (``bench/soak.py``): what one step does, drawn from that step's random generator.

Each function runs one operation of the job's real commands through ``_soak_ops.Soak`` (which
gives each process its faults and retries runs as a Kubernetes Job would) and records what it did
in an ``Outcome``: a night, a rerun, two nights racing on one channel, one run id started twice,
a night while the operator moves its channel, the operator's commands, ``job.answer``.
"""
from __future__ import annotations

import json
import random
import shutil
import time

from _soak_ops import CHANNELS, REFUSALS, Outcome, Soak

QUESTION = ("Who won Super Bowl 50?", "The Denver Broncos defeated the Carolina Panthers to win Super Bowl 50.")


def op_night(soak: Soak, rng: random.Random, out: Outcome) -> None:
    channel, extra, flags = rng.choice(CHANNELS), {}, []
    if rng.random() < 0.5:
        soak.drop_train(rng)
        flags.append("+data")
    if rng.random() < 0.06 and soak.eval_drops < 4:
        soak.drop_eval(rng)
        flags.append("+eval")
    if rng.random() < 0.35:
        extra["QA_INIT_FROM"] = "channel"
        flags.append("warm")
    if rng.random() < 0.15:
        extra["QA_TEACHER_CHANNEL"] = next(c for c in CHANNELS if c != channel)
        flags.append("distilled")
    spec = soak.new_run("night", channel, **extra)
    out.line = f"night {channel} {' '.join(flags)}".strip()
    soak.run_job(spec, rng, out)


def op_rerun(soak: Soak, rng: random.Random, out: Outcome) -> None:
    if not soak.runs:
        out.kind = "night"
        return op_night(soak, rng, out)
    spec = soak.runs[rng.choice(sorted(soak.runs))]
    out.line = f"rerun {spec.run_id}"
    soak.run_job(spec, rng, out, chance=0.4, refusals=REFUSALS["rerun"])


def op_race(soak: Soak, rng: random.Random, out: Outcome) -> None:
    """Two nights on one channel at once, each on its own node; half the time held until both read the pointer."""
    channel = rng.choice(CHANNELS)
    soak.drop_train(rng)
    meet, shared = rng.random() < 0.5, rng.random() < 0.3
    specs = [soak.new_run("race", channel, QA_SEED=str(100 + len(soak.runs))) for _ in range(2)]
    out.line = f"race {channel}{' meeting at the pointer' if meet else ''}{' on one scratch' if shared else ''}"
    started, one = [], soak.work_dir(f"shared-{specs[0].run_id}")  # a node's scratch volume both pods mount
    for spec in specs:
        work = one if shared else soak.work_dir(spec.run_id)
        faults, setup = ([], {}) if meet else soak.draw_faults(rng, "job", 0.4)
        env = {**spec.env, "QA_WORK_DIR": str(work), "KILLER_MEET_DIR": str(soak.root / "meet" / specs[0].run_id)}
        started.append((spec, work, (soak.launch(f"{spec.run_id}#1", env, faults, setup,
                                                 killer="meet:pointer_read@2=2" if meet else ""), setup)))
    for spec, work, first in started:
        soak.run_job(spec, rng, out, first=first, work=work)


def _reach(running, event: str, seconds: float = 300) -> None:
    """Until the process logged ``event`` (or ended, or ``seconds`` passed): where the operation acts next."""
    deadline = time.monotonic() + seconds
    while not running.counts.get(event) and running.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def op_twin(soak: Soak, rng: random.Random, out: Outcome) -> None:
    """One run id started twice: the second on another node, on a copy of the first's scratch, or on the same."""
    channel = rng.choice(CHANNELS)
    soak.drop_train(rng)
    spec = soak.new_run("twin", channel)
    event, place = rng.choice(["lease", "train_start", "checkpoint_committed", "eval"]), rng.choice(["fresh", "copy", "same"])
    work_a = soak.work_dir(spec.run_id)
    faults, setup = soak.draw_faults(rng, "job", 0.3)
    a = soak.launch(f"{spec.run_id}#1", {**spec.env, "QA_WORK_DIR": str(work_a)}, faults, setup)
    out.line = f"twin {channel}: a second process at {event}, {place} scratch"
    _reach(a, event)
    work_b = work_a if place == "same" else soak.work_dir(spec.run_id)
    if place == "copy" and work_a.exists():  # taken while the first process writes to it, as a snapshot would be
        try:
            shutil.copytree(work_a, work_b, symlinks=True, dirs_exist_ok=True, copy_function=_copy_if_there)
        except (shutil.Error, OSError):
            pass  # a folder went away under the copy: what was copied is the fault
        out.faults.append("copied_workdir")
    faults_b, setup_b = soak.draw_faults(rng, "job", 0.0)
    # plain python -m job: the killer's wrapping would make it seconds late, when the first may be done
    b = soak.launch(f"{spec.run_id}#twin", {**spec.env, "QA_WORK_DIR": str(work_b)}, faults_b, setup_b, slow=False)
    soak.finish(a), soak.finish(b)  # retried one after the other: a retry facing the other's live lease exits 4
    soak.run_job(spec, rng, out, first=(a, setup), work=work_a)
    soak.run_job(spec, rng, out, first=(b, setup_b), work=work_b)


def op_busy(soak: Soak, rng: random.Random, out: Outcome) -> None:
    """A night on a channel while the operator moves it: the command and the night's promotion race for the pointer."""
    channel = rng.choice(CHANNELS)
    soak.drop_train(rng)
    spec = soak.new_run("night", channel, **({"QA_INIT_FROM": "channel"} if rng.random() < 0.3 else {}))
    command, event = rng.choice(["hold", "release", "rollback", "promote"]), rng.choice(["train_end", "published"])
    work = soak.work_dir(spec.run_id)
    faults, setup = soak.draw_faults(rng, "job", 0.3)
    night = soak.launch(f"{spec.run_id}#1", {**spec.env, "QA_WORK_DIR": str(work)}, faults, setup)
    out.line = f"busy {channel}: {command} at the night's {event}"
    _reach(night, event)
    args = [command, "--output", soak.world.output, "--channel", channel, "--reason", "soak busy"]
    if command == "promote":
        args += ["--run", rng.choice(sorted(soak.runs))]
    soak.run_cli(f"{command}-{channel}", "job.channel", args, REFUSALS[command], rng, out)
    soak.run_job(spec, rng, out, first=(night, setup), work=work)


def _copy_if_there(src, dst):
    try:
        shutil.copy2(src, dst)
    except FileNotFoundError:  # the running process removed it meanwhile
        pass


def op_operator(command: str):
    def op(soak: Soak, rng: random.Random, out: Outcome) -> None:
        channel = rng.choice(CHANNELS)
        args = [command, "--output", soak.world.output, "--channel", channel]
        if command == "promote" or (command == "rollback" and rng.random() < 0.3):
            args += ["--run", rng.choice(sorted(soak.runs) or ["alpha-000"])]
        out.line = " ".join(["channel", command, channel, *args[5:]])
        args += ["--reason", f"soak {command}"]
        soak.run_cli(f"{command}-{channel}", "job.channel", args, REFUSALS[command], rng, out)
    return op


def op_repair(soak: Soak, rng: random.Random, out: Outcome) -> None:
    """A hand edit cuts a pointer short; the operator puts the holder back with ``promote --run --repair``."""
    channel = rng.choice(CHANNELS)
    key = f"out/channels/{channel}.json"
    seqs = sorted(int(k.rsplit("/", 1)[1][:-5]) for k in soak.world.keys(f"out/channels/{channel}/history/")
                  if k.rsplit("/", 1)[1][:-5].isdigit())
    target = rng.choice(sorted(soak.runs) or ["alpha-000"])
    if soak.world.get(key) is not None and seqs:
        soak.world.put(key, b'{"schema": 1, "channel": "' + channel.encode() + b'", "seq": ')
        out.faults.append("corrupt_pointer")
        target = json.loads(soak.world.get(f"out/channels/{channel}/history/{seqs[-1]}.json"))["run_id"]
    out.line = f"channel repair {channel} --run {target}"
    soak.run_cli(f"repair-{channel}", "job.channel", ["promote", "--output", soak.world.output, "--channel", channel,
                                                      "--run", target, "--repair"], REFUSALS["repair"], rng, out)


def op_answer(soak: Soak, rng: random.Random, out: Outcome) -> None:
    channel = rng.choice(CHANNELS)
    out.line = f"answer --channel {channel}"
    soak.run_cli(f"answer-{channel}", "job.answer", ["--model", soak.world.output, "--channel", channel, "--question",
                                                     QUESTION[0], "--context", QUESTION[1], "--max-length", "128",
                                                     "--doc-stride", "48"], REFUSALS["answer"], rng, out, kind="answer")


OPS = {"night": (op_night, 32), "rerun": (op_rerun, 8), "race": (op_race, 6), "twin": (op_twin, 6), "busy": (op_busy, 5),
       "promote": (op_operator("promote"), 6), "rollback": (op_operator("rollback"), 6), "hold": (op_operator("hold"), 4),
       "release": (op_operator("release"), 4), "repair": (op_repair, 3), "answer": (op_answer, 5)}


NIGHTS = ("night", "race", "twin", "busy")  # the operations that train
