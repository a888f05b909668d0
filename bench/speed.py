"""CPU speed of the job, side by side in one run: preprocessing, each speed switch in training, evaluation.

(a) Preprocessing of the train sample (all 15,304 rows by default), interleaved rounds: the bare
    tokenizer call (``job.squad.features.tokenize`` on the same 1,000-row chunks, nothing else); today's
    path (``train_features`` then ``Dataset.from_dict``, what ``build_features`` did before
    ``QA_PREPROCESS_WORKERS``); ``feature_dataset`` with 1 and 2 workers; and with 1 worker whose
    tokenizer runs on one thread (as each of the 2 workers does), which shows how much of the
    serial path the tokenizer's own threads already spread. Wall and CPU seconds (this process
    and its workers), and a check that every variant gives the same table.
(b) Training, real (non-pad) tokens/s, MiniLM with a seeded fresh QA head, the real ``Trainer``:
    today's recipe (the defaults before this change: fused AdamW, 2 DataLoader workers, fp32),
    the tutorial recipe, the job's CPU default (fused AdamW, SDPA, fp32, no compile, no workers),
    each switch flipped alone, and all switches on together, each in pairs with the CPU default
    (ratios within a pair); steady state after ``--skip`` steps; compile graphs and seconds.
(c) Evaluation (predict + decode) of the dev sample (all 6,823 questions by default) with a
    briefly fine-tuned MiniLM: today's ``evaluate`` (dataset order, offsets as Python lists), the
    new one in dataset order, and the new one (longest first), interleaved; positions computed;
    answers that differ, each with its scores and logit change.

Usage: python bench/speed.py [--only prep,train,eval] [--rounds 2] [--steps 20] [--eval-rounds 1] ...
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import DEV_FILE, TRAIN_FILE, data_file, header, minilm_path, read_rows
from _training import Steps, epoch_token_shares, job_trainer, timed_train, tutorial_features, tutorial_trainer


def quiet() -> None:
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the preprocessing workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# --- (a) preprocessing -------------------------------------------------------------------------

def bench_preprocessing(tokenizer, rows, args) -> None:
    import datasets

    from job.preprocess import feature_dataset
    from job.squad.features import CHUNK, tokenize, train_features

    def bare():
        return sum(len(tokenize(tokenizer, rows[b:b + CHUNK], args.max_length, args.stride)["input_ids"])
                   for b in range(0, len(rows), CHUNK))

    def one_thread(fn):
        def run():  # the Rust tokenizer reads the variable at every call
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                return fn()
            finally:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
        return run

    variants = {
        "bare tokenizer (tokenize() per 1,000 rows)": bare,
        "today: train_features + Dataset.from_dict": lambda: datasets.Dataset.from_dict(train_features(tokenizer, rows, args.max_length, args.stride)),
        "feature_dataset, 1 worker": lambda: feature_dataset("train", tokenizer, rows, args.max_length, args.stride, workers=1),
        "feature_dataset, 2 workers": lambda: feature_dataset("train", tokenizer, rows, args.max_length, args.stride, workers=2),
        "feature_dataset, 1 worker, tokenizer on one thread": one_thread(
            lambda: feature_dataset("train", tokenizer, rows, args.max_length, args.stride, workers=1)),
    }
    names = list(variants)
    runs = {n: [] for n in names}
    outputs = {}
    print(f"\n(a) preprocessing, {len(rows):,} rows, {args.max_length}/{args.stride}, {args.prep_rounds} interleaved round(s)")
    for r in range(args.prep_rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            before_load, c0, t0 = load(), cpu_seconds(), time.perf_counter()
            out = variants[name]()
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            runs[name].append((wall, cpu))
            outputs.setdefault(name, out)
            print(f"  [load {before_load}] {name:44s} {wall:6.2f} s wall, {cpu:6.2f} s CPU", flush=True)
    tables = [outputs[n].data.table for n in names[1:]]
    same = all(t.equals(tables[0]) for t in tables[1:])
    print(f"  the job variants give the same table: {same} ({len(tables[0]):,} windows; bare tokenizer: {outputs[names[0]]:,})")
    base = statistics.median(w for w, _ in runs["feature_dataset, 1 worker"])
    bare_t = statistics.median(w for w, _ in runs[names[0]])
    print("\n| variant | median wall s | rows/s | CPU s (median) | speed vs 1 worker | speed vs bare tokenizer |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        wall = statistics.median(w for w, _ in runs[name])
        cpu = statistics.median(c for _, c in runs[name])
        print(f"| {name} | {wall:.2f} | {len(rows) / wall:,.0f} | {cpu:.2f} | {base / wall:.2f}x | {bare_t / wall:.2f}x |")


# --- (b) training ------------------------------------------------------------------------------

TODAY = {"QA_FUSED_ADAMW": "true", "QA_DATALOADER_WORKERS": "2", "QA_COMPILE": "false", "QA_TF32": "false",
         "QA_PIN_MEMORY": "false"}


def training_variants(bf16_native: bool) -> dict[str, tuple[dict, str]]:
    bf16 = "bf16" + ("" if bf16_native else " (emulated: no AVX512-BF16/AMX)")
    return {
        "today (defaults before this change)": (TODAY, "fp32"),
        "tutorial": ({}, "fp32"),
        "job CPU default (auto)": ({}, "fp32"),
        "- fused AdamW (foreach kernel)": ({"QA_FUSED_ADAMW": "false"}, "fp32"),
        "+ torch.compile": ({"QA_COMPILE": "true"}, "fp32"),
        f"+ {bf16}": ({}, "bf16"),
        "- SDPA (eager attention)": ({"QA_ATTENTION": "eager"}, "fp32"),
        "+ 2 DataLoader workers": ({"QA_DATALOADER_WORKERS": "2"}, "fp32"),
        "all on: fused + compile + bf16": ({"QA_COMPILE": "true"}, "bf16"),
    }


BASELINE = "job CPU default (auto)"


def train_once(name, env, precision, windows_job, windows_tut, args, tmp: Path):
    import datasets
    import torch

    from job.train import compile_stats, load_model

    model_path = str(minilm_path())
    compiled = env.get("QA_COMPILE") == "true"
    if compiled:
        torch._dynamo.reset()  # every compiled run compiles from nothing (the on-disk cache stays)
    before = compile_stats()  # process totals: the run's own are the difference
    tokenizer, model = load_model(model_path, 42, env.get("QA_ATTENTION", "sdpa"))  # same fresh head every run
    steps = Steps()
    out = tmp / f"run-{time.monotonic_ns()}"
    if name == "tutorial":
        trainer = tutorial_trainer(model, tokenizer, datasets.Dataset.from_dict(windows_tut), out, args.steps, args.batch,
                                   args.lr, cuda=False, callbacks=[steps.callback()])
    else:
        run_env = {"QA_MODEL_NAME": model_path, "QA_BATCH_SIZE": str(args.batch), "QA_MAX_STEPS": str(args.steps),
                   "QA_LEARNING_RATE": str(args.lr), "QA_SEED": "42", "QA_PRECISION": precision, **env}
        trainer, _ = job_trainer(model, tokenizer, datasets.Dataset.from_dict(windows_job), out, run_env, precision,
                                 [steps.callback()])
    c0 = cpu_seconds()
    run = timed_train(name, trainer, steps, args.batch, args.skip)
    run.extra["cpu_s"] = cpu_seconds() - c0
    if compiled:
        after = compile_stats()
        run.extra["compile"] = {k: round(after[k] - before.get(k, 0), 1) for k in after}
    return run


def bench_optimizer_step(reps: int = 8) -> None:
    """One AdamW step over MiniLM's parameters alone, each implementation interleaved: the part of a
    training step ``QA_FUSED_ADAMW`` changes, measured without the noise of the whole step."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    params = list(AutoModelForQuestionAnswering.from_pretrained(str(minilm_path())).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    kinds = {"fused (QA_FUSED_ADAMW=true)": dict(fused=True),
             "torch default: for-loop on CPU (QA_FUSED_ADAMW=false)": {},
             "foreach": dict(foreach=True)}
    optimizers = {k: torch.optim.AdamW(params, lr=1e-5, **kw) for k, kw in kinds.items()}
    times = {k: [] for k in kinds}
    for opt in optimizers.values():
        opt.step()  # state allocated outside the timing
    for r in range(reps):
        for k in (list(kinds) if r % 2 == 0 else list(kinds)[::-1]):
            t = time.perf_counter()
            optimizers[k].step()
            times[k].append(time.perf_counter() - t)
    fused = statistics.median(times[next(iter(kinds))])
    print(f"\n(b0) one AdamW step over MiniLM's {sum(p.numel() for p in params) / 1e6:.1f}M parameters, {reps} interleaved "
          f"repetitions, {torch.get_num_threads()} threads, load {load()}:")
    for k, t in times.items():
        print(f"  {k:55s} {1000 * statistics.median(t):7.1f} ms (median)  {statistics.median(t) / fused:5.2f}x the fused time")


