"""Answer questions with a published model: ``python -m job.answer --model DIR|s3://... --question Q --context C``.

transformers 5 has no ``question-answering`` pipeline; this is the job's own, and it decodes with
exactly the functions evaluation uses (same windows, same n-best rules, same long-question cut).
``--model`` may name a model folder or a run folder (its ``model/`` is used), locally or in
``s3://``; only the model's own files are downloaded, each name confined to the download folder.
With ``--channel NAME``, ``--model`` is the job's ``QA_OUTPUT_URI`` and the model is the one the
channel's pointer names. ``--runtime`` picks torch or a published ONNX graph (``job.serving``); the
windows, decoding and SQuAD v2's no-answer threshold are the model's own (its ``serving.json``)
unless a flag says otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from job.errors import EXIT_OK, ConfigError
from job.observe.console import run_command_line
from job.serving import RUNTIMES, TORCH, read_serving
from job.squad.answer import QuestionAnswerer
from job.store.models import fetch_model

__all__ = ["QuestionAnswerer", "fetch_model", "main"]  # QuestionAnswerer: the name the README gives

PROGRAM = "qa-finetune answer"


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
    parser.add_argument("--runtime", choices=RUNTIMES, default=TORCH,
                        help="torch (the transformers weights), onnx or onnx-int8 (the published ONNX graphs, ONNX Runtime on the CPU)")
    parser.add_argument("--max-length", type=int, help="window length (default: the model's serving.json, else 384)")
    parser.add_argument("--doc-stride", type=int, help="window overlap (default: the model's serving.json, else 128)")
    parser.add_argument("--squad-v2", action="store_true", help="allow an empty answer (default: as the model was evaluated)")
    parser.add_argument("--null-threshold", type=float,
                        help="v2: answer '' when null score - best span score exceeds this (default: the threshold published with the model, else 0)")
    args = parser.parse_args(argv)
    from job.observe.redaction import register_secrets

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
    if args.null_threshold is not None and not math.isfinite(args.null_threshold):
        raise ConfigError("--null-threshold must be a finite number")
    model_uri, run_id = (channel_model(args.model, args.channel, args.endpoint_url, args.region) if args.channel
                         else (args.model, None))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = fetch_model(model_uri, Path(tmp), args.endpoint_url, args.region, runtime=args.runtime)
        options = answer_options(args, read_serving(model_dir))
        answer = QuestionAnswerer(model_dir, runtime=args.runtime, **options)(args.question, context)
    out = {**answer, "runtime": args.runtime}
    return {**out, "run_id": run_id} if run_id else out


def answer_options(args, serving: dict) -> dict:
    """``QuestionAnswerer``'s options: a flag given wins, then what the model was evaluated with (``serving.json``:
    windows, n-best, v2 and its chosen no-answer threshold), then the job's defaults."""
    recorded = serving.get("decoding", {})
    options = {"max_length": args.max_length or recorded.get("max_length", 384),
               "doc_stride": args.doc_stride or recorded.get("doc_stride", 128),
               "n_best": recorded.get("n_best_size", 20), "max_answer_length": recorded.get("max_answer_length", 30),
               "version_2": args.squad_v2 or recorded.get("version_2", False),
               "null_threshold": (args.null_threshold if args.null_threshold is not None
                                  else recorded.get("null_score_diff_threshold", 0.0))}
    if not 32 <= options["max_length"] <= 8192 or not 0 < options["doc_stride"] < options["max_length"] - 16:
        raise ConfigError("--doc-stride must be positive and leave 16 tokens of --max-length (32-8192)")
    return options


def channel_model(output_uri: str, name: str, endpoint_url: str | None, region: str | None) -> tuple[str, str]:
    """``(model URI, run id)`` of the run a channel's pointer names; the URI is built, never read."""
    from job.channels.channel import Channel
    from job.store.locations import join
    from job.store.storage import COMMAND_LINE_POLICY, open_storage

    root = open_storage(output_uri, COMMAND_LINE_POLICY, endpoint_url, region)
    run_id = Channel(root, name).require().pointer["run_id"]
    return join(output_uri, run_id, "model"), run_id


if __name__ == "__main__":
    sys.exit(main())
