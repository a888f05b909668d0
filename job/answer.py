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
import os
import sys
import tempfile
from pathlib import Path

from job.errors import EXIT_OK, ConfigError
from job.observe.console import run_command_line
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
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--doc-stride", type=int, default=128)
    parser.add_argument("--squad-v2", action="store_true", help="allow an empty answer")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: the GPU when one is usable, else the CPU; cuda: a GPU or exit 2")
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
    if not 32 <= args.max_length <= 8192 or not 0 < args.doc_stride < args.max_length - 16:
        raise ConfigError("--doc-stride must be positive and leave 16 tokens of --max-length (32-8192)")
    model_uri, run_id = (channel_model(args.model, args.channel, args.endpoint_url, args.region) if args.channel
                         else (args.model, None))
    device = answer_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = fetch_model(model_uri, Path(tmp), args.endpoint_url, args.region)
        answer = QuestionAnswerer(model_dir, max_length=args.max_length, doc_stride=args.doc_stride,
                                  version_2=args.squad_v2, device=device)(args.question, context)
    return {**answer, "run_id": run_id} if run_id else answer


def answer_device(choice: str) -> str:
    """``--device``: ``cuda`` (GPU 0) or ``cpu``; ``cuda`` asked for without a usable GPU is exit 2 with torch's reason."""
    if choice == "cpu":
        return "cpu"
    from job.runtime.device import has_kernels, probe_gpus

    gpus = probe_gpus()
    if gpus.usable and has_kernels(gpus.capability, gpus.arch_list):
        return "cuda"
    if choice == "cuda":
        reason = gpus.problem or f"this torch has no kernels for {gpus.name} (compute capability {gpus.capability})"
        raise ConfigError(f"--device cuda: no usable GPU: {reason}; use --device cpu")
    return "cpu"


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
