"""A chunk of rows to prediction lines: evaluation's windows, batches and decoding, through a ``job.serving`` scorer.

Nothing here is predictions' own: the windows are ``job.preprocess.feature_dataset``'s (the table
evaluation scores), the logits come from ``job.evaluate.scorer_logits`` (windows longest first,
each batch padded to its own longest, as evaluation orders them), and the answers from
``job.evaluate.decode_example_answers`` and ``final_predictions`` (``job.squad.decoding``, SQuAD
v2's threshold applied as evaluation applies it). A chunk is the unit of work: the same rows in
the same chunk give the same batches, so a rerun computes a chunk exactly as the attempt before.
"""
from __future__ import annotations

import logging
from pathlib import Path

from job.errors import ConfigError
from job.predictions.chunks import prediction
from job.predictions.settings import Decoding, PredictSettings

log = logging.getLogger(__name__)


def predict_chunk(scorer, rows: list[dict], decoding: Decoding, batch_size: int, stop=None) -> tuple[list[dict], int]:
    """``(prediction lines in row order, windows scored)``; ``stop.check()`` may end it between batches."""
    # here, not at the top: job.evaluate imports the Trainer, which a bad row or a typo need not wait for
    from job.evaluate import decode_example_answers, final_predictions, scorer_logits
    from job.preprocess import feature_dataset

    features = feature_dataset("eval", scorer.tokenizer, rows, decoding.max_length, decoding.doc_stride)
    start, end = scorer_logits(scorer, features, batch_size, stop)
    answers = decode_example_answers(rows, features, start, end, decoding)  # best spans
    texts = final_predictions(answers, decoding.version_2, decoding.null_score_diff_threshold)
    return [prediction(row["id"], answers[row["id"]], texts[row["id"]], decoding.version_2) for row in rows], len(features)


def open_scorer(settings: PredictSettings, model_dir: Path):
    """The model on ``QA_PREDICT_RUNTIME``; the torch runtime on the device ``QA_DEVICE`` chooses (exit 2 when
    it cannot be used as asked, as the job's device check), ONNX Runtime on the CPU."""
    from job import serving
    from job.runtime.device import choose_device, probe_gpus

    device = choose_device(settings.device, probe_gpus()) if settings.predict_runtime == serving.TORCH else "cpu"
    try:
        scorer = serving.open_scorer(model_dir, settings.predict_runtime, device=device)
        log.info("model loaded", extra={"event": "scorer", "runtime": settings.predict_runtime, "device": device})
        return scorer
    except OSError as exc:  # files that do not load as a model (transformers or ONNX Runtime says which)
        raise ConfigError(f"QA_PREDICT_MODEL={settings.predict_model}: cannot load: "
                          f"{str(exc).splitlines()[0][:200]}") from None
