"""Answer questions with a published model: ``python -m job.answer --model DIR|s3://... --question Q --context C``.

transformers 5 has no ``question-answering`` pipeline; this is the job's own, and it decodes with
exactly the functions evaluation uses (same windows, same n-best rules, same long-question cut).
``--model`` may name a model folder or a run folder (its ``model/`` is used), locally or in
``s3://``; only the model's own files are downloaded, each name confined to the download folder.
With ``--channel NAME``, ``--model`` is the job's ``QA_OUTPUT_URI`` and the model is the one the
channel's pointer names.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from job.errors import EXIT_OK, ConfigError, run_command_line

PROGRAM = "qa-finetune answer"
WINDOWS_PER_BATCH = 32  # a long context becomes many windows: bound the memory of one forward pass


class QuestionAnswerer:
    def __init__(self, model_dir: str | Path, max_length: int = 384, doc_stride: int = 128, n_best: int = 20,
                 max_answer_length: int = 30, version_2: bool = False, null_threshold: float = 0.0):
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir)).eval()
        self.max_length, self.doc_stride = max_length, doc_stride
        self.options = dict(n_best=n_best, max_answer_length=max_answer_length, version_2=version_2, null_threshold=null_threshold)

    def __call__(self, question: str, context: str) -> dict:
        import torch

        from job.decoding import decode_answer
        from job.features import eval_features

        features = eval_features(self.tokenizer, [{"question": question, "context": context}], self.max_length, self.doc_stride)
        start, end = [], []
        with torch.inference_mode():
            for begin in range(0, len(features["input_ids"]), WINDOWS_PER_BATCH):
                chunk = {k: features[k][begin:begin + WINDOWS_PER_BATCH] for k in self.tokenizer.model_input_names}
                out = self.model(**self.tokenizer.pad(chunk, return_tensors="pt"))
                start.extend(out.start_logits.tolist())
                end.extend(out.end_logits.tolist())
        answer = decode_answer(zip(start, end, features["offset_mapping"]), context, **self.options)
        score = answer.score if math.isfinite(answer.score) else None  # JSON has no infinity
        return {"answer": answer.text, "start": answer.start, "end": answer.end, "score": score}


def fetch_model(uri: str, dest: Path, endpoint_url: str | None = None, region: str | None = None) -> Path:
    """A local folder for a model given as a model or run folder, local or ``s3://bucket/prefix``."""
    from job.locations import UnsafeName, confine, local_path
    from job.storage import COMMAND_LINE_POLICY, open_storage

    if not uri.startswith("s3://"):
        path = local_path(uri)
        if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
            path = path / "model"  # a run folder
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {uri}: no model there (no config.json)")
        return path
    store = open_storage(uri, COMMAND_LINE_POLICY, endpoint_url, region)
    keys = store.list("")
    if "config.json" not in keys and "model/config.json" in keys:
        keys = [k[len("model/"):] for k in keys if k.startswith("model/")]
        store = open_storage(uri.rstrip("/") + "/model", COMMAND_LINE_POLICY, endpoint_url, region)
    top_level = [k for k in keys if "/" not in k]  # a model's own files; never checkpoints or caches
    if "config.json" not in top_level:
        raise ConfigError(f"--model {uri}: no model there (no config.json)")
    for key in top_level:
        try:
            local = confine(dest, key)
        except UnsafeName as exc:
            raise ConfigError(f"--model {uri}: refusing an unsafe object name ({exc})") from None
        store.get_file(key, local)
    return dest


def main(argv=None, environ=None) -> int:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="python -m job.answer", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model or run folder, or s3://bucket/prefix/<run>[/model]; "
                                                       "with --channel: the QA_OUTPUT_URI holding the channel")
    parser.add_argument("--channel", help="answer with the model this channel's pointer names")
    parser.add_argument("--question", required=True)
    parser.add_argument("--context", required=True, help="the text, or @path to read it from a file")
    parser.add_argument("--endpoint-url", default=environ.get("QA_S3_ENDPOINT_URL") or None)
    parser.add_argument("--region", default=environ.get("QA_S3_REGION") or None)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--squad-v2", action="store_true", help="allow an empty answer")
    args = parser.parse_args(argv)
    from job.redaction import register_secrets

    register_secrets(environ)
    code, result = run_command_line(PROGRAM, lambda: _answer_or_config_error(args))
    if code != EXIT_OK:
        return code
    print(json.dumps(result, ensure_ascii=False))
    return EXIT_OK


def _answer_or_config_error(args) -> dict:
    try:
        return _answer(args)
    except OSError as exc:  # a model folder or files that do not load
        raise ConfigError(f"--model {args.model}: cannot load: {str(exc).splitlines()[0][:200]}") from None


def _answer(args) -> dict:
    if args.context.startswith("@"):
        try:
            context = Path(args.context[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--context {args.context[:200]}: cannot read ({exc})") from None
    else:
        context = args.context
    if not context.strip() or not args.question.strip():
        raise ConfigError("--question and --context must not be empty")
    if not 32 <= args.max_length <= 8192 or not 0 < args.doc_stride < args.max_length - 16:
        raise ConfigError("--doc-stride must be positive and leave 16 tokens of --max-length (32-8192)")
    model_uri, run_id = (channel_model(args.model, args.channel, args.endpoint_url, args.region) if args.channel
                         else (args.model, None))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = fetch_model(model_uri, Path(tmp), args.endpoint_url, args.region)
        answer = QuestionAnswerer(model_dir, max_length=args.max_length, doc_stride=args.doc_stride,
                                  version_2=args.squad_v2)(args.question, context)
    return {**answer, "run_id": run_id} if run_id else answer


def channel_model(output_uri: str, name: str, endpoint_url: str | None, region: str | None) -> tuple[str, str]:
    """``(model URI, run id)`` of the run a channel's pointer names; the URI is built, never read."""
    from job.channel import Channel
    from job.locations import join
    from job.storage import COMMAND_LINE_POLICY, open_storage

    root = open_storage(output_uri, COMMAND_LINE_POLICY, endpoint_url, region)
    run_id = Channel(root, name).require().pointer["run_id"]
    return join(output_uri, run_id, "model"), run_id


if __name__ == "__main__":
    sys.exit(main())
