"""Training measurements shared by speed.py (CPU) and gpu.py: the job's recipe and the tutorial's, timed step by step.

Both recipes run the real ``Trainer``. The job's is built exactly as the job builds it
(``load_settings`` -> ``training_arguments`` -> ``build_trainer``), with settings given as ``QA_*``
variables; the tutorial's is the usual one: one window per example padded to max_length, no
stride, the default collator, random order, fp32, library defaults otherwise.

Real (non-pad) tokens are counted outside the model (a forward hook would be traced by
torch.compile and break its graph) and without a host sync: each batch's attention mask is summed
on the training device as the Trainer takes it, and the running sums are read only after
training. The Trainer's own count (``include_num_input_tokens_seen``) reads it back at every step,
a sync the job does not have, which understated the job on a GPU. Steady state is measured
between step ends after ``skip`` steps, so compilation and the first-step warm-up land outside it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path


def tutorial_features(tokenizer, rows, max_length) -> dict[str, list]:
    """The usual tutorial preprocessing: one window per example, padded to max_length, no stride."""
    from job.squad.features import label_window

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


@dataclass
class Steps:
    """(seconds, real tokens so far) at the end of every optimizer step; the token counts stay on the
    device until ``marks`` is read after training."""

    _marks: list = field(default_factory=list)
    _total: object = 0  # running sum of real tokens: a tensor on the training device once counting

    def callback(self):
        from transformers import TrainerCallback

        steps = self

        class StepMarks(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                steps._marks.append((time.perf_counter(), steps._total))

        return StepMarks()

    def count_tokens(self, trainer) -> None:
        """Sum each training batch's attention mask where the batch is (no read-back, so no sync)."""
        original = trainer.training_step

        def counting(model, inputs, *args, **kwargs):
            self._total = self._total + inputs["attention_mask"].sum()
            return original(model, inputs, *args, **kwargs)

        trainer.training_step = counting

    @property
    def marks(self) -> list[tuple[float, int]]:
        return [(t, int(n)) for t, n in self._marks]


@dataclass
class Run:
    recipe: str
    wall: float  # seconds of trainer.train()
    steps: int
    batch: int
    real_tokens: int
    steady_tokens_per_s: float
    steady_windows_per_s: float
    first_steps_s: float  # start of train() to the end of step `skip`: warm-up, compilation
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.wall


def job_trainer(model, tokenizer, train_dataset, out: Path, env: dict[str, str], precision: str, callbacks=(), args_hook=None):
    """The job's Trainer for ``env`` (QA_* settings); returns (trainer, settings).

    ``args_hook`` may adjust the TrainingArguments before the Trainer reads them (the GPU smoke
    test swaps the compiler backend); nothing else differs from the job.
    """
    from job.settings import load_settings
    from job.train import build_trainer, training_arguments

    settings = load_settings({"QA_WORK_DIR": str(out), "QA_LOGGING_STEPS": "100000", **env})
    args = training_arguments(settings, out / "trainer", precision)
    if args_hook is not None:
        args_hook(args)
    return build_trainer(settings, model, tokenizer, train_dataset, args, list(callbacks)), settings