def bench_training(tokenizer, rows, args) -> None:
    """Each variant runs in pairs with the job's CPU default, back to back, the order alternating:
    the machine's load drifts over minutes, so only a ratio taken within a pair is trusted."""
    from job.squad.features import train_features
    from job.train import cpu_has_bf16

    windows_job = train_features(tokenizer, rows, args.max_length, args.stride)
    windows_tut = tutorial_features(tokenizer, rows, args.max_length)
    job_share, tut_share, mean_len = epoch_token_shares(windows_job, windows_tut, args.batch)
    variants = training_variants(cpu_has_bf16())
    others = [n for n in variants if n != BASELINE]
    print(f"\n(b) training, MiniLM on CPU, {args.steps} optimizer steps x batch {args.batch}, each variant in "
          f"{args.rounds} pair(s) with the job's CPU default, steady state after step {args.skip}")
    print(f"  data: {len(rows)} rows -> job {len(windows_job['input_ids'])} windows (mean {mean_len:.0f} tokens), "
          f"tutorial {len(windows_tut['input_ids'])} windows of {args.max_length}; whole-epoch real-token share: "
          f"job {100 * job_share:.1f}%, tutorial {100 * tut_share:.1f}%")
    runs = {n: [] for n in variants}
    ratios = {n: [] for n in others}
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        if args.warmup_steps:  # one-time costs (imports, thread pools, allocator) land on no variant
            warm = argparse.Namespace(**{**vars(args), "steps": args.warmup_steps})
            train_once("warm-up", {}, "fp32", windows_job, windows_tut, warm, Path(tmp))
        for r in range(args.rounds):
            for i, name in enumerate(others):
                pair = (BASELINE, name) if (r + i) % 2 == 0 else (name, BASELINE)
                got = {}
                for which in pair:
                    env, precision = variants[which]
                    before = load()
                    run = train_once(which, env, precision, windows_job, windows_tut, args, Path(tmp))
                    got[which] = run
                    runs[which].append(run)
                    comp = f", compile {run.extra['compile']}" if "compile" in run.extra else ""
                    print(f"  [load {before}] {which:40s} train() {run.wall:6.1f} s, {run.extra['cpu_s']:6.1f} CPU s, "
                          f"steady {run.steady_tokens_per_s:6.0f} real tok/s, first {args.skip} steps "
                          f"{run.first_steps_s:5.1f} s{comp}", flush=True)
                ratios[name].append(got[name].steady_tokens_per_s / got[BASELINE].steady_tokens_per_s)
    today = statistics.median(ratios["today (defaults before this change)"])
    tut = statistics.median(ratios["tutorial"])
    base = [r.steady_tokens_per_s for r in runs[BASELINE]]
    adjacent = [max(a, b) / min(a, b) for a, b in zip(base, base[1:])]
    print(f"\n  noise floor: the job's CPU default alone ran at {min(base):,.0f}-{max(base):,.0f} real tok/s over "
          f"{len(base)} runs; two of its consecutive runs differ by {statistics.median(adjacent):.2f}x (median), "
          f"{max(adjacent):.2f}x at most. A pair ratio closer to 1 than that is no effect.")
    print(f"\n| recipe | steady real tok/s (median of its runs) | vs job CPU default (median of pairs) | pairs | "
          f"vs today | vs tutorial | real tokens per CPU s | first {args.skip} steps s (first run) | compile (first run) |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for name in variants:
        rate = statistics.median(r.steady_tokens_per_s for r in runs[name])
        ratio = 1.0 if name == BASELINE else statistics.median(ratios[name])
        pairs = "" if name == BASELINE else ", ".join(f"{x:.2f}" for x in ratios[name])
        per_cpu = statistics.median(r.real_tokens / r.extra["cpu_s"] for r in runs[name])
        first = runs[name][0]
        comp = first.extra.get("compile")
        comp_text = f"{comp.get('graphs'):.0f} graphs, {comp.get('compile_seconds')} s" if comp else ""
        print(f"| {name} | {rate:,.0f} | {ratio:.2f}x | {pairs} | {ratio / today:.2f}x | {ratio / tut:.2f}x | "
              f"{per_cpu:,.0f} | {first.first_steps_s:.1f} | {comp_text} |")


# --- (c) evaluation ----------------------------------------------------------------------------

def evaluate_today(trainer, eval_features, rows, settings):
    """``job.evaluate.evaluate`` as it was before length-ordered prediction (main, 2026-11-28), to time it."""
    from job.squad.decoding import decode_all
    from job.squad.metrics import squad_scores

    model_inputs = eval_features.remove_columns(["example_index", "offset_mapping"])
    strategy = trainer.args.train_sampling_strategy
    trainer.args.train_sampling_strategy = "sequential"
    try:
        output = trainer.predict(model_inputs)
    finally:
        trainer.args.train_sampling_strategy = strategy
    start_logits, end_logits = output.predictions[:2]
    predictions = decode_all(
        rows, eval_features["example_index"], eval_features["offset_mapping"], start_logits, end_logits,
        n_best=settings.n_best_size, max_answer_length=settings.max_answer_length,
        version_2=settings.squad_v2, null_threshold=settings.null_score_diff_threshold,
    )
    return squad_scores(rows, predictions, version_2=settings.squad_v2), predictions


def computed_positions(lengths, order, batch) -> int:
    """Positions the model computes when windows go in ``order``, each batch padded to its longest."""
    return sum(max(lengths[i] for i in order[b:b + batch]) * len(order[b:b + batch]) for b in range(0, len(order), batch))


def bench_eval(tokenizer, train_rows, dev_rows, args) -> None:
    import datasets
    import numpy as np

    from job.evaluate import evaluate, length_order
    from job.preprocess import feature_dataset
    from job.settings import load_settings
    from job.squad.decoding import decode_answer
    from job.squad.features import train_features
    from job.train import load_model

    model_path = str(minilm_path())
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        env = {"QA_MODEL_NAME": model_path, "QA_BATCH_SIZE": "16", "QA_MAX_STEPS": str(max(args.eval_train_steps, 1)),
               "QA_LEARNING_RATE": "3e-4", "QA_WARMUP_RATIO": "0.1", "QA_PRECISION": "fp32"}
        settings = load_settings({"QA_WORK_DIR": tmp, **env})
        _, model = load_model(model_path, settings.seed)
        train_ds = datasets.Dataset.from_dict(train_features(tokenizer, train_rows[:2000], args.max_length, args.stride))
        trainer, _ = job_trainer(model, tokenizer, train_ds, Path(tmp), env, "fp32")
        t0 = time.perf_counter()
        if args.eval_train_steps:
            trainer.train()
        print(f"\n(c) evaluation of {len(dev_rows):,} dev questions, MiniLM fine-tuned for {args.eval_train_steps} steps "
              f"(batch 16, lr 3e-4, {time.perf_counter() - t0:.0f} s), eval batch {settings.eval_batch_size}, "
              f"{args.eval_rounds} interleaved round(s)")
        features = feature_dataset("eval", tokenizer, dev_rows, args.max_length, args.stride, workers=2)
        lengths = [len(x) for x in features["input_ids"]]
        batch = settings.eval_batch_size
        in_order = computed_positions(lengths, list(range(len(lengths))), batch)
        positions = {"today: dataset order": in_order, "new, dataset order": in_order,
                     "new: longest first": computed_positions(lengths, length_order(lengths).tolist(), batch)}
        captured = {}

        def run(name):
            original = trainer.predict

            def keep(dataset):  # the logits, back in dataset order, for the comparison below
                output = original(dataset)
                captured[name] = output
                return output

            trainer.predict = keep
            try:
                t = time.perf_counter()
                if name.startswith("today"):
                    scores, answers = evaluate_today(trainer, features, dev_rows, settings)
                else:
                    scores, answers = evaluate(trainer, features, dev_rows, settings, length_sorted=name.endswith("first"))
                return time.perf_counter() - t, scores, answers
            finally:
                del trainer.predict

        names = list(positions)
        walls = {n: [] for n in names}
        results = {}
        for r in range(args.eval_rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                before = load()
                wall, scores, answers = run(name)
                walls[name].append(wall)
                results[name] = (scores, answers)
                print(f"  [load {before}] {name:22s} {wall:6.1f} s, EM {scores['exact_match']:.2f}, F1 {scores['f1']:.2f}", flush=True)
    print("\n| evaluation | median s | runs | positions computed | real tokens share | speed-up |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    real = sum(lengths)
    base = statistics.median(walls[names[0]])
    for name in names:
        wall = statistics.median(walls[name])
        print(f"| {name} | {wall:.1f} | {', '.join(f'{w:.1f}' for w in walls[name])} | {positions[name]:,} | "
              f"{100 * real / positions[name]:.1f}% | {base / wall:.2f}x |")
    old, new = results[names[0]][1], results[names[2]][1]
    same_order = sum(results[names[1]][1][k] != v for k, v in old.items())
    print(f"\nanswers that differ between today's evaluate and the new one in dataset order: {same_order} (must be 0)")
    changed = [row for row in dev_rows if old[row["id"]] != new[row["id"]]]
    order = length_order(lengths)
    start_old, end_old = captured[names[0]].predictions[:2]
    start_new, end_new = (np.empty_like(a) for a in captured[names[2]].predictions[:2])
    start_new[order], end_new[order] = captured[names[2]].predictions[0], captured[names[2]].predictions[1]
    change = np.array([max(float(np.abs(start_old[f][:n] - start_new[f][:n]).max()),
                           float(np.abs(end_old[f][:n] - end_new[f][:n]).max())) for f, n in enumerate(lengths)])
    print(f"\nwindows whose logits are not bit-identical between the two orders: {int((change > 0).sum()):,} of "
          f"{len(change):,}; largest change {change.max():.2e}, median of the changed {np.median(change[change > 0]) if (change > 0).any() else 0:.2e}")
    print(f"answers that differ between the two orders: {len(changed)} of {len(dev_rows):,}")
    if changed:
        by_example = {}
        for f, ex in enumerate(features["example_index"]):
            by_example.setdefault(ex, []).append(f)
        index = {row["id"]: i for i, row in enumerate(dev_rows)}
        for row in changed[:args.show]:
            fs = by_example[index[row["id"]]]
            offsets = [features[f]["offset_mapping"] for f in fs]

            def best(start, end):
                return decode_answer([(start[f], end[f], o) for f, o in zip(fs, offsets)], row["context"],
                                     n_best=settings.n_best_size, max_answer_length=settings.max_answer_length)

            a, b = best(start_old, end_old), best(start_new, end_new)
            delta = max(float(np.abs(start_old[f][:lengths[f]] - start_new[f][:lengths[f]]).max()) for f in fs)
            print(f"  {row['id']}: {a.text!r} (score {a.score:.6f}) -> {b.text!r} (score {b.score:.6f}); "
                  f"largest logit change {delta:.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="prep,train,eval", help="comma-separated sections: prep, train, eval")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--prep-rows", type=int, default=0, help="train-sample rows for (a); 0 = all")
    parser.add_argument("--prep-rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2000, help="train-sample rows for (b)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--rounds", type=int, default=2, help="training pairs per variant (variant and CPU default)")
    parser.add_argument("--skip", type=int, default=3, help="steps left out of the steady state (warm-up, compilation)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed job-recipe steps before measuring")
    parser.add_argument("--eval-rows", type=int, default=0, help="dev-sample rows for (c); 0 = all")
    parser.add_argument("--eval-train-steps", type=int, default=60, help="fine-tuning steps before (c)")
    parser.add_argument("--eval-rounds", type=int, default=1, help="each round evaluates both ways")
    parser.add_argument("--show", type=int, default=20, help="changed answers to print in (c)")
    args = parser.parse_args()
    sections = set(args.only.split(","))

    train_path, dev_path = data_file(TRAIN_FILE), data_file(DEV_FILE)
    header("bench/speed.py: preprocessing, training switches and evaluation on CPU")
    quiet()
    from transformers import AutoTokenizer

    train_rows = read_rows(train_path)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    if "prep" in sections:
        bench_preprocessing(tokenizer, train_rows[:args.prep_rows or None], args)
    if "train" in sections:
        bench_optimizer_step()
        bench_training(tokenizer, train_rows[:args.rows], args)
    if "eval" in sections:
        bench_eval(tokenizer, train_rows, read_rows(dev_path, args.eval_rows or None), args)
    print(f"\nload average at the end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
