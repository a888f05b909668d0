"""Log lines on stdout: one JSON object per line for machines, short lines for a person at a terminal.

``QA_LOG_FORMAT=auto`` picks JSON when stdout is not a terminal (Kubernetes, CI, a pipe) and text
on a terminal. Both formats show the same records, and every line of either passes through
``job.redaction``. Library records are cleaned on the way: terminal colour codes go, and the
transformers model-loading report becomes one ``model_load_report`` event listing the weights.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time

from job.redaction import redact, redact_text

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # CSI sequences: colours, bold, cursor moves
_REPORT = re.compile(r"(?P<model>\w+) LOAD REPORT from: (?P<source>.*)")


def record_fields(record: logging.LogRecord) -> dict:
    """What a record carries beyond the standard attributes (the ``extra=`` of the call)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


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
        # every line, ours and the libraries', passes here: the one place secrets are removed
        return redact_text(json.dumps(redact(entry), default=str))


class LibraryRecords(logging.Filter):
    """Records of other libraries without colour codes; the model-loading report as one event."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "job" or record.name.startswith("job."):
            return True
        message = record.getMessage()
        clean = _ANSI.sub("", message)
        report = parse_load_report(clean)
        if report is not None:
            clean = report.pop("message")
            record.__dict__.update({"event": "model_load_report", **report})
        elif record.levelno >= logging.WARNING and "event" not in record.__dict__:
            record.event = "library_warning"
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def parse_load_report(text: str) -> dict | None:
    """transformers' "<Model> LOAD REPORT" table as ``{model_class, missing: [...], unexpected: [...], ...}``."""
    lines = text.splitlines()
    head = _REPORT.match(lines[0].strip()) if lines else None
    if head is None:
        return None
    by_status: dict[str, list[str]] = {}
    in_table = False
    for line in lines[1:]:
        if set(line.strip()) <= set("-+") and line.strip():
            in_table = True  # the rule under the header row
            continue
        if not in_table or "|" not in line:
            in_table = in_table and bool(line.strip())
            continue
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 2 and cells[0] and cells[1]:
            by_status.setdefault(cells[1].lower(), []).append(cells[0])
    by_status = {status: sorted(keys) for status, keys in by_status.items()}  # the report's order varies
    parts = []
    if by_status.get("missing"):
        parts.append(f"newly initialised (not in the checkpoint): {', '.join(by_status['missing'])}")
    if by_status.get("unexpected"):
        parts.append(f"in the checkpoint but unused: {', '.join(by_status['unexpected'])}")
    parts += [f"{status}: {', '.join(keys)}" for status, keys in by_status.items() if status not in ("missing", "unexpected")]
    message = f"{head['model']} weights " + ("; ".join(parts) if parts else "loaded with remarks")
    return {"message": message, "model_class": head["model"], **by_status}


def resolve_format(setting: str, stream=None) -> str:
    """``json`` or ``text``: ``auto`` is text only when the stream is a terminal."""
    if setting != "auto":
        return setting
    stream = stream or sys.stdout
    return "text" if hasattr(stream, "isatty") and stream.isatty() else "json"


def make_formatter(fmt: str, rank: int | None = None) -> logging.Formatter:
    if resolve_format(fmt) == "text":
        from job.textlog import TextFormatter

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
                  "matplotlib", "PIL"):
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
