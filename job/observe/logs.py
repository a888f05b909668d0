"""Log lines on stdout: one JSON object per line for machines, short lines for a person at a terminal.

``QA_LOG_FORMAT=auto`` picks JSON when stdout is not a terminal (Kubernetes, CI, a pipe) and text
on a terminal. Both formats show the same records, and every line of either passes through
``job.observe.redaction``. Library records are cleaned on the way (``job.observe.records``).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time

from job.observe.records import LibraryRecords, record_fields
from job.observe.redaction import redact
from job.observe.textlog import TextFormatter


class JsonFormatter(logging.Formatter):
    def __init__(self, rank: int | None = None):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.rank is not None:
            entry["rank"] = self.rank
        entry.update(record_fields(record))
        if record.exc_info and record.levelno >= logging.ERROR:
            entry["exception"] = self.formatException(record.exc_info).splitlines()[-1]
        # every line, ours and the libraries', passes here: secrets are removed from the values,
        # before serializing, so no secret can change the line's structure
        return json.dumps(strict_json(redact(entry)), default=str)


def strict_json(value):
    """``value`` with every NaN or infinite float spelled as a string ("nan", "inf", "-inf").

    json.dumps writes them as the bare words NaN and Infinity, which are not JSON: a line with a
    diverged loss would be dropped by every strict reader, just when it matters most.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def resolve_format(setting: str, stream=None) -> str:
    """``json`` or ``text``: ``auto`` is text only when the stream is a terminal."""
    if setting != "auto":
        return setting
    stream = stream or sys.stdout
    return "text" if hasattr(stream, "isatty") and stream.isatty() else "json"


def make_formatter(fmt: str, rank: int | None = None) -> logging.Formatter:
    if resolve_format(fmt) == "text":
        return TextFormatter(rank)
    return JsonFormatter(rank)


def use_format(fmt: str, rank: int | None = None) -> None:
    """Switch the format once the settings are read (until then ``auto``)."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(make_formatter(fmt, rank))


def setup_logging(level: int = logging.INFO, rank: int | None = None, fmt: str = "auto") -> None:
    """Lines on stdout; under torchrun each line carries the process's rank."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(make_formatter(fmt, rank))
    handler.addFilter(LibraryRecords())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party libraries speak through the same handler, but only when it matters.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "filelock", "fsspec", "datasets", "transformers", "httpx",
                  "matplotlib", "PIL", "onnx_ir", "onnxscript", "onnx", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import datasets
        import transformers

        # Loading and saving bars ("Loading weights", "Writing model shards") say nothing a stage
        # line does not, and on a terminal they break up the text lines; the Trainer's own bar is
        # governed by disable_tqdm (job.train).
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        try:
            import huggingface_hub.utils

            huggingface_hub.utils.disable_progress_bars()
        except ImportError:
            pass
        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
        transformers.utils.logging.set_verbosity_warning()
    except ImportError:
        pass
