"""The one line a failure prints on stderr, for the job and for its command lines.

Every entry point ends a failure the same way: one line, ``<program>: error: ... (exit N)``, with
secrets redacted and never a traceback; the exit code says what kind of failure it was.
"""
from __future__ import annotations

import sys

from job.errors import EXIT_OK, EXIT_UNEXPECTED, JobError
from job.observe.redaction import redact


def print_error(message: str, code: int, program: str = "qa-finetune") -> None:
    """The one stderr line every entry point ends a failure with; secrets are redacted here."""
    line = " ".join(redact(str(message)).split())  # one line, whatever the message held
    print(f"{program}: error: {line} (exit {code})", file=sys.stderr, flush=True)


def run_command_line(program: str, call):
    """``(EXIT_OK, call())``, or ``(code, None)`` after the one-line error: a command line never shows a traceback."""
    try:
        return EXIT_OK, call()
    except JobError as exc:
        print_error(str(exc), exc.exit_code, program)
        return exc.exit_code, None
    except BaseException as exc:  # noqa: BLE001  also a tokenizer panic, which is not an Exception
        text = str(exc).splitlines()[0][:200] if str(exc) else ""
        print_error(f"unexpected error: {type(exc).__name__}: {text}", EXIT_UNEXPECTED, program)
        return EXIT_UNEXPECTED, None
