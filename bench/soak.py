"""A randomized soak: a long random history of the job's real operations under random faults, checked from
storage after every step, replayable from its seed.

    python bench/soak.py --minutes 60            # a long soak (the seed is drawn and printed)
    python bench/soak.py --seed 1234 --steps 40  # replay a history: the same operations and faults

Each step draws one operation (a nightly run on one of two channels, with new data, warm-started
or distilled from the other channel; a rerun of an earlier run id; two nights racing on one
channel, on their own scratch or one shared; the same run id started twice; a night while the
operator moves its channel; the operator's promote, rollback, hold, release and repair;
``job.answer --channel``) and the faults of each process it starts (SIGKILL or SIGTERM at a named
point or after a delay, a storage outage, the server stopped, connection resets, lost replies,
cut uploads, latency, a full scratch disk, a clock minutes off, a scratch dir copied from an
earlier attempt or from a live process). Runs are retried as a Kubernetes Job would retry them. After the step,
``tests.support.invariants`` checks what storage holds and ``tests.support.outcomes`` what every process printed; a run that
resumed after faults is compared with the same run trained once without faults (its weights, bit
for bit, as the README promises on CPU); ``job.answer`` answers through every channel.

Replays: the schedule (which operation, which faults, where and with what parameters, the data
dropped) is drawn from ``random.Random(seed)``, one generator per step seeded from the master, so
``--seed S`` draws exactly the same history whatever the processes did. A fault at a named point
(``tests.support.killer``) fires at the same point every time. Faults at the n-th log event of a
kind fire as closely as the events arrive; a signal "after t seconds", how long an outage
overlaps the process's calls, and races between concurrent processes replay only approximately
(the OS schedules them). Exit status: 0 without violations, 1 with any.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import machine
from _soak_ops import GATES, KEEP_RUNS, Outcome, Soak
from _soak_steps import NIGHTS, OPS, QUESTION
from tests.support.invariants import check_storage
from tests.support.outcomes import (answers_through_every_channel, check_process, leases_released, retries_converged,
                                    same_as_reference)
from tests.support.snapshot import Policy
from tests.support.jobrun import json_events
from tests.support.soakworld import World

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------- checks
def check_step(soak: Soak, out: Outcome, prev, cur, policy: Policy, references: dict) -> list[tuple[str, str]]:
    found = check_storage(prev, cur, policy)
    for proc in out.procs:
        found += check_process(proc, soak.world.secrets)
    for label, codes in out.unsettled:
        found += retries_converged(label, codes, False)
    found += leases_released(cur, out.settled)
    for run_id in dict.fromkeys(out.runs):
        found += compare_with_reference(soak, soak.runs[run_id], cur, references, out)
    found += answers(soak, cur)
    return found


def compare_with_reference(soak: Soak, spec, cur, references: dict, out: Outcome) -> list[tuple[str, str]]:
    """A run that resumed after faults against the same inputs trained once without faults (cached by fingerprint)."""
    run = spec.run_id
    model = cur.objects.get(f"{run}/model/model.safetensors")
    record = cur.json(f"{run}/run.json")
    if not (spec.resumed and spec.interrupted and spec.settled and model and isinstance(record, dict)) or run in references["done"]:
        return []
    references["done"].add(run)
    fingerprint = record["fingerprint"]
    if fingerprint not in references["sha256"]:
        references["sha256"][fingerprint] = reference_run(soak, spec, record)
    expected = references["sha256"][fingerprint]
    if expected is None:
        out.notes.append(f"{run}: no reference (its start or teacher model is gone)")
        references["unavailable"] += 1
        return []
    references["compared"] += 1
    return same_as_reference(run, model.sha256, expected)


def reference_run(soak: Soak, spec, record: dict) -> str | None:
    """The model.safetensors sha256 of the run's inputs trained once, without faults, outside the output."""
    world, fingerprint = soak.world, record["fingerprint"]
    folder = soak.root / "reference" / fingerprint[:16]
    shutil.rmtree(folder, ignore_errors=True)
    env = {**spec.env, **world.env(through_proxy=False), "QA_RUN_ID": f"ref-{fingerprint[:24]}",
           "QA_OUTPUT_URI": world.uri("reference"), "QA_WORK_DIR": str(folder / "work"), "QA_TRAIN_SELECT": "all"}
    for name in ("QA_CHANNEL", "QA_INIT_FROM", "QA_TEACHER_CHANNEL"):
        env.pop(name, None)
    for split, setting in (("train", "QA_TRAIN_URI"), ("eval", "QA_EVAL_URI")):
        prefix = f"data/{split}/"
        listed = {_masked(world, k[len(prefix):]): k[len(prefix):] for k in world.keys(prefix)}  # run.json masks credentials
        for f in record.get("data_files", {}).get(split)["files"]:
            key = listed[f["key"]]
            path = folder / split / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(world.get(prefix + key))
        env[setting] = str(folder / split) + "/"
    init = record["inputs"].get("init", {})
    if init.get("from") == "channel":
        if not world.download(f"out/{init['run_id']}/model/", folder / "start"):
            return None
        env["QA_MODEL_NAME"] = str(folder / "start")
    if record.get("teacher_run"):
        if not world.download(f"out/{record['teacher_run']}/model/", folder / "teacher"):
            return None
        env["QA_TEACHER_MODEL"] = str(folder / "teacher")
    running = world.finish(world.start(f"reference-{spec.run_id}", env))
    if running.proc.returncode != 0:
        raise RuntimeError(f"the reference run of {spec.run_id} failed: exit {running.proc.returncode}\n" + "\n".join(running.err[-20:]))
    ref = json.loads(world.get(f"reference/ref-{fingerprint[:24]}/run.json"))
    if ref["inputs"]["train_sha256"] != record["inputs"]["train_sha256"]:
        raise RuntimeError(f"the reference of {spec.run_id} read other training data")
    weights = world.get(f"reference/ref-{fingerprint[:24]}/model/model.safetensors")
    world.delete_prefix(f"reference/ref-{fingerprint[:24]}/")  # only its sha256 is kept
    shutil.rmtree(folder, ignore_errors=True)
    return hashlib.sha256(weights).hexdigest()


