"""Preprocessing and training throughput of the job's recipe against the tokenizer alone / the tutorial recipe.

(a) Preprocessing, examples/s: the job's ``train_features`` (tokenize + label every window) against the
    bare tokenizer call with the same arguments (truncation="only_second", max_length, stride,
    overflowing tokens, offsets; the same 1,000-row chunks), interleaved A B B A ... on the same rows.
(b) Training, real (non-pad) tokens/s, same model (MiniLM + seeded fresh QA head), same rows, same
    number of optimizer steps and batch size, fp32 on CPU, the real ``Trainer`` for both, wall time of
    ``trainer.train()``:
    - job recipe: ``train_features`` windows (stride, unpadded), ``job.train.training_arguments`` +
      ``build_trainer`` (DataCollatorWithPadding per batch, group_by_length sampler);
    - tutorial recipe: one window per example (truncation only, no stride), every window padded to
      max_length (padding="max_length"), default collator, random sampler.
    Real tokens are counted from the attention mask the model actually receives (a forward pre-hook),
    so the count is right whatever the sampler picks.

Usage: python bench/speed.py [--rows 2000] [--steps 20] [--batch 8] [--rounds 1] [--prep-rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
from _common import TRAIN_FILE, data_file, header, minilm_path, read_rows


def quiet() -> None:
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


# --- (a) preprocessing ---------------------------------------------------------------------------

def tokenizer_alone(tokenizer, rows, max_length, stride) -> int:
    from job.features import CHUNK

    windows = 0
    for begin in range(0, len(rows), CHUNK):
        chunk = rows[begin:begin + CHUNK]
        enc = tokenizer([r["question"].lstrip() for r in chunk], [r["context"] for r in chunk],
                        truncation="only_second", max_length=max_length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
        windows += len(enc["input_ids"])
    return windows


def bench_preprocessing(tokenizer, rows, args) -> None:
    from job.features import train_features

    runs = {"job train_features": [], "tokenizer alone": []}
    windows = {}
    order = []
    for r in range(args.prep_rounds):  # A B B A A B ...: a drifting background load hits both alike
        order += ["job train_features", "tokenizer alone"] if r % 2 == 0 else ["tokenizer alone", "job train_features"]
    for name in order:
        t0 = time.perf_counter()
        if name == "tokenizer alone":
            windows[name] = tokenizer_alone(tokenizer, rows, args.max_length, args.stride)
        else:
            windows[name] = len(train_features(tokenizer, rows, args.max_length, args.stride)["input_ids"])
        runs[name].append(time.perf_counter() - t0)
    print(f"\n(a) preprocessing, {len(rows)} rows, max_length {args.max_length}, stride {args.stride}, "
          f"{args.prep_rounds} interleaved round(s), median time:")
    rates = {}
    for name, times in runs.items():
        rates[name] = len(rows) / statistics.median(times)
        print(f"  {name:20s} {rates[name]:8,.0f} examples/s  ({windows[name]} windows; runs "
              + ", ".join(f"{t:.2f}s" for t in times) + ")")
    print(f"  ratio job / tokenizer alone: {rates['job train_features'] / rates['tokenizer alone']:.2f} "
          f"(the job's labelling and column copying cost {100 * (1 - rates['job train_features'] / rates['tokenizer alone']):.0f}% "
          "of the tokenizer-alone rate)")


# --- (b) training ----------------------------------------------------------------------------------

def tutorial_features(tokenizer, rows, max_length) -> dict[str, list]:
    """The usual tutorial preprocessing: one window per example, padded to max_length, no stride."""
    from job.features import label_window

    enc = tokenizer([r["question"].lstrip() for r in rows], [r["context"] for r in rows], truncation="only_second",
                    max_length=max_length, padding="max_length", return_offsets_mapping=True)
    cols = {name: enc[name] for name in tokenizer.model_input_names}
    cols["start_positions"], cols["end_positions"] = [], []
    for i, row in enumerate(rows):
        a_s = row["answers"]["answer_start"][0]
        s, e = label_window(enc["offset_mapping"][i], enc.sequence_ids(i), a_s, a_s + len(row["answers"]["text"][0]))
        cols["start_positions"].append(s)
        cols["end_positions"].append(e)
    return cols


class TokenCounter:
    """Counts what the model is fed: real tokens (attention mask) and all positions, per forward."""

    def __init__(self, model):
        self.real = self.total = self.forwards = 0
        self.step_times: list[float] = []
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if ids is not None:
            self.total += ids.numel()
            self.real += int(mask.sum()) if mask is not None else ids.numel()
            self.forwards += 1

    def remove(self):
        self._handle.remove()


def make_step_timer(counter: TokenCounter):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            counter.step_times.append(time.perf_counter())

    return StepTimer()


def train_once(recipe: str, rows, windows_job, windows_tut, args, tmp: Path) -> dict:
    import datasets
    from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, Trainer, TrainingArguments,
                              default_data_collator, set_seed)
    from transformers.trainer_callback import PrinterCallback

    from job.settings import load_settings
    from job.train import build_trainer, training_arguments

    model_path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    set_seed(42)  # same fresh QA head for both recipes
    model = AutoModelForQuestionAnswering.from_pretrained(model_path)
    counter = TokenCounter(model)
    timer = make_step_timer(counter)
    out = tmp / f"{recipe}-{time.monotonic_ns()}"
    if recipe == "job":
        settings = load_settings({
            "QA_MODEL_NAME": model_path, "QA_WORK_DIR": str(tmp), "QA_BATCH_SIZE": str(args.batch),
            "QA_MAX_STEPS": str(args.steps), "QA_LEARNING_RATE": str(args.lr), "QA_PRECISION": "fp32",
            "QA_DATALOADER_WORKERS": "0", "QA_LOGGING_STEPS": str(10 * args.steps), "QA_SEED": "42",
        })
        trainer = build_trainer(settings, model, tokenizer, datasets.Dataset.from_dict(windows_job),
                                training_arguments(settings, out, "fp32"), [timer])
    else:
        targs = TrainingArguments(
            output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
            weight_decay=0.01, seed=42, use_cpu=True, dataloader_num_workers=0, save_strategy="no",
            logging_steps=10 * args.steps, report_to="none", disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=datasets.Dataset.from_dict(windows_tut),
                          data_collator=default_data_collator, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # the job removes it too; it prints raw dicts
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    counter.remove()
    steps = trainer.state.global_step
    # steady state: from the end of step 1 to the end of the last step (first-step warm-up excluded)
    steady = counter.step_times[-1] - counter.step_times[0] if len(counter.step_times) > 1 else wall
    per_fwd = counter.real / max(counter.forwards, 1)
    steady_real = counter.real - per_fwd  # tokens of steps 2..N, approximated by the mean per step
    return {"recipe": recipe, "wall": wall, "steps": steps, "real": counter.real, "total": counter.total,
            "rate": counter.real / wall, "steady_rate": steady_real / steady if steady > 0 else float("nan"),
            "pad_share": 1 - counter.real / max(counter.total, 1)}


def epoch_token_shares(windows_job, windows_tut, batch: int, seed: int = 42) -> tuple[float, float, float]:
    """Real/total token share over a whole epoch: the job's grouped batches vs the tutorial's fixed padding."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [len(x) for x in windows_job["input_ids"]]
    g = torch.Generator()
    g.manual_seed(seed)
    order = list(LengthGroupedSampler(batch, lengths=lengths, generator=g))
    real = sum(lengths)
    padded = sum(max(lengths[i] for i in order[b:b + batch]) * len(order[b:b + batch]) for b in range(0, len(order), batch))
    tut_real = sum(sum(m) for m in windows_tut["attention_mask"])
    tut_total = sum(len(m) for m in windows_tut["attention_mask"])
    return real / padded, tut_real / tut_total, real / len(lengths)


