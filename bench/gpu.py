"""The job's recipe against the tutorial's on one GPU: how close does the job come to the card's limit?

One prepared script for the day a GPU machine is available (no hub there): a
distilbert-base-uncased-shaped model built from its config (random weights: speed does not
depend on them) with the uncased WordPiece vocabulary of the MiniLM package, trained on real
SQuAD rows from ``../shared/data``. On the same card, in one run, in this order (the cheapest
and most needed first, so that a run cut short still brings back the rows that matter):

1. the job's recipe without torch.compile (``QA_COMPILE=false``): no compile time;
2. the job's recipe exactly as ``python -m job`` builds it with default settings (``auto``
   precision, TF32, fused AdamW, SDPA, torch.compile, pinned memory, DataLoader workers, stride
   windows padded per batch in multiples of 8, group_by_length): a cold compile first;
3. the largest batch of 384-token windows the job's recipe fits (eager, doubling then bisecting);
4. the tutorial recipe: one window per example padded to 384, fp32, no stride, random order;
5. evaluation of dev questions in dataset order against longest first (the eager-trained model).

For each training row: real (non-pad) tokens/s and windows/s in steady state, model FLOPs
utilisation against the card's dense bf16 peak, peak memory, time to compile, and the projected
wall time of 2 epochs over full SQuAD v1.1 (88,524 windows at 384/128; 87,599 examples for the
tutorial). For both job rows, the sync list: every host-device sync torch reports with
``torch.cuda.set_sync_debug_mode("warn")`` over five steps of the warm-up (outside the timed
steady state), by the line that caused it. The table is written as JSON and Markdown after every
phase (``"complete": false`` until the last). A deadline (``--budget``, default 420 s) shortens or
skips the later phases, with a line for each.

``--smoke`` runs every code path on CPU with a small model in under 3 minutes (compile through
the cheap ``aot_eager`` backend, bf16 on CPU, a capped batch search, one simulated sync report per
recorded step): same table, no GPU numbers.

Usage: python bench/gpu.py [--smoke] [--out DIR] [--rows N] [--steps N] [--peak-tflops X]
Exit codes: 0 done, 4 shared data missing, 5 MiniLM package missing, 6 no CUDA device (without --smoke).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import DEV_FILE, TRAIN_FILE, data_file, header, machine, minilm_path, read_rows, versions
from _training import Steps, SyncList, job_trainer, timed_train, tutorial_features, tutorial_trainer

EXIT_NO_GPU = 6
FULL_SQUAD_WINDOWS = 88_524  # SQuAD v1.1 train at 384/128, uncased vocabulary (published run_qa counts)
FULL_SQUAD_EXAMPLES = 87_599
EPOCHS = 2
# Dense (no sparsity) bf16 tensor-core peaks from the vendor data sheets, TFLOPS, keyed by the
# words of the device name: "L4" is not "L40", "A10" is not "A10G", "H200 NVL" is not "H200".
# The longest key that matches wins. Anything else: pass --peak-tflops.
BF16_PEAK_TFLOPS = {
    ("H100", "PCIe"): 756.0, ("H100", "NVL"): 835.0, ("H100",): 989.4,
    ("H200", "NVL"): 835.0, ("H200",): 989.4, ("GH200",): 989.4,
    ("B200",): 2250.0, ("A100",): 312.0,
    ("L40S",): 362.0, ("L40",): 181.0, ("L4",): 121.0,
    # A10G (AWS G5): no NVIDIA data sheet; 70 is the figure cloud documentation gives, about half
    # the A10's 125 (another clock and tensor-core rate). Pass --peak-tflops if yours says otherwise.
    ("A10G",): 70.0, ("A10",): 125.0,
}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    words = [w.upper() for w in re.split(r"[^0-9A-Za-z]+", name) if w]
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        wanted = [w.upper() for w in key]
        if any(words[i:i + len(wanted)] == wanted for i in range(len(words))):
            return BF16_PEAK_TFLOPS[key]
    return None


def build_model_dir(dest: Path, smoke: bool) -> Path:
    """distilbert-base-uncased's shape (DistilBertConfig defaults) or a small one, with the uncased vocabulary."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForQuestionAnswering, set_seed

    set_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # DistilBERT has no segment ids
    shape = dict(dim=64, n_layers=2, n_heads=2, hidden_dim=128) if smoke else {}
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, **shape)
    DistilBertForQuestionAnswering(config).save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest


def model_flops(model) -> tuple[int, int, int]:
    """(N, layers, width): N = parameters doing matmuls (embeddings are look-ups, not FLOPs)."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    config = model.config
    return total - embeddings, config.n_layers, config.dim


def flops_per_window(n: int, layers: int, width: int, length: float, length_sq: float) -> float:
    """Training FLOPs of one window: 6 N T for the matmuls (forward + backward) and 12 L d T^2 for
    attention scores and values (bidirectional: the whole T^2). Counted on real tokens only, so
    padding is waste, not work."""
    return 6 * n * length + 12 * layers * width * length_sq


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def reset_peak(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(cuda: bool) -> float | None:
    if not cuda:
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def largest_batch(model_dir: Path, precision: str, max_length: int, cap: int, cuda: bool, deadline: Deadline,
                  simulated_limit: int | None = None) -> dict:
    """The largest batch of full-length windows for which one eager training step (forward,
    backward, fused AdamW) fits in memory: double until it fails, then bisect.

    ``simulated_limit`` (smoke test only: a CPU has no out-of-memory error to catch) makes every
    larger batch fail, so the bisection runs too."""
    import torch
    from transformers import AutoModelForQuestionAnswering

    device = "cuda" if cuda else "cpu"
    model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else None

    def fits(batch: int) -> bool:
        if simulated_limit is not None and batch > simulated_limit:
            return False
        ids = torch.randint(1000, 2000, (batch, max_length), device=device)
        labels = torch.zeros(batch, dtype=torch.long, device=device)
        try:
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), start_positions=labels,
                             end_positions=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()

    good, bad, probes = 0, None, 0
    batch = 8
    while batch <= cap and deadline.left() > 20:
        probes += 1
        if not fits(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    while bad is not None and bad - good > max(good // 16, 1) and deadline.left() > 20:
        middle = (good + bad) // 2
        probes += 1
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    model = optimizer = None  # the closure holds them: free the GPU memory before the next measurement
    reset_peak(cuda)
    return {"largest_batch": good, "first_failing": bad, "capped": bad is None, "probes": probes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, small model, every code path, under 3 minutes")
    parser.add_argument("--out", type=Path, help="folder for gpu.json / gpu.md (default: bench/results, or a temp folder with --smoke)")
    parser.add_argument("--rows", type=int, help="train-sample rows (default: all 15,304; 120 with --smoke)")
    parser.add_argument("--eval-rows", type=int, help="dev-sample rows for the evaluation rows (default: all; 40 with --smoke)")
    parser.add_argument("--steps", type=int, help="job-recipe steps (default 400; 12 with --smoke)")
    parser.add_argument("--tutorial-steps", type=int, help="tutorial-recipe steps (default 150; 6 with --smoke)")
    parser.add_argument("--skip", type=int, help="steps left out of the steady state (default 20; 3 with --smoke)")
    parser.add_argument("--batch", type=int, default=12, help="windows per step for both recipes (QA_BATCH_SIZE's default)")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--batch-cap", type=int, help="largest batch tried (default 16384; 32 with --smoke)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if its name is not in the table")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 420; 150 with --smoke)")
    args = parser.parse_args()
    smoke = args.smoke
    # smoke: 12 steps run past the epoch's last, partial batch (125 windows / 12), a new batch size
    defaults = dict(rows=120, eval_rows=40, steps=12, tutorial_steps=6, skip=3, batch_cap=32, budget=150.0) if smoke else \
        dict(rows=0, eval_rows=0, steps=400, tutorial_steps=150, skip=20, batch_cap=16384, budget=420.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    started = time.monotonic()
    deadline = Deadline(args.budget)

    train_path, dev_path = data_file(TRAIN_FILE), data_file(DEV_FILE)
    minilm_path()
    import torch

    cuda = torch.cuda.is_available() and not smoke
    if not cuda and not smoke:
        print("bench: no CUDA device; run with --smoke to check the script on CPU", file=sys.stderr)
        return EXIT_NO_GPU
    header("bench/gpu.py: the job's recipe against the tutorial's" + (" (--smoke: CPU, small model)" if smoke else ""))
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    from job.preprocess import feature_dataset, preprocess_workers
    from job.settings import load_settings
    from job.train import load_model, resolve_precision

    device_name = torch.cuda.get_device_name(0) if cuda else "cpu (smoke)"
    peak = peak_tflops(device_name, args.peak_tflops) if cuda else args.peak_tflops
    precision = resolve_precision("auto", cuda, cuda and torch.cuda.is_bf16_supported(including_emulation=False))
    if smoke:
        precision = "bf16"  # the CPU bf16 path runs too
        peak = peak or 1.0  # a nominal 1 TFLOPS, so the MFU arithmetic runs; meaningless on a CPU
    print(f"device: {device_name}, bf16 peak {peak or 'unknown'} TFLOPS, job precision {precision}")

    out_dir = args.out or (Path(tempfile.gettempdir()) / "qa-bench-gpu-smoke" if smoke else _common.ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_rows(train_path, args.rows or None)
    dev_rows = read_rows(dev_path, args.eval_rows or None)
    report = {"script": "bench/gpu.py", "smoke": smoke, "complete": False, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "machine": machine(), "versions": versions(), "device": device_name, "bf16_peak_tflops": peak,
              "rows": len(rows), "windows": None, "batch": args.batch, "max_length": args.max_length,
              "stride": args.stride, "results": [], "syncs": {}, "notes": [], "skipped": [], "elapsed_s": None}
    name = "gpu-smoke" if smoke else "gpu"

    def save() -> None:
        """gpu.json and gpu.md as they stand: written after every phase, so a run stopped at its limit leaves them."""
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / f"{name}.md").write_text(markdown(report))

    def skip(phase: str, needs: float) -> bool:
        if deadline.left() >= needs:
            return False
        report["skipped"].append(f"{phase}: {deadline.left():.0f} s of the budget left, {needs:.0f} s needed")
        print(f"skipped {report['skipped'][-1]}", flush=True)
        return True

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        tmp = Path(tmp)
        model_dir = build_model_dir(tmp / "model", smoke)
        tokenizer, model = load_model(str(model_dir), 42)
        shape = model_flops(model)
        workers = preprocess_workers(load_settings({}))
        t0 = time.perf_counter()
        windows = feature_dataset("train", tokenizer, rows, args.max_length, args.stride, workers)
        prep_s = time.perf_counter() - t0
        lengths = [len(x) for x in windows["input_ids"]]
        mean_len, mean_sq = statistics.fmean(lengths), statistics.fmean(x * x for x in lengths)
        report["windows"] = len(windows)
        print(f"data: {len(rows):,} rows -> {len(windows):,} windows (mean {mean_len:.0f} real tokens) in {prep_s:.1f} s "
              f"with {workers} preprocessing workers; model {shape[0] / 1e6:.1f}M matmul parameters, {shape[1]} layers, "
              f"width {shape[2]}", flush=True)
        env = {"QA_MODEL_NAME": str(model_dir), "QA_BATCH_SIZE": str(args.batch), "QA_MAX_STEPS": str(args.steps),
               "QA_PRECISION": precision, "QA_LEARNING_RATE": "3e-5"}
        if smoke:
            env.update(QA_DEVICE="cpu")  # the CPU even where a GPU is there
        job = dict(tokenizer=tokenizer, windows=windows, tmp=tmp, env=env, precision=precision, cuda=cuda, smoke=smoke,
                   stats=(mean_len, mean_sq, shape, peak))

        # 1. the job's recipe without torch.compile: the row that needs no compile time, so it comes first
        trained = job_row(report, "job, eager", model, {"QA_COMPILE": "false"}, args.steps, args, keep=True, **job)
        del model
        save()

        # 2. the job's recipe as the job runs it on a GPU (QA_COMPILE=auto compiles there): a cold compile first
        if not skip("job, compiled", 60):
            _, model = load_model(str(model_dir), 42)
            steps = args.steps if deadline.left() > (60 if smoke else 150) else min(args.steps, max(args.skip + 20, 40))
            job_row(report, "job", model, {"QA_COMPILE": "true" if smoke else "auto"}, steps, args, **job)
            del model
            save()
        torch._dynamo.reset()  # compiled graphs hold on to memory the next phases should have
        gc.collect()
        reset_peak(cuda)

        # 3. the largest batch of full-length windows one eager step fits
        if not skip("largest batch", 30):
            fit = largest_batch(model_dir, precision, args.max_length, args.batch_cap, cuda, deadline,
                                simulated_limit=20 if smoke else None)
            for r in report["results"]:
                if r["recipe"].startswith("job"):
                    r["largest_batch"] = fit["largest_batch"]
            report["notes"].append(f"largest batch of {args.max_length}-token windows for one eager {precision} training step: "
                                   f"{fit['largest_batch']}{' (the cap; nothing failed)' if fit['capped'] else ''}, "
                                   f"first failing {fit['first_failing']}, {fit['probes']} probes")
            print(report["notes"][-1], flush=True)
            save()

        # 4. the tutorial recipe on the same card
        if not skip("tutorial", 45):
            tut_cols = tutorial_features(tokenizer, rows, args.max_length)
            tut_lengths = [sum(m) for m in tut_cols["attention_mask"]]
            tut_mean, tut_sq = statistics.fmean(tut_lengths), statistics.fmean(x * x for x in tut_lengths)
            steps = Steps()
            _, model = load_model(str(model_dir), 42)
            tut_steps = args.tutorial_steps if deadline.left() > 90 else max(args.skip + 5, 10)
            trainer = tutorial_trainer(model, tokenizer, datasets.Dataset.from_dict(tut_cols), tmp, tut_steps, args.batch,
                                       3e-5, cuda, [steps.callback()])
            reset_peak(cuda)
            run = timed_train("tutorial", trainer, steps, args.batch, min(args.skip, 5))
            report["results"].append(row("tutorial", trainer.args, "fp32", run, peak_gib(cuda), {}, tut_mean, tut_sq, shape,
                                         peak, FULL_SQUAD_EXAMPLES))
            print_row(report["results"][-1])
            del trainer, model
            gc.collect()
            reset_peak(cuda)
            save()

        # 5. evaluation of the eager-trained model: dataset order against longest first (predict + decode)
        if not skip("evaluation order", 70 if not smoke else 20):
            evaluation_row(report, model_dir, trained, dev_rows, args, workers, deadline, **job)
            save()
    if smoke:
        report["notes"].append("--smoke: CPU, small model, compile through aot_eager, bf16 on CPU, a nominal 1 TFLOPS peak, a "
                               "simulated memory limit of 20 windows and one simulated sync report per recorded step: "
                               "checks the script, not the hardware")
    rates = {r["recipe"]: r["tokens_per_s"] for r in report["results"]}
    for a, b in (("job", "job, eager"), ("job", "tutorial"), ("job, eager", "tutorial")):
        if rates.get(a) and rates.get(b):
            report["notes"].append(f"{a} / {b} real tokens/s: {rates[a] / rates[b]:.2f}x")
    report["complete"] = True
    save()
    print(f"\n{markdown(report)}\nwritten: {out_dir / (name + '.json')} and {name}.md ({report['elapsed_s']} s)")
    return 0


def job_row(report: dict, recipe: str, model, settings: dict, steps: int, args, keep: bool = False, *, tokenizer, windows,
            tmp, env, precision, cuda, smoke, stats) -> dict | None:
    """One row of the job's recipe (``settings`` on top of ``env``) with its sync list; ``keep``: the trained weights,
    copied to the CPU, returned."""
    import torch

    from job.runtime.recipe import pad_to_multiple_of
    from job.train import compile_stats

    def smoke_backend(trainer_args):
        if smoke and trainer_args.torch_compile:
            trainer_args.torch_compile_backend = "aot_eager"  # dynamo + autograd graphs, no C++ build

    mean_len, mean_sq, shape, peak = stats
    torch._dynamo.reset()
    marks = Steps()
    # a few steps inside the warm-up that the steady state leaves out: the debug mode costs time
    syncs = SyncList(max(args.skip - 5, 1), max(args.skip - 1, 1), cuda, simulate=smoke)
    trainer, _ = job_trainer(model, tokenizer, windows, tmp, {**env, **settings, "QA_MAX_STEPS": str(steps)}, precision,
                             [marks.callback(), syncs.callback()], args_hook=smoke_backend)
    reset_peak(cuda)
    run = timed_train(recipe, trainer, marks, args.batch, args.skip)
    comp = compile_stats() if trainer.args.torch_compile else {}
    if comp:
        bucket = pad_to_multiple_of(cuda, True)
        shapes = len({-(-n // bucket) * bucket for n in (len(x) for x in windows["input_ids"])})
        report["notes"].append(f"torch.compile: {comp['graphs']} graphs ({comp['graph_breaks']} graph breaks) for {run.steps} "
                               f"steps, while the windows allow {shapes} distinct batch lengths (multiples of {bucket}): the "
                               "length is compiled as a dynamic dimension after the second shape, not once per length")
    report["syncs"][recipe] = syncs.summary()
    report["results"].append(row(recipe, trainer.args, precision, run, peak_gib(cuda), comp, mean_len, mean_sq, shape, peak,
                                 FULL_SQUAD_WINDOWS))
    print_row(report["results"][-1])
    print(f"  syncs over steps {syncs.first}-{syncs.last}: {report['syncs'][recipe]}", flush=True)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()} if keep else None
    del trainer
    gc.collect()
    reset_peak(cuda)
    return weights


def evaluation_row(report: dict, model_dir: Path, weights: dict, dev_rows, args, workers: int, deadline: Deadline, *,
                   tokenizer, windows, tmp, env, precision, cuda, smoke, stats) -> None:
    """The eager-trained model scored on the dev rows in dataset order and longest first, each timed (the faster of
    two tries while the budget allows), and how many answers differ."""
    from job.evaluate import evaluate
    from job.preprocess import feature_dataset
    from job.settings import load_settings
    from job.train import load_model

    _, model = load_model(str(model_dir), 42)
    model.load_state_dict(weights)
    trainer, _ = job_trainer(model, tokenizer, windows, tmp, {**env, "QA_COMPILE": "false"}, precision)
    # the job's eval batch; smaller in the smoke test, so its few windows still make several batches
    settings = load_settings({"QA_MODEL_NAME": str(model_dir), "QA_WORK_DIR": str(tmp),
                              **({"QA_EVAL_BATCH_SIZE": "8", "QA_DEVICE": "cpu"} if smoke else {})})
    features = feature_dataset("eval", tokenizer, dev_rows, args.max_length, args.stride, workers)
    evals = {}
    for attempt, sorted_ in enumerate((False, True, False, True)):
        if attempt >= 2 and deadline.left() < 2 * max(evals[False] + evals[True]) + 10:
            break
        t = time.perf_counter()
        _, answers = evaluate(trainer, features, dev_rows, settings, length_sorted=sorted_)
        evals.setdefault(sorted_, []).append(time.perf_counter() - t)
        evals.setdefault(("answers", sorted_), answers)
    changed = sum(evals[("answers", False)][k] != v for k, v in evals[("answers", True)].items())
    report["notes"].append(f"evaluation of {len(dev_rows):,} dev questions ({len(features):,} windows, eval batch "
                           f"{settings.eval_batch_size}, eager): dataset order {min(evals[False]):.2f} s, longest first "
                           f"{min(evals[True]):.2f} s ({min(evals[False]) / min(evals[True]):.2f}x, the faster of "
                           f"{len(evals[True])}), {changed} answers differ")
    print(report["notes"][-1], flush=True)
    del trainer, model
    gc.collect()
    reset_peak(cuda)


def row(recipe, trainer_args, precision, run, peak_mem, comp, mean_len, mean_sq, shape, peak, full_windows) -> dict:
    """One table row. FLOPs and the projection go by real tokens, with the sample's window-length
    distribution standing for full SQuAD's: the first steps' windows need not be typical."""
    n, layers, width = shape
    flops_per_token = flops_per_window(n, layers, width, mean_len, mean_sq) / mean_len
    achieved = run.steady_tokens_per_s * flops_per_token  # model FLOP/s on real tokens
    first_and_compile = run.first_steps_s
    rate = run.steady_tokens_per_s
    projected = EPOCHS * full_windows * mean_len / rate + first_and_compile if rate > 0 else None
    return {
        "recipe": recipe, "precision": precision, "compiled": bool(trainer_args.torch_compile),
        "tf32": bool(trainer_args.tf32), "optim": str(trainer_args.optim), "batch": run.batch, "steps": run.steps,
        "tokens_per_s": round(run.steady_tokens_per_s, 1), "windows_per_s": round(run.steady_windows_per_s, 2),
        "model_tflops_per_s": round(achieved / 1e12, 3),
        "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
        "peak_memory_gib": round(peak_mem, 2) if peak_mem is not None else None,
        "first_steps_s": round(first_and_compile, 1), "compile_stats": comp or None,
        "projected_2_epochs_min": round(projected / 60, 1) if projected else None,
        "largest_batch": None,
    }


def print_row(r: dict) -> None:
    print(f"  {r['recipe']:9s} {r['tokens_per_s']:>10,.0f} real tok/s, {r['windows_per_s']:8.1f} windows/s, "
          f"MFU {r['mfu'] if r['mfu'] is not None else 'n/a'}, peak {r['peak_memory_gib']} GiB, "
          f"first steps {r['first_steps_s']} s, compile {r['compile_stats']}, 2 epochs {r['projected_2_epochs_min']} min", flush=True)


def markdown(report: dict) -> str:
    def cell(value, fmt="{}"):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)

    state = "" if report["complete"] else " (partial: the run stopped before its last phase)"
    lines = [f"# bench/gpu.py{' --smoke' if report['smoke'] else ''}{state}", "",
             f"{report['date']}; {report['device']} (bf16 peak {cell(report['bf16_peak_tflops'])} TFLOPS); "
             f"{report['machine']}; {report['versions']}; {report['rows']:,} train-sample rows, "
             f"{report['max_length']}/{report['stride']}, batch {report['batch']}; {report['elapsed_s']} s in all.", "",
             "| recipe | precision | compile | real tokens/s | windows/s | MFU | peak memory GiB | first steps (incl. compile) s | compile | projected 2 epochs, full SQuAD | largest batch |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in report["results"]:
        comp = r["compile_stats"]
        comp_text = f"{comp.get('graphs')} graphs, {comp.get('compile_seconds')} s" if comp else "-"
        lines.append(f"| {r['recipe']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} | {r['tokens_per_s']:,.0f} | "
                     f"{r['windows_per_s']:,.1f} | {cell(r['mfu'], '{:.1%}')} | {cell(r['peak_memory_gib'])} | "
                     f"{r['first_steps_s']} | {comp_text} | {cell(r['projected_2_epochs_min'], '{} min')} | "
                     f"{cell(r['largest_batch'])} |")
    lines += [""] + [f"- {note}" for note in report["notes"]] + [f"- skipped {s}" for s in report["skipped"]]
    for recipe, syncs in report["syncs"].items():
        kind = "simulated (no CUDA)" if syncs["simulated"] else "recorded" if syncs["cuda"] else "not recorded (no CUDA)"
        lines += ["", f"Host-device syncs, {recipe}, steps {syncs['steps'][0]}-{syncs['steps'][1]} "
                      f"(torch.cuda.set_sync_debug_mode(\"warn\"), {kind}): {syncs['syncs']} in {syncs['recorded_steps']} steps", ""]
        lines += [f"- {site['count']} x {site['where']}" for site in syncs["sites"]] or ["- none"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
