"""Answer questions with a published model: ``python -m job.answer --model DIR|s3://... --question Q --context C``.

transformers 5 has no ``question-answering`` pipeline; this is the job's own, and it decodes with
exactly the functions evaluation uses (same windows, same n-best rules).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from job.decoding import decode_answer
from job.features import eval_features
from job.storage import RetryPolicy, open_storage


class QuestionAnswerer:
    def __init__(self, model_dir: str | Path, max_length: int = 384, doc_stride: int = 128, n_best: int = 20,
                 max_answer_length: int = 30, version_2: bool = False, null_threshold: float = 0.0):
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir)).eval()
        self.max_length, self.doc_stride = max_length, doc_stride
        self.options = dict(n_best=n_best, max_answer_length=max_answer_length, version_2=version_2, null_threshold=null_threshold)

    @torch.inference_mode()
    def __call__(self, question: str, context: str) -> dict:
        features = eval_features(self.tokenizer, [{"question": question, "context": context}], self.max_length, self.doc_stride)
        batch = self.tokenizer.pad({k: features[k] for k in self.tokenizer.model_input_names}, return_tensors="pt")
        out = self.model(**batch)
        windows = zip(out.start_logits.tolist(), out.end_logits.tolist(), features["offset_mapping"])
        answer = decode_answer(windows, context, **self.options)
        return {"answer": answer.text, "start": answer.start, "end": answer.end, "score": answer.score}


def fetch_model(uri: str, dest: Path, endpoint_url: str | None = None, region: str | None = None) -> Path:
    """A local folder for a model given as a folder or as ``s3://bucket/prefix`` (e.g. ``<run>/model``)."""
    if not uri.startswith("s3://"):
        return Path(uri)
    store = open_storage(uri, RetryPolicy(), endpoint_url, region)
    for key in store.list(""):
        store.get_file(key, dest / key)
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m job.answer", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder or s3://bucket/prefix/model")
    parser.add_argument("--question", required=True)
    parser.add_argument("--context", required=True, help="the text, or @path to read it from a file")
    parser.add_argument("--endpoint-url", default=os.environ.get("QA_S3_ENDPOINT_URL"))
    parser.add_argument("--squad-v2", action="store_true", help="allow an empty answer")
    args = parser.parse_args(argv)
    context = Path(args.context[1:]).read_text() if args.context.startswith("@") else args.context
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = fetch_model(args.model, Path(tmp), args.endpoint_url)
        result = QuestionAnswerer(model_dir, version_2=args.squad_v2)(args.question, context)
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