def _masked(world: World, key: str) -> str:
    for value in world.secrets.values():
        key = key.replace(value, "***")
    return key


def answers(soak: Soak, cur) -> list[tuple[str, str]]:
    """``job.answer --channel`` (in this process: its main, as the command runs it) through every channel."""
    from job.answer import main

    results = {}
    for channel in cur.channels():
        stdout, stderr = io.StringIO(), io.StringIO()
        with redirect_stdout(stdout), redirect_stderr(stderr):
            code = main(["--model", soak.world.output, "--channel", channel, "--question", QUESTION[0], "--context",
                         QUESTION[1], "--max-length", "128", "--doc-stride", "48",
                         "--endpoint-url", soak.world.server.endpoint], environ=soak.world.env(through_proxy=False))
        results[channel] = (code, stderr.getvalue().strip()[-300:])
    return answers_through_every_channel(results)


# ---------------------------------------------------------------------------------------------- the history
def describe(out: Outcome) -> str:
    return "; ".join(f"{who}: " + " -> ".join(attempts) for who, attempts in out.attempts.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--seed", type=int, help="replay this history (default: a new seed, printed)")
    parser.add_argument("--steps", type=int, help="operations to run (default 40 without --minutes)")
    parser.add_argument("--minutes", type=float, help="stop starting operations after this many minutes")
    parser.add_argument("--keep", action="store_true", help="keep the soak's folder (server data, work dirs)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**9)
    steps = args.steps or (10**6 if args.minutes else 40)  # with both, whichever comes first
    root = Path(tempfile.mkdtemp(prefix=f"soak-{seed}-"))
    started = time.monotonic()
    length = [f"{args.steps} steps" if args.steps else "", f"{args.minutes:g} minutes" if args.minutes else ""]
    print(f"== soak: seed {seed}, {' or '.join(filter(None, length)) or f'{steps} steps'}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; machine: {machine()}")
    # stopped (SIGTERM, a test's timeout), the soak still stops its server and unmounts its disks, in the finally below
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the tiny model's "Writing model shards" bar, in the report
    world = World(root, tag=f"{seed:x}")
    os.environ.update({k: v for k, v in world.env(through_proxy=False).items() if k.startswith("AWS_")})  # the answer check's reads
    try:
        soak = Soak(world, root)
        missing = [what for what, ok in (("a full scratch disk (needs root and mount)", soak.can_mount),
                                         ("a clock minutes off (needs libfaketime: apt-get install faketime)", soak.faketime)) if not ok]
        print(f"faults not available here: {'; '.join(missing) or 'none'}")
        return run_history(soak, seed, steps, args.minutes, started)
    finally:
        world.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept: {root}")


def run_history(soak: Soak, seed: int, steps: int, minutes: float | None, started: float) -> int:
    master, policy = random.Random(seed), Policy(KEEP_RUNS, GATES)
    names, weights = list(OPS), [w for _, w in OPS.values()]
    references = {"sha256": {}, "done": set(), "compared": 0, "unavailable": 0}
    history, violations, seen = [], [], set()
    ops, faults, unfired, exits, decisions = Counter(), Counter(), Counter(), Counter(), Counter()
    prev = soak.world.snapshot(-1)
    step = 0
    for step in range(steps):
        if minutes and time.monotonic() - started > minutes * 60:
            break
        rng = random.Random(master.getrandbits(64))
        # the first two steps train (a fresh output has no channel for the operator's commands to act on)
        name = rng.choices(names, [w if step >= 2 or n in NIGHTS else 0 for n, w in zip(names, weights)])[0]
        out, t0 = Outcome(name, kind=name), time.monotonic()
        OPS[name][0](soak, rng, out)
        cur = soak.world.snapshot(step)
        found = check_step(soak, out, prev, cur, policy, references)
        shutil.rmtree(soak.root / "work", ignore_errors=True)  # every process of the step is done: its scratch goes
        prev = cur
        line = f"{step:4d} {out.line:<52} {describe(out)}  ({time.monotonic() - t0:.0f} s)"
        history.append(line)
        print(line, flush=True)
        ops[out.kind] += 1
        faults.update(out.faults)
        unfired.update(out.unfired)
        for proc in out.procs:
            exits[(proc.kind, proc.code)] += 1
            for event in json_events(proc.stdout.splitlines()):
                if event.get("event") in ("promotion", "unchanged"):
                    decisions[event.get("decision", "unchanged")] += 1
        for note in out.notes:
            print(f"       note: {note}")
        for invariant, problem in found:
            if (invariant, problem) in seen:
                continue
            seen.add((invariant, problem))
            violations.append((step, invariant, problem))
            print(f"       VIOLATION {invariant}: {problem}", flush=True)
    ran = len(history)
    print(f"\n== soak done: seed {seed}, {ran} steps in {(time.monotonic() - started) / 60:.1f} minutes")
    print("operations: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    print("processes: " + ", ".join(f"{kind} exit {code}: {n}" for (kind, code), n in sorted(exits.items())))
    print("faults that fired: " + (", ".join(f"{k} {v}" for k, v in faults.most_common()) or "none"))
    print("faults drawn that never fired (the process ended before their point or event): "
          + (", ".join(f"{k} {v}" for k, v in unfired.most_common()) or "none"))
    print("channel decisions: " + (", ".join(f"{k} {v}" for k, v in decisions.most_common()) or "none"))
    print(f"resumed runs compared with a fault-free reference: {references['compared']} "
          f"({len(references['sha256'])} reference runs, {references['unavailable']} without a reference)")
    print(f"violations: {len(violations)}")
    for step, invariant, problem in violations:
        print(f"\n-- step {step}: {invariant}: {problem}\n   the history that led to it:")
        for line in history[: step + 1]:
            print(f"   {line}")
        print(f"   replay: python bench/soak.py --seed {seed} --steps {step + 1}")
    print(f"\nreplay this history: python bench/soak.py --seed {seed} --steps {ran}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
