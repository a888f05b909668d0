"""Answer a question over a context with a fine-tuned model: the stand-in for the removed QA pipeline.

transformers 5 has no ``question-answering`` pipeline. ``QuestionAnswerer`` windows the context
and decodes with exactly the functions evaluation uses (same windows, same n-best rules, same
long-question cut), in batches of windows so that a long context has bounded memory. The logits
come from a ``job.serving`` scorer: the torch model, or its ONNX export (``runtime``).
``python -m job.answer`` is its command line.
"""
from __future__ import annotations

import math
from pathlib import Path

from job.serving import TORCH, open_scorer
from job.squad.decoding import decode_answer
from job.squad.features import eval_features

WINDOWS_PER_BATCH = 32  # a long context becomes many windows: bound the memory of one forward pass


class QuestionAnswerer:
    def __init__(self, model_dir: str | Path, max_length: int = 384, doc_stride: int = 128, n_best: int = 20,
                 max_answer_length: int = 30, version_2: bool = False, null_threshold: float = 0.0,
                 runtime: str = TORCH, scorer=None):
        # fp32 whatever the saved dtype, as evaluation scores it (job.serving.TorchScorer)
        self.scorer = scorer if scorer is not None else open_scorer(model_dir, runtime)
        self.tokenizer = self.scorer.tokenizer
        self.max_length, self.doc_stride = max_length, doc_stride
        self.options = dict(n_best=n_best, max_answer_length=max_answer_length, version_2=version_2, null_threshold=null_threshold)

    @property
    def model(self):
        """The torch model (runtime torch only)."""
        return self.scorer.model

    def __call__(self, question: str, context: str) -> dict:
        features = eval_features(self.tokenizer, [{"question": question, "context": context}], self.max_length, self.doc_stride)
        start, end = [], []
        for begin in range(0, len(features["input_ids"]), WINDOWS_PER_BATCH):
            chunk = {k: features[k][begin:begin + WINDOWS_PER_BATCH] for k in self.tokenizer.model_input_names}
            s, e = self.scorer(dict(self.tokenizer.pad(chunk, return_tensors="np")))
            start.extend(s)
            end.extend(e)
        answer = decode_answer(zip(start, end, features["offset_mapping"]), context, **self.options)
        score = answer.score if math.isfinite(answer.score) else None  # JSON has no infinity
        return {"answer": answer.text, "start": answer.start, "end": answer.end, "score": score}
