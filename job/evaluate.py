"""Evaluate: predict logits for every window, decode n-best answers per example, score EM/F1."""
from __future__ import annotations

import logging

from transformers import TrainerCallback

from job.decoding import decode_all
from job.squad_metrics import squad_scores

log = logging.getLogger(__name__)
_DECODING_COLUMNS = ("example_index", "offset_mapping")


class _StopBetweenBatches(TrainerCallback):
    """A stop request during prediction ends it at the next batch, not after the whole eval set."""

    def __init__(self, stop):
        self.stop = stop

    def on_prediction_step(self, args, state, control, **kwargs):
        self.stop.check()


def evaluate(trainer, eval_features, rows: list[dict], settings, stop=None,
             during_training: bool = False) -> tuple[dict, dict[str, str]]:
    model_inputs = eval_features.remove_columns(list(_DECODING_COLUMNS))
    # Decoding pairs logits with windows by position, so prediction must keep the dataset order.
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
    predictions = decode_all(
        rows, eval_features["example_index"], eval_features["offset_mapping"], start_logits, end_logits,
        n_best=settings.n_best_size, max_answer_length=settings.max_answer_length,
        version_2=settings.squad_v2, null_threshold=settings.null_score_diff_threshold,
    )
    scores = squad_scores(rows, predictions, version_2=settings.squad_v2)
    log.info("evaluation finished", extra={"event": "eval", "step": trainer.state.global_step, "examples": len(rows),
                                           "during_training": during_training,
                                           **{k: round(v, 3) if isinstance(v, float) else v for k, v in scores.items()}})
    return scores, predictions