def tutorial_trainer(model, tokenizer, train_dataset, out: Path, steps: int, batch: int, lr: float, cuda: bool, callbacks=()):
    from transformers import Trainer, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    args = TrainingArguments(
        output_dir=str(out / "tutorial"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        weight_decay=0.01, seed=42, use_cpu=not cuda, dataloader_num_workers=0, save_strategy="no",
        logging_steps=100000, report_to="none", disable_tqdm=True,
        tf32=False,  # fp32 as written; and a TF32 switch left on by an earlier run in this process is undone
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=default_data_collator,
                      callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    from job.runtime.recipe import set_matmul_precision

    set_matmul_precision(False)  # the one consistent way, as the job sets it (job/runtime/recipe.py)
    return trainer


def timed_train(recipe: str, trainer, steps: Steps, batch: int, skip: int) -> Run:
    steps.count_tokens(trainer)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    marks = steps.marks
    n = len(marks)
    skip = min(skip, max(n - 2, 0))
    if n >= 2:
        (t_a, tok_a), (t_b, tok_b) = marks[skip], marks[-1]
        span = t_b - t_a
        steady_tok = (tok_b - tok_a) / span if span > 0 else float("nan")
        steady_win = (n - 1 - skip) * batch / span if span > 0 else float("nan")
    else:
        steady_tok = steady_win = float("nan")
    first = marks[skip][0] - t0 if marks else wall
    return Run(recipe, wall, n, batch, marks[-1][1] if marks else 0, steady_tok, steady_win, first)


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


SYNC_MESSAGE = "called a synchronizing CUDA operation"  # what torch's sync debug mode warns, at each sync


class SyncList:
    """Every host-device sync torch reports during training steps ``first``..``last`` (1-based), by site.

    ``torch.cuda.set_sync_debug_mode("warn")`` is switched on at the end of step ``first - 1`` and
    off at the end of step ``last``: each recorded step's batch fetch and copy, forward, backward,
    optimizer step and callbacks are inside. torch warns once per sync (a ``.item()``, a tensor
    read into Python, a blocking copy); each warning is kept with the innermost Python frame
    outside torch, and the innermost frame of all, that led to it. Without CUDA nothing can be
    recorded: ``simulate`` (``--smoke``) then warns once per recorded step from here, so the
    recording and grouping still run.
    """

    def __init__(self, first: int, last: int, cuda: bool, simulate: bool = False):
        self.first, self.last, self.cuda, self.simulate = max(first, 1), max(last, first, 1), cuda, simulate
        self.sites: dict[str, int] = {}
        self.steps = 0
        self._saved = None

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class SyncSteps(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if recorder.first == 1:
                    recorder._start()

            def on_step_end(self, args, state, control, **kwargs):
                step = state.global_step
                if recorder._saved is not None:
                    recorder.steps += 1
                    if recorder.simulate:
                        import warnings

                        warnings.warn(SYNC_MESSAGE, stacklevel=1)
                if step == recorder.first - 1:
                    recorder._start()
                elif step >= recorder.last:
                    recorder._stop()

            def on_train_end(self, args, state, control, **kwargs):
                recorder._stop()

        return SyncSteps()

    def _start(self) -> None:
        import warnings

        if self._saved is not None:
            return
        context = warnings.catch_warnings()
        context.__enter__()
        warnings.filterwarnings("always", message=SYNC_MESSAGE)  # every sync, not the first per line
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if SYNC_MESSAGE in str(message):
                self._record()
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        self._saved = context
        if self.cuda:
            import torch

            torch.cuda.set_sync_debug_mode("warn")

    def _stop(self) -> None:
        if self._saved is None:
            return
        if self.cuda:
            import torch

            torch.cuda.set_sync_debug_mode("default")
        self._saved.__exit__(None, None, None)
        self._saved = None

    def _record(self) -> None:
        import traceback

        frames = [f for f in traceback.extract_stack()[:-1]
                  if not f.filename.endswith(("warnings.py", "_training.py"))]
        if not frames:
            return
        inner = frames[-1]
        outside = next((f for f in reversed(frames) if "/torch/" not in f.filename), inner)
        site = _frame(outside) + ("" if outside is inner else f" -> {_frame(inner)}")
        self.sites[site] = self.sites.get(site, 0) + 1

    def summary(self) -> dict:
        return {"steps": [self.first, self.last], "recorded_steps": self.steps, "cuda": self.cuda,
                "simulated": self.simulate and not self.cuda, "syncs": sum(self.sites.values()),
                "sites": [{"where": w, "count": n} for w, n in sorted(self.sites.items(), key=lambda kv: -kv[1])]}


def _frame(frame) -> str:
    """``package/module.py:line (function)``: the path from its package down, whatever the install prefix."""
    path = frame.filename
    for marker in ("/site-packages/", "/dist-packages/", "/bench/", "/job/"):
        if marker in path:
            path = (marker.strip("/") + "/" if marker in ("/bench/", "/job/") else "") + path.split(marker, 1)[1]
            break
    return f"{path}:{frame.lineno} ({frame.name})"
