"""Four nights of a nightly channel with the pretrained MiniLM over real SQuAD rows, through the real job.

Night 1: the first part of the train sample under a data prefix, no holder yet.
Night 2: nothing changed: the job must stop before tokenizing.
Night 3: a second file lands under the prefix: trained (warm start from the holder), gated, promoted?
Night 4: a broken drop lands: a third file, three times the size of the others, whose answers all
         point at the first word of their context (valid rows, wrong labels), as a faulty export
         would produce: the gate must reject it.

Every night is ``python -m job`` with ``QA_CHANNEL=nightly-bench`` and ``QA_INIT_FROM=channel``
into a local output folder; the same dev rows are the eval set every night, so the holder's
published predictions are paired with the candidate's. Printed per night: train rows, trained
or not, wall time of the process, candidate and holder F1, the paired mean difference with its
95% interval, and the decision.

Usage: python bench/nightly.py [--rows 200] [--eval-rows 300] [--max-drop 1.0] [--keep]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import DEV_FILE, TRAIN_FILE, data_file, header, minilm_path, read_rows, run_job, write_jsonl


def job_env(tmp: Path, args, run_id: str) -> dict[str, str]:
    return {
        "QA_RUN_ID": run_id, "QA_MODEL_NAME": str(minilm_path()), "QA_EXPORT": "none",
        "QA_TRAIN_URI": f"{tmp / 'drops'}/", "QA_EVAL_URI": str(tmp / "dev.jsonl"),
        "QA_OUTPUT_URI": str(tmp / "out"), "QA_WORK_DIR": str(tmp / "work"),
        "QA_CHANNEL": "nightly-bench", "QA_INIT_FROM": "channel", "QA_GATE_MAX_DROP": str(args.max_drop),
        "QA_MAX_LENGTH": "256", "QA_DOC_STRIDE": "96", "QA_EPOCHS": "1", "QA_LEARNING_RATE": "3e-4",
        "QA_BATCH_SIZE": "16", "QA_WARMUP_RATIO": "0.1", "QA_SEED": "42", "QA_PRECISION": "fp32",
        "QA_LOGGING_STEPS": "20", "QA_CHECKPOINT_STEPS": "0", "QA_CHECKPOINT_MINUTES": "0",
        "QA_DATALOADER_WORKERS": "0",
    }


def broken(rows: list[dict]) -> list[dict]:
    """Valid rows with wrong labels: every answer is the first word of its context."""
    out = []
    for row in rows:
        word = row["context"].split()[0]
        out.append({**row, "id": f"broken-{row['id']}", "answers": {"text": [word], "answer_start": [row["context"].index(word)]}})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200, help="train rows per drop (night 4's broken drop has 3x as many)")
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--max-drop", type=float, default=1.0, help="QA_GATE_MAX_DROP")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    train = read_rows(data_file(TRAIN_FILE), limit=5 * args.rows)
    dev = read_rows(data_file(DEV_FILE), limit=args.eval_rows)
    header("nightly channel: four nights, MiniLM, real SQuAD rows")
    tmp = Path(tempfile.mkdtemp(prefix="bench-nightly-"))
    (tmp / "drops").mkdir()
    write_jsonl(dev, tmp / "dev.jsonl")
    drops = {1: ("part-1.jsonl", train[:args.rows]), 3: ("part-2.jsonl", train[args.rows:2 * args.rows]),
             4: ("part-3.jsonl", broken(train[2 * args.rows:5 * args.rows]))}
    print(f"drops: {args.rows} rows, then +{args.rows}, then +{3 * args.rows} broken; eval: {len(dev)} dev rows; "
          f"QA_GATE_MAX_DROP={args.max_drop:g}\n")
    print("| night | train rows | trained | wall s | candidate F1 | holder F1 | mean diff [95% interval] | decision |")
    print("|---|---|---|---|---|---|---|---|")
    rows_total = 0
    try:
        for night in (1, 2, 3, 4):
            if night in drops:
                name, rows = drops[night]
                write_jsonl(rows, tmp / "drops" / name)
                rows_total += len(rows)
            run = run_job(job_env(tmp, args, f"night-{night}"), tmp / f"night-{night}.stderr", timeout=1800)
            if run.proc.returncode != 0:
                print(f"night {night} failed: {run.failure()}", file=sys.stderr)
                return 1
            print(row(night, rows_total, run), flush=True)
        pointer = json.loads((tmp / "out" / "channels" / "nightly-bench.json").read_text())
        print(f"\npointer after night 4: seq {pointer['seq']}, run {pointer['run_id']}, F1 {pointer['metrics']['f1']:.2f}, "
              f"warm starts {pointer['warm_starts']}")
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def row(night: int, rows: int, run) -> str:
    if run.event("unchanged"):
        return f"| {night} | {rows} | no (unchanged, same as {run.event('unchanged')[0]['same_as']}) | {run.wall:.0f} | — | — | — | unchanged |"
    (p,) = run.event("promotion")
    holder = f"{p['holder']:.2f}" if p.get("holder") is not None else "—"
    interval = (f"{p['mean_difference']:+.2f} [{p['interval'][0]:+.2f}, {p['interval'][1]:+.2f}]"
                if p.get("interval") else "—")
    return (f"| {night} | {rows} | yes ({run.event('train_end')[0]['step']} steps) | {run.wall:.0f} | {p['candidate']:.2f} | "
            f"{holder} | {interval} | {p['decision']} ({p['reason']}) |")


if __name__ == "__main__":
    sys.exit(main())