def bench_training(tokenizer, rows, args) -> None:
    from job.features import train_features

    windows_job = train_features(tokenizer, rows, args.max_length, args.stride)
    windows_tut = tutorial_features(tokenizer, rows, args.max_length)
    job_share, tut_share, mean_len = epoch_token_shares(windows_job, windows_tut, args.batch)
    print(f"\n(b) training, MiniLM fp32 on CPU, {args.steps} optimizer steps x batch {args.batch}, "
          f"{args.rounds} interleaved round(s) (job, tutorial, tutorial, job, ...)")
    print(f"  data: {len(rows)} rows -> job {len(windows_job['input_ids'])} windows (mean {mean_len:.0f} tokens), "
          f"tutorial {len(windows_tut['input_ids'])} windows of {args.max_length}")
    print(f"  whole-epoch real-token share of what is computed: job {100 * job_share:.1f}% "
          f"(group_by_length, per-batch padding), tutorial {100 * tut_share:.1f}% (pad to {args.max_length})")
    results = {"job": [], "tutorial": []}
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        if args.warmup_steps:  # one-time costs (imports, thread pools, allocator) land on neither recipe
            warm = argparse.Namespace(**{**vars(args), "steps": args.warmup_steps})
            train_once("job", rows, windows_job, windows_tut, warm, Path(tmp))
        for r in range(args.rounds):
            for recipe in (("job", "tutorial") if r % 2 == 0 else ("tutorial", "job")) * 1:
                load = os.getloadavg()[0]
                res = train_once(recipe, rows, windows_job, windows_tut, args, Path(tmp))
                results[recipe].append(res)
                print(f"  [load {load:4.2f}] {recipe:8s} train() {res['wall']:6.1f} s, {res['steps']} steps, real tokens {res['real']:7d} "
                      f"of {res['total']:7d} computed ({100 * res['pad_share']:.0f}% padding): "
                      f"{res['rate']:7.0f} real tok/s (steady state {res['steady_rate']:7.0f})", flush=True)
    job = statistics.median(r["rate"] for r in results["job"])
    tut = statistics.median(r["rate"] for r in results["tutorial"])
    job_s = statistics.median(r["steady_rate"] for r in results["job"])
    tut_s = statistics.median(r["steady_rate"] for r in results["tutorial"])
    print(f"  median real tokens/s: job {job:.0f}, tutorial {tut:.0f} -> ratio job/tutorial {job / tut:.2f}x "
          f"(steady state {job_s / tut_s:.2f}x)")
    best_job = max(r["rate"] for r in results["job"])
    best_tut = max(r["rate"] for r in results["tutorial"])
    print(f"  best run (least disturbed by other load) real tokens/s: job {best_job:.0f}, tutorial {best_tut:.0f} "
          f"-> ratio {best_job / best_tut:.2f}x")
    print(f"  expected from the token counts alone if time ~ computed tokens: "
          f"{(results['job'][0]['real'] / results['job'][0]['total']) / (results['tutorial'][0]['real'] / results['tutorial'][0]['total']):.2f}x "
          f"on these steps; the job's first {args.steps} group_by_length batches are the longest of a 50-batch "
          f"mega-batch ({results['job'][0]['real'] / (args.steps * args.batch):.0f} real tokens per window here vs "
          f"{mean_len:.0f} over the epoch)")
    wall_job = statistics.median(r["wall"] for r in results["job"])
    wall_tut = statistics.median(r["wall"] for r in results["tutorial"])
    print(f"  median seconds per optimizer step: job {wall_job / args.steps:.2f}, tutorial {wall_tut / args.steps:.2f} "
          f"(the job's steps carry {results['job'][0]['real'] / max(results['tutorial'][0]['real'], 1):.2f}x the real "
          f"tokens of the tutorial's in this sample)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--prep-rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--rounds", type=int, default=3, help="training rounds; each runs both recipes")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed job-recipe steps before measuring")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()

    path = data_file(TRAIN_FILE)
    header("bench/speed.py: job recipe vs tokenizer alone / tutorial recipe")
    quiet()
    from transformers import AutoTokenizer

    rows = read_rows(path, args.rows)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    bench_preprocessing(tokenizer, rows, args)
    if not args.skip_training:
        bench_training(tokenizer, rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
