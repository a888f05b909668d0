"""Does the job learn? Fine-tune MiniLM through the real job on 1,000 SQuAD rows, score 500 dev rows.

Two scores, side by side, with the same model, data, windows, decoding and metric code:

- untrained: the pretrained MiniLM encoder with a freshly initialised QA head (seeded), scored
  in-process by the job's own stages (``load_splits`` -> ``load_model`` -> ``build_features`` ->
  ``training_arguments`` / ``build_trainer`` -> ``evaluate``) with zero optimizer steps. This is
  the job's ``fine_tune_evaluate_publish`` minus ``train()``; nothing is faked, nothing is trained.
- fine-tuned: the real job in a subprocess (``python -m job`` with ``QA_*`` variables, local output
  in a temp dir), one epoch over the first N train rows; EM/F1 from its ``eval`` event and
  ``metrics.json``.

Usage: python bench/learning.py [--train-rows 1000] [--eval-rows 500] [--lr 3e-4] [--batch 16]
                                [--epochs 1] [--warmup 0.1] [--keep]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import DEV_FILE, TRAIN_FILE, data_file, header, minilm_path, read_rows, run_job, write_jsonl


def job_env(tmp: Path, args, run_id: str) -> dict[str, str]:
    return {
        "QA_RUN_ID": run_id, "QA_EXPORT": "none",  # what is measured here is learning, not serving
        "QA_MODEL_NAME": str(minilm_path()),
        "QA_TRAIN_URI": str(tmp / "train.jsonl"),
        "QA_EVAL_URI": str(tmp / "dev.jsonl"),
        "QA_OUTPUT_URI": str(tmp / "out"),
        "QA_WORK_DIR": str(tmp / "work"),
        "QA_MAX_LENGTH": str(args.max_length),
        "QA_DOC_STRIDE": str(args.stride),
        "QA_EPOCHS": str(args.epochs),
        "QA_LEARNING_RATE": str(args.lr),
        "QA_BATCH_SIZE": str(args.batch),
        "QA_WARMUP_RATIO": str(args.warmup),
        "QA_SEED": "42",
        "QA_PRECISION": "fp32",
        "QA_LOGGING_STEPS": "10",
        # no periodic checkpoints: this measures learning, not sync (the job still saves the last step)
        "QA_CHECKPOINT_STEPS": "0",
        "QA_CHECKPOINT_MINUTES": "0",
        "QA_DATALOADER_WORKERS": "0",  # 2 cores: worker processes would only compete with the model
    }


def score_inprocess(tmp: Path, args, model_name: str, run_id: str, group_by_length: bool, seed_head: bool) -> tuple[dict, float]:
    """The job's own stages with zero training steps: load_splits -> load_model -> build_features ->
    training_arguments / build_trainer -> evaluate (trainer.predict + decode_all + squad_scores)."""
    import datasets
    import transformers
    from transformers import set_seed

    from job.data import load_splits
    from job.evaluate import evaluate
    from job.preprocess import build_features
    from job.settings import load_settings
    from job.store.storage import RetryPolicy
    from job.train import build_trainer, load_model, training_arguments

    transformers.logging.set_verbosity_error()  # the load report lists the fresh qa_outputs head: expected here
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    started = time.perf_counter()
    env = job_env(tmp, args, run_id)
    env.update(QA_MODEL_NAME=model_name, QA_GROUP_BY_LENGTH=str(group_by_length).lower())
    settings = load_settings(env)
    train_split, eval_split = load_splits(settings, RetryPolicy())
    if seed_head:
        set_seed(settings.seed)  # load_model seeds too (since the fix in RESULTS.md); kept for older checkouts
    tokenizer, model = load_model(settings.model_name, settings.seed)
    features = build_features(settings, tokenizer, train_split, eval_split, None, True)
    trainer_args = training_arguments(settings, tmp / "work" / run_id / "trainer", "fp32")
    trainer = build_trainer(settings, model, tokenizer, features.train, trainer_args, [])
    scores, _ = evaluate(trainer, features.eval, eval_split.rows, settings)
    return scores, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--eval-rows", type=int, default=500)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--skip-untrained", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (model, logs) and print its path")
    args = parser.parse_args()

    train_path, dev_path = data_file(TRAIN_FILE), data_file(DEV_FILE)
    header("bench/learning.py: fine-tune MiniLM through the job, EM/F1 before and after")
    tmp = Path(tempfile.mkdtemp(prefix="bench-learning-"))
    try:
        write_jsonl(read_rows(train_path, args.train_rows), tmp / "train.jsonl")
        write_jsonl(read_rows(dev_path, args.eval_rows), tmp / "dev.jsonl")
        print(f"train: first {args.train_rows} rows of {TRAIN_FILE}; eval: first {args.eval_rows} rows of {DEV_FILE}")
        print(f"recipe: lr {args.lr}, batch {args.batch}, epochs {args.epochs}, warmup ratio {args.warmup}, "
              f"max_length {args.max_length}, stride {args.stride}, fp32 on CPU, job defaults otherwise "
              f"(AdamW, linear decay, weight decay 0.01, group_by_length)")

        untrained = untrained_seq = None
        minilm = str(minilm_path())
        if not args.skip_untrained:
            untrained, secs = score_inprocess(tmp, args, minilm, "bench-untrained", True, True)
            print(f"\nuntrained head, job evaluate as configured (group_by_length=true):  "
                  f"EM {untrained['exact_match']:6.2f}  F1 {untrained['f1']:6.2f}  ({untrained['total']} questions, {secs:.0f} s)")
            untrained_seq, secs = score_inprocess(tmp, args, minilm, "bench-untrained-seq", False, True)
            print(f"untrained head, job evaluate with sequential eval order:          "
                  f"EM {untrained_seq['exact_match']:6.2f}  F1 {untrained_seq['f1']:6.2f}  ({secs:.0f} s)")

        env = job_env(tmp, args, "bench-learning")
        print("\nfine-tuning through `python -m job` ...", flush=True)
        run = run_job(env, tmp / "job.stderr", timeout=3 * 3600)
        if run.proc.returncode != 0:
            print(f"FAIL: the job did not finish: {run.failure()}")
            return 1
        for e in run.event("progress"):
            print(f"  step {e['step']:4d}/{e['max_steps']}  loss {e['loss']:.3f}  lr {e['learning_rate']:.2e}  "
                  f"{e['samples_per_second']} samples/s  (t={e['_t']:.0f} s)")
        feats = run.event("features")[0]
        end = run.event("train_end")[0]
        ev = run.event("eval")[0]
        metrics = json.loads((tmp / "out" / "bench-learning" / "metrics.json").read_text())
        print(f"\nwindows: {feats['train_windows']} train, {feats['eval_windows']} eval; steps {end['step']}")
        print(f"fine-tuned:      EM {ev['exact_match']:6.2f}  F1 {ev['f1']:6.2f}  ({ev['total']} questions; "
              f"metrics.json EM {metrics['exact_match']:.2f} F1 {metrics['f1']:.2f}, train_loss {metrics['train_loss']:.3f})")
        print(f"wall: job {run.wall:.0f} s total, train_runtime {end['train_runtime']:.0f} s "
              f"({end['train_samples_per_second']} windows/s), evaluation "
              f"{ev['_t'] - end['_t']:.0f} s, start to first step {run.event('train_start')[0]['_t']:.0f} s")
        # The job's eval event comes from trainer.predict under group_by_length, whose eval sampler in
        # transformers 5.x is a LengthGroupedSampler: predictions come back in another order than the
        # eval windows (see RESULTS.md). Re-score the published model with the job's evaluate() in
        # sequential order to see what the model actually learned.
        model_dir = tmp / "out" / "bench-learning" / "model"
        seq, secs = score_inprocess(tmp, args, str(model_dir), "bench-rescore-seq", False, False)
        print(f"fine-tuned, published model re-scored by job evaluate() in sequential order: "
              f"EM {seq['exact_match']:6.2f}  F1 {seq['f1']:6.2f}  ({secs:.0f} s)")
        if untrained is not None:
            print(f"\nRESULT as the job reports it (group_by_length eval order): EM {untrained['exact_match']:.2f} -> "
                  f"{ev['exact_match']:.2f}, F1 {untrained['f1']:.2f} -> {ev['f1']:.2f} after {end['step']} steps")
            print(f"RESULT in sequential eval order (true scores):           EM {untrained_seq['exact_match']:.2f} -> "
                  f"{seq['exact_match']:.2f}, F1 {untrained_seq['f1']:.2f} -> {seq['f1']:.2f}")
        return 0
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
