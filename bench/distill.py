"""Does distillation help the small model? A teacher, a plain student and a distilled one, all trained by the job.

On CPU, offline, with the real job (``python -m job``) for every model:

- teacher: MiniLM-L6 (6 layers) fine-tuned by the job on the first N rows of the train sample;
- student base: 3 layers made from MiniLM's (every other encoder layer, 0, 2 and 4, with its
  embeddings: the DistilBERT recipe), saved as a plain encoder, so the job draws a fresh QA head;
- plain student: the job on the same rows, steps and recipe;
- distilled student: the same, with ``QA_TEACHER_MODEL`` = the teacher's published model.

Each is scored by the job on the first D rows of the dev sample. The table gives EM/F1, the
distilled-minus-plain difference per question (``job.squad.metrics.per_example_scores``) with its
paired bootstrap interval (``job.channels.gate.paired_bootstrap``, the gate's own function), and
what distillation costs: the teacher's one pass over the training windows (cold cache) and the
training loop itself with the logits already cached (warm: ``train_runtime``, and CPU seconds).

Usage: python bench/distill.py [--train-rows 2500] [--eval-rows 2000] [--lr 3e-4] [--batch 16]
                               [--epochs 1] [--alpha 0.5] [--temperature 2.0] [--json PATH] [--keep]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import DEV_FILE, TRAIN_FILE, data_file, header, minilm_path, read_rows, run_job, write_jsonl


def student_base(dest: Path) -> Path:
    """MiniLM's embeddings and encoder layers 0, 2, 4 as a 3-layer BertModel, with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    teacher = BertModel.from_pretrained(str(minilm_path()), add_pooling_layer=False)
    config = BertConfig.from_dict({**teacher.config.to_dict(), "num_hidden_layers": 3})
    student = BertModel(config, add_pooling_layer=False)
    student.embeddings.load_state_dict(teacher.embeddings.state_dict())
    for mine, theirs in enumerate((0, 2, 4)):
        student.encoder.layer[mine].load_state_dict(teacher.encoder.layer[theirs].state_dict())
    student.save_pretrained(str(dest))
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(str(dest))
    return dest


def job_env(tmp: Path, args, run_id: str, model: Path, **extra: str) -> dict[str, str]:
    return {
        "QA_RUN_ID": run_id, "QA_MODEL_NAME": str(model),
        "QA_TRAIN_URI": str(tmp / "train.jsonl"), "QA_EVAL_URI": str(tmp / "dev.jsonl"),
        "QA_OUTPUT_URI": str(tmp / "out"), "QA_WORK_DIR": str(tmp / "work"),
        "QA_MAX_LENGTH": "384", "QA_DOC_STRIDE": "128", "QA_EPOCHS": str(args.epochs),
        "QA_LEARNING_RATE": str(args.lr), "QA_BATCH_SIZE": str(args.batch), "QA_WARMUP_RATIO": "0.1",
        "QA_SEED": "42", "QA_PRECISION": "fp32", "QA_DEVICE": "cpu", "QA_LOGGING_STEPS": "20",
        "QA_CHECKPOINT_STEPS": "0", "QA_CHECKPOINT_MINUTES": "0",  # learning, not sync (the last step is still saved)
        "QA_DATALOADER_WORKERS": "0", "QA_REPORT_TO": "none", "QA_LOG_FORMAT": "json", "QA_EXPORT": "none", **extra,
    }


