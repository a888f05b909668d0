"""What a log record carries, and library records cleaned into the job's events.

Both log formats (``job.observe.logs`` for JSON, ``job.observe.textlog`` for people) read a record's
fields through ``record_fields``. ``LibraryRecords`` cleans what other libraries log on the way:
terminal colour codes go, and the transformers model-loading report becomes one
``model_load_report`` event listing the weights.
"""
from __future__ import annotations

import logging
import re

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # CSI sequences: colours, bold, cursor moves
_REPORT = re.compile(r"(?P<model>\w+) LOAD REPORT from: (?P<source>.*)")


def record_fields(record: logging.LogRecord) -> dict:
    """What a record carries beyond the standard attributes (the ``extra=`` of the call)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class LibraryRecords(logging.Filter):
    """Records of other libraries without colour codes; the model-loading report as one event; no library's
    information logged on the root logger (the job never logs there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "job" or record.name.startswith("job."):
            return True
        if record.name == "root" and record.levelno < logging.WARNING:
            return False  # a library's chatter on the root logger (ONNX Runtime's quantizer: a line per tensor)
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
