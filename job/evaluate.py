"""Evaluate: predict logits for every window, decode n-best answers per example, score EM/F1.

Windows are predicted longest first and the logits put back in dataset order before decoding.
In dataset order most batches of 64 hold one long window and are padded to it; sorted, each
batch is padded only to its own longest, so the model computes about half the positions on
SQuAD. The answers are the ones dataset order gives, up to the last bits of the logits: the
matmuls see other batch shapes, which can flip a near-tie between two spans (RESULTS.md counts it).

Two ways to get the logits, one decoding (``score_logits``): ``evaluate`` through the Trainer
(under torchrun every rank predicts its share), and ``evaluate_model``, a plain loop in one
process with no Trainer and no collective, for a model scored alone (the channel holder). Both
give fp32 logits: the QA head runs outside autocast (``job.train.Fp32Head``).
"""
from __future__ import annotations

import logging
import math

import numpy as np
from transformers import TrainerCallback

from job.errors import Diverged
from job.rows import CHUNK, SCORED, chunks, each
from job.squad.decoding import count_nonfinite, decode_all
from job.squad.metrics import squad_scores

log = logging.getLogger(__name__)
_DECODING_COLUMNS = ("example_index", "offset_mapping")


class _StopBetweenBatches(TrainerCallback):
    """A stop request during prediction ends it at the next batch, not after the whole eval set."""

    def __init__(self, stop):
        self.stop = stop

    def on_prediction_step(self, args, state, control, **kwargs):
        self.stop.check()


def length_order(lengths) -> np.ndarray:
    """Window indices longest first; equal lengths keep dataset order (a stable sort).

    Longest first, so the largest batch (the memory peak) comes at once, not at the end.
    """
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")


def restore_order(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Rows predicted in ``order`` put back where they came from: ``out[order[k]] = values[k]``."""
    out = np.empty_like(values)
    out[order] = values
    return out


def window_lengths(features) -> np.ndarray:
    """Tokens per window, read from the Arrow column (turning it into Python lists takes seconds)."""
    import pyarrow.compute as pc

    return pc.list_value_length(features.with_format("arrow")["input_ids"]).to_numpy()


def window_offsets(features, windows=None) -> list[np.ndarray]:
    """Each window's character offsets as an (n, 2) array, read from the Arrow column.

    The same numbers ``features["offset_mapping"]`` gives as nested Python lists, which take
    seconds to build for SQuAD's dev set; decoding reads either the same way. ``windows`` (a
    slice or positions) reads only those.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = features.with_format("arrow")
    column = table["offset_mapping"] if windows is None else table[windows]["offset_mapping"]
    windows = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    pairs = windows.flatten().flatten().to_numpy().reshape(-1, 2)  # flatten() honours slices, .values would not
    counts = pc.list_value_length(windows).to_numpy()
    return np.split(pairs, np.cumsum(counts)[:-1])


def evaluate(trainer, eval_features, rows: list[dict], settings, stop=None, *, during_training: bool = False,
             length_sorted: bool = True) -> tuple[dict, dict[str, str]]:
    """Score the Trainer's model with ``trainer.predict``: under torchrun every rank predicts its share."""
    model_inputs = eval_features.remove_columns(list(_DECODING_COLUMNS))
    lengths = window_lengths(eval_features)
    order = length_order(lengths) if length_sorted else None
    if order is not None:
        model_inputs = model_inputs.select(order)
    # Decoding pairs logits with windows by position, so the sampler must keep the order given here.
    # transformers 5 also length-groups (shuffles) the eval sampler under group_by_length.
    strategy = trainer.args.train_sampling_strategy
    trainer.args.train_sampling_strategy = "sequential"
    watch = _StopBetweenBatches(stop) if stop is not None else None
    if watch is not None:
        trainer.add_callback(watch)
    try:
        output = trainer.predict(model_inputs)
    finally:
        trainer.args.train_sampling_strategy = strategy
        if watch is not None:
            trainer.remove_callback(watch)
    start_logits, end_logits = output.predictions[:2] if isinstance(output.predictions, tuple) else output.predictions
    if order is not None:
        start_logits, end_logits = restore_order(start_logits, order), restore_order(end_logits, order)
    return score_logits(rows, eval_features, start_logits, end_logits, settings, step=trainer.state.global_step,
                        during_training=during_training)