def train(tmp: Path, args, run_id: str, model: Path, **extra: str) -> dict:
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = run_job(job_env(tmp, args, run_id, model, **extra), tmp / f"{run_id}.stderr", timeout=3 * 3600)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.proc.returncode != 0:
        print(f"bench: the {run_id} run failed: {run.failure()}", file=sys.stderr)
        sys.exit(1)
    folder = tmp / "out" / run_id
    metrics = json.loads((folder / "metrics.json").read_text())
    scoring = run.event("teacher_logits")
    result = {"run": run_id, "wall": run.wall, "cpu": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
              "train_runtime": metrics["train_runtime"], "steps": metrics["global_step"],
              "train_windows": run.event("features")[0]["train_windows"], "em": metrics["exact_match"],
              "f1": metrics["f1"], "predictions": json.loads((folder / "predictions.json").read_text()),
              "teacher_seconds": scoring[0]["seconds"] if scoring else None}
    print(f"{run_id}: EM {result['em']:.2f} F1 {result['f1']:.2f}, {result['steps']} steps, train {result['train_runtime']:.0f} s, "
          f"wall {result['wall']:.0f} s, cpu {result['cpu']:.0f} s" +
          (f", teacher pass {result['teacher_seconds']:.0f} s" if scoring else ""), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=2500)
    parser.add_argument("--eval-rows", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    train_rows = read_rows(data_file(TRAIN_FILE), args.train_rows)
    dev_rows = read_rows(data_file(DEV_FILE), args.eval_rows)
    header(f"distill.py: {len(train_rows)} train rows, {len(dev_rows)} dev rows, alpha {args.alpha}, T {args.temperature}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    started = time.monotonic()
    try:
        write_jsonl(train_rows, tmp / "train.jsonl")
        write_jsonl(dev_rows, tmp / "dev.jsonl")
        base = student_base(tmp / "student-base")
        teacher = train(tmp, args, "teacher", minilm_path())
        plain = train(tmp, args, "plain", base)
        distilled = train(tmp, args, "distilled", base, QA_TEACHER_MODEL=str(tmp / "out" / "teacher" / "model"),
                          QA_DISTILL_ALPHA=str(args.alpha), QA_DISTILL_TEMPERATURE=str(args.temperature))
        report(args, dev_rows, teacher, plain, distilled, time.monotonic() - started)
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(args, dev_rows, teacher: dict, plain: dict, distilled: dict, wall: float) -> None:
    from job.channels.gate import paired_bootstrap
    from job.squad.metrics import per_example_scores

    per = {r["run"]: per_example_scores(dev_rows, r["predictions"]) for r in (plain, distilled)}
    ids = sorted(per["plain"])
    print("\n| model | EM | F1 | train windows x epochs | steps |\n|---|---:|---:|---:|---:|")
    for name, r in (("teacher: MiniLM-L6, 6 layers", teacher), ("student, plain: 3 layers", plain),
                    ("student, distilled", distilled)):
        print(f"| {name} | {r['em']:.2f} | {r['f1']:.2f} | {r['train_windows']} x {args.epochs:g} | {r['steps']} |")
    print(f"\ndistilled - plain, over {len(ids)} dev questions (paired bootstrap, 95%, the gate's function):\n")
    print("| metric | mean difference | 95% interval |\n|---|---:|---:|")
    numbers = {}
    for metric in ("exact_match", "f1"):
        diffs = [per["distilled"][i][metric] - per["plain"][i][metric] for i in ids]
        mean, low, high = paired_bootstrap(diffs)
        numbers[metric] = {"mean": mean, "low": low, "high": high}
        print(f"| {metric} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] |")
    overhead = distilled["train_runtime"] / plain["train_runtime"] - 1
    print("\ncost of distillation (same rows and steps, measured one after the other):\n")
    print("| | plain | distilled | ratio |\n|---|---:|---:|---:|")
    print(f"| training loop, logits cached (train_runtime) | {plain['train_runtime']:.0f} s | {distilled['train_runtime']:.0f} s "
          f"| {1 + overhead:.3f} |")
    print(f"| whole job, wall | {plain['wall']:.0f} s | {distilled['wall']:.0f} s | {distilled['wall'] / plain['wall']:.3f} |")
    print(f"| whole job, CPU | {plain['cpu']:.0f} s | {distilled['cpu']:.0f} s | {distilled['cpu'] / plain['cpu']:.3f} |")
    print(f"| the teacher's one pass over the training windows (cold cache) | | {distilled['teacher_seconds']:.0f} s | |")
    print(f"\nbenchmark wall time: {wall / 60:.1f} min")
    if args.json:
        drop = ("predictions",)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": [{k: v for k, v in r.items() if k not in drop} for r in (teacher, plain, distilled)],
                                         "difference": numbers, "training_overhead": overhead, "wall": wall}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
