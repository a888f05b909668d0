"""A chunk of rows to prediction lines: windows, length-ordered batches through a scorer, evaluation's decoding.

The windows are ``job.squad.features.eval_features``'s and the answers ``job.squad.decoding``'s,
with the options the model was evaluated with, so a prediction is the answer evaluation gives.
Within a chunk the windows go through the model longest first, as ``job.evaluate`` orders them
(each batch padded only to its own longest window), and the logits are put back in row order
before decoding. A chunk is the unit of work: the same rows in the same chunk give the same
batches, so a rerun computes a chunk exactly as the attempt before it did.
"""
from __future__ import annotations

import numpy as np

from job.predictions.chunks import prediction
from job.predictions.settings import Decoding
from job.squad.decoding import decode_answer
from job.squad.features import eval_features


def predict_chunk(scorer, rows: list[dict], decoding: Decoding, batch_size: int, between_batches=lambda: None
                  ) -> tuple[list[dict], int]:
    """``(prediction lines in row order, windows scored)``; ``between_batches()`` may raise to stop."""
    from job.evaluate import length_order  # here: job.evaluate imports the Trainer, which a bad row need not wait for

    tokenizer = scorer.tokenizer
    features = eval_features(tokenizer, rows, decoding.max_length, decoding.doc_stride)
    names = list(tokenizer.model_input_names)
    lengths = np.asarray([len(ids) for ids in features["input_ids"]], dtype=np.int64)
    order = length_order(lengths)
    width = int(lengths.max()) if len(lengths) else 0
    start, end = (np.full((len(lengths), width), -100.0, dtype=np.float32) for _ in range(2))
    for begin in range(0, len(order), batch_size):
        between_batches()
        take = order[begin:begin + batch_size]
        padded = tokenizer.pad({k: [features[k][i] for i in take] for k in names}, return_tensors="np")
        batch = {k: np.asarray(padded[k], dtype=np.int64) for k in names}
        s, e = scorer(batch)
        start[take, :s.shape[1]] = s[:, :width]
        end[take, :e.shape[1]] = e[:, :width]
    windows: dict[int, list[int]] = {}
    for window, example in enumerate(features["example_index"]):
        windows.setdefault(int(example), []).append(window)
    options = decoding.options()
    out = []
    for example, row in enumerate(rows):
        answer = decode_answer(((start[w], end[w], features["offset_mapping"][w]) for w in windows.get(example, [])),
                               row["context"], **options)
        out.append(prediction(row["id"], answer, decoding.version_2))
    return out, len(lengths)


class TorchScorer:
    """The transformers model in fp32, on the CPU: what ``job.serving.open_scorer`` gives for ``torch``."""

    runtime = "torch"

    def __init__(self, model_dir, device: str = "cpu"):
        import torch
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.device = torch.device(device)
        self.model.to(self.device)

    def __call__(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.model(**{k: torch.as_tensor(v).to(self.device) for k, v in batch.items()})
        return out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
