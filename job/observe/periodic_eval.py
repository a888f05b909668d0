"""EM/F1 while training: every ``QA_EVAL_STEPS`` steps, and once before the first step (the untrained head).

Scored by ``job.evaluate.evaluate``, the final evaluation's own code, on the first
``QA_EVAL_SAMPLES_DURING_TRAINING`` eval examples. Three promises:

- The training trajectory does not change. Prediction draws from the global RNGs (a DataLoader
  iterator takes its base seed from torch's), which dropout and the data order also use, so every
  RNG is put back as it was. The weights are identical with and without these evaluations.
- The results go through ``Trainer.log``: every tracker gets ``eval/exact_match`` and ``eval/f1``,
  and they land in the trainer state's ``log_history``, which every checkpoint carries. A resumed
  run has exactly the points up to its checkpoint and adds the later ones once.
- A stop never waits for an evaluation: at a stop the checkpoint comes first, and the resumed run
  evaluates that step before it trains on.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from transformers import TrainerCallback

from job.evaluate import evaluate
from job.rows import head

SCALARS = ("exact_match", "f1")  # logged as eval_<name>: the Trainer's trackers show them as eval/<name>


def first_examples(rows, features, n: int):
    """The first ``n`` examples (0 = all) and exactly their windows, in the same order."""
    if not n or n >= len(rows):
        return rows, features
    keep = np.flatnonzero(features.with_format("arrow")["example_index"].to_numpy() < n)
    return head(rows, n), features.select(keep)


def recorded_steps(log_history: list[dict]) -> set[int]:
    return {entry["step"] for entry in log_history if "eval_f1" in entry and "step" in entry}


def eval_points(log_history: list[dict]) -> list[dict]:
    """``[{step, exact_match, f1}]`` from a trainer state's log history, oldest first."""
    return [{"step": e["step"], **{k: e[f"eval_{k}"] for k in SCALARS}}
            for e in log_history if all(f"eval_{k}" in e for k in SCALARS) and "step" in e]


class PeriodicEval(TrainerCallback):
    """Added after the trainer exists (``attach``): it evaluates with that trainer."""

    def __init__(self, every: int, rows, features, settings):
        self.every, self.settings = every, settings
        self.rows, self.features = first_examples(rows, features, settings.eval_samples_during_training)
        self.trainer = None

    def attach(self, trainer) -> "PeriodicEval":
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        # step 0: the baseline of the untrained head; after a resume: a point a stop left out
        if state.global_step % self.every == 0 and state.global_step not in recorded_steps(state.log_history):
            self._evaluate()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every:
            return
        if control.should_training_stop and state.global_step < state.max_steps:
            return  # a stop (set by CheckpointCallback, the same on every rank): checkpoint first
        self._evaluate()

    def _evaluate(self) -> None:
        saved = _rng_states()
        try:
            scores, _ = evaluate(self.trainer, self.features, self.rows, self.settings, during_training=True)
        finally:
            _restore_rng_states(saved)
        # Trainer.log minus the "epoch" it adds (a second train/epoch point at a logging step), and
        # keeping should_log, which on_log clears: the loss of this step is still to be logged
        trainer, logs = self.trainer, {f"eval_{k}": scores[k] for k in SCALARS}
        trainer.state.log_history.append({**logs, "step": trainer.state.global_step})
        should_log = trainer.control.should_log
        trainer.control = trainer.callback_handler.on_log(trainer.args, trainer.state, trainer.control, logs)
        trainer.control.should_log = should_log


def _rng_states():
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _restore_rng_states(saved) -> None:
    py, np_state, cpu, cuda = saved
    random.setstate(py)
    np.random.set_state(np_state)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
