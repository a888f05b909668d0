"""Exit codes and the exceptions that carry them.

The exit code is the job's contract with whoever runs it: Kubernetes maps these numbers in the
Job's ``podFailurePolicy`` (configuration and data errors fail at once, preemption is ignored),
so they never change meaning.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_RUN_LOCKED = 4
EXIT_UNAVAILABLE = 75  # EX_TEMPFAIL from sysexits.h: try again later
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM

EXIT_CODES = {
    "ok": EXIT_OK,
    "unexpected": EXIT_UNEXPECTED,
    "config": EXIT_CONFIG,
    "data": EXIT_DATA,
    "run_locked": EXIT_RUN_LOCKED,
    "unavailable": EXIT_UNAVAILABLE,
    "preempted": EXIT_PREEMPTED,
}


class JobError(Exception):
    """An error the job explains in one line and maps to an exit code."""

    exit_code = EXIT_UNEXPECTED


class ConfigError(JobError):
    exit_code = EXIT_CONFIG


class DataError(JobError):
    exit_code = EXIT_DATA


class RunLocked(JobError):
    exit_code = EXIT_RUN_LOCKED


class StorageUnavailable(JobError):
    """Storage or the hub could not be reached after bounded retries; a rerun may succeed."""

    exit_code = EXIT_UNAVAILABLE


class StorageDenied(ConfigError):
    """Storage refused our credentials or the bucket does not exist: retrying will not help."""


class Preempted(JobError):
    exit_code = EXIT_PREEMPTED


class StoppedUncommitted(JobError):
    """Stopped by a signal before the checkpoint taken for the stop reached storage: progress since the last one is lost."""

    exit_code = EXIT_UNAVAILABLE


def print_error(message: str, code: int, program: str = "qa-finetune") -> None:
    """The one stderr line every entry point ends a failure with; secrets are redacted here."""
    import sys

    from job.redaction import redact

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