def evaluate_model(model, tokenizer, eval_features, rows: list[dict], settings, *, device: str = "cpu",
                   precision: str = "fp32", stop=None) -> tuple[dict, dict[str, str]]:
    """Score a model without a Trainer: one process, no collective, the same windows, order and decoding.

    What a process scores alone: the channel holder on rank 0 while the other ranks are gone (a
    Trainer built under torchrun would wait for them in its first collective).
    """
    start_logits, end_logits = predict_logits(model, tokenizer, eval_features, settings.eval_batch_size, device,
                                              precision, stop)
    return score_logits(rows, eval_features, start_logits, end_logits, settings, step=None)


def predict_logits(model, tokenizer, eval_features, batch_size: int, device: str = "cpu", precision: str = "fp32",
                   stop=None) -> tuple[np.ndarray, np.ndarray]:
    """fp32 start and end logits of every window, in dataset order, from a plain loop over the windows
    longest first (each batch padded to its own longest, in multiples of 8 on CUDA, as the Trainer's
    evaluation pads them). bf16/fp16 run under autocast as in training; the QA head stays fp32
    (``job.train.Fp32Head``). A stop request ends it between batches."""
    import torch

    columns = [c for c in eval_features.column_names if c not in _DECODING_COLUMNS]
    model_inputs = eval_features.select_columns(columns)
    lengths = window_lengths(eval_features)
    order = length_order(lengths)
    width = int(lengths.max()) if len(lengths) else 0
    start, end = (np.full((len(lengths), width), -100.0, dtype=np.float32) for _ in range(2))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    target = torch.device(device)
    model.to(target).eval()
    with torch.inference_mode(), torch.autocast(target.type, dtype=dtype, enabled=dtype is not None):
        for begin in range(0, len(order), batch_size):
            if stop is not None:
                stop.check()
            chunk = order[begin:begin + batch_size]
            batch = tokenizer.pad(model_inputs[chunk.tolist()], return_tensors="pt",
                                  pad_to_multiple_of=8 if target.type == "cuda" else None)
            out = model(**{k: v.to(target) for k, v in batch.items()})
            for into, logits in ((start, out.start_logits), (end, out.end_logits)):
                values = logits.float().cpu().numpy()[:, :width]
                into[chunk, :values.shape[1]] = values
    return start, end


def score_logits(rows: list[dict], eval_features, start_logits, end_logits, settings, *, step: int | None,
                 during_training: bool = False) -> tuple[dict, dict[str, str]]:
    """Decode every example's answer from its windows' logits (dataset order) and score EM/F1."""
    lengths = window_lengths(eval_features)
    nonfinite = count_nonfinite(start_logits, end_logits, lengths)
    if nonfinite:
        # decoding treats NaN as -inf (job.squad.decoding); say so, since it usually means a diverged model
        log.warning("non-finite logits", extra={"event": "nonfinite_logits", "windows": nonfinite, "of": len(lengths)})
    predictions = decode_examples(rows, eval_features, start_logits, end_logits, settings)
    scores = squad_scores(each(rows, SCORED), predictions, version_2=settings.squad_v2)
    log.info("evaluation finished", extra={"event": "eval", "step": step, "examples": len(rows),
                                           "during_training": during_training,
                                           **{k: round(v, 3) if isinstance(v, float) else v for k, v in scores.items()}})
    return scores, predictions


def check_scores(scores: dict) -> None:
    """Scores that are not finite numbers are never published or gated (``Diverged``, exit 2): the gate's
    floor test is ``metric < QA_GATE_MIN``, which NaN never is."""
    bad = sorted(k for k, v in scores.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise Diverged(f"the evaluation's scores are not finite ({', '.join(bad)}); nothing is published")


def decode_examples(rows, features, start_logits, end_logits, settings) -> dict[str, str]:
    """``{id: answer}`` for every example, decoded ``job.rows.CHUNK`` examples at a time.

    Only one chunk's contexts and window offsets are read at once, so what this holds grows
    with the answers, not the contexts. Each example gets exactly the windows, in the same
    order, that decoding the whole set at once would give it.
    """
    example_index = features.with_format("arrow")["example_index"].to_numpy()
    order = None if (np.diff(example_index) >= 0).all() else np.argsort(example_index, kind="stable")
    grouped = example_index if order is None else example_index[order]  # each example's windows together
    options = dict(n_best=settings.n_best_size, max_answer_length=settings.max_answer_length,
                   version_2=settings.squad_v2, null_threshold=settings.null_score_diff_threshold)
    predictions: dict[str, str] = {}
    for begin, part in chunks(rows, CHUNK, ("id", "context")):
        lo, hi = np.searchsorted(grouped, [begin, begin + len(part)])
        windows = slice(lo, hi) if order is None else order[lo:hi]
        predictions.update(decode_all(part, grouped[lo:hi] - begin, window_offsets(features, windows),
                                      start_logits[windows], end_logits[windows], **options))
    return predictions
