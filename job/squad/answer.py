"""Answer a question over a context with a fine-tuned model: the stand-in for the removed QA pipeline.

transformers 5 has no ``question-answering`` pipeline. ``QuestionAnswerer`` windows the context
and decodes with exactly the functions evaluation uses (same windows, same n-best rules, same
long-question cut), in batches of windows so that a long context has bounded memory.
``python -m job.answer`` is its command line.
"""
from __future__ import annotations

import math
from pathlib import Path

from job.squad.decoding import decode_answer
from job.squad.features import eval_features

WINDOWS_PER_BATCH = 32  # a long context becomes many windows: bound the memory of one forward pass


class QuestionAnswerer:
    def __init__(self, model_dir: str | Path, max_length: int = 384, doc_stride: int = 128, n_best: int = 20,
                 max_answer_length: int = 30, version_2: bool = False, null_threshold: float = 0.0, device: str = "cpu"):
        import torch
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # fp32 whatever the saved dtype, as evaluation scores it (job.train.load_model)
        self.device = torch.device(device)
        self.model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir), dtype=torch.float32).to(self.device).eval()
        self.max_length, self.doc_stride = max_length, doc_stride
        self.options = dict(n_best=n_best, max_answer_length=max_answer_length, version_2=version_2, null_threshold=null_threshold)

    def __call__(self, question: str, context: str) -> dict:
        import torch

        features = eval_features(self.tokenizer, [{"question": question, "context": context}], self.max_length, self.doc_stride)
        start, end = [], []
        with torch.inference_mode():
            for begin in range(0, len(features["input_ids"]), WINDOWS_PER_BATCH):
                chunk = {k: features[k][begin:begin + WINDOWS_PER_BATCH] for k in self.tokenizer.model_input_names}
                batch = self.tokenizer.pad(chunk, return_tensors="pt")
                out = self.model(**{k: v.to(self.device) for k, v in batch.items()})
                start.extend(out.start_logits.tolist())
                end.extend(out.end_logits.tolist())
        answer = decode_answer(zip(start, end, features["offset_mapping"]), context, **self.options)
        score = answer.score if math.isfinite(answer.score) else None  # JSON has no infinity
        return {"answer": answer.text, "start": answer.start, "end": answer.end, "score": score}
