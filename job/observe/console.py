"""The one line a failure prints on stderr, for the job and for its command lines.

Every entry point ends a failure the same way: one line, ``<program>: error: ... (exit N)``, with
secrets redacted and never a traceback; the exit code says what kind of failure it was.
"""
from __future__ import annotations

import errno
import shutil
import sys
import traceback

from job.errors import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE, EXIT_UNEXPECTED, JobError
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


def failure_exit(log, exc: BaseException, places: str = "QA_WORK_DIR / QA_OUTPUT_URI", program: str = "qa-finetune",
                 work_dir: str | None = None) -> int:
    """How a job ends on ``exc``: one ``failed`` log line, the one stderr line, and the exit code.

    A ``JobError`` carries its code; local disk problems are not bugs (a full disk may pass on
    rerun: 75; a read-only or forbidden path will not: 2, naming ``places``, the settings that
    choose the paths); anything else is 1, its traceback in the log line only. ``python -m job``
    and ``python -m job.predict`` end the same way.
    """
    if isinstance(exc, JobError):
        return _fail(log, exc.exit_code, str(exc), type(exc).__name__, program)
    if isinstance(exc, OSError):
        code, message = _os_error(exc, places)
        if code is not None:
            return _fail(log, code, message, type(exc).__name__, program)
        return _unexpected(log, exc, program)
    if _disk_full(exc, work_dir):  # a full disk reported by a native library (safetensors, arrow, torch.save)
        return _fail(log, EXIT_UNAVAILABLE, f"no space left on the local disk ({type(exc).__name__}): "
                     "free space or give QA_WORK_DIR more, then rerun", type(exc).__name__, program)
    return _unexpected(log, exc, program)


def _os_error(exc: OSError, places: str) -> tuple[int | None, str]:
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EXIT_UNAVAILABLE, f"no space left on the local disk{where}: free space or give QA_WORK_DIR more, then rerun"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return EXIT_CONFIG, f"cannot write{where}: {exc.strerror}; check {places} permissions"
    return None, ""


# torch.save's zip writer loses the errno of a failed write: it raises "basic_ios::clear: iostream error", then
# "[enforce fail at inline_container.cc] unexpected pos" (or "PytorchStreamWriter failed writing file")
_UNEXPLAINED_WRITE_FAILURES = ("iostream error", "inline_container.cc", "PytorchStreamWriter failed")
_ALMOST_FULL_BYTES = 64 * 2**20  # less than any checkpoint: such a failure there is the disk being full


def _disk_full(exc: BaseException, work_dir: str | None) -> bool:
    """A full disk, said outright, or a write failure without a reason while the work dir's disk is (almost) full."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc):
            return True
        if work_dir and any(s in str(exc) for s in _UNEXPLAINED_WRITE_FAILURES) and _free_bytes(work_dir) < _ALMOST_FULL_BYTES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_bytes(path: str) -> float:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return float("inf")


def _unexpected(log, exc: BaseException, program: str) -> int:
    first = str(exc).splitlines()[0] if str(exc) else ""
    log.error("unexpected error", extra={"event": "failed", "exit_code": EXIT_UNEXPECTED,
                                         "error": f"{type(exc).__name__}: {first}", "traceback": traceback.format_exc()})
    print_error(f"unexpected error: {type(exc).__name__}: {first}", EXIT_UNEXPECTED, program)
    return EXIT_UNEXPECTED


def _fail(log, code: int, message: str, kind: str, program: str) -> int:
    log.error(message, extra={"event": "failed", "exit_code": code, "error_type": kind})
    print_error(message, code, program)
    return code
