"""Container entrypoint: ``python -m job``. Settings from ``QA_*`` variables; the exit code says how it ended."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import traceback

from job.errors import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE, EXIT_UNEXPECTED, JobError
from job.observe.console import print_error
from job.runtime.preemption import StopRequest, exit_now


def main(environ=None) -> int:
    environ = os.environ if environ is None else environ
    exit_dir = environ.get("QAFT_LAUNCH_EXIT_DIR")  # set by job.launch, which reports our code for torchrun

    def report(code: int) -> int:
        if exit_dir:
            with open(os.path.join(exit_dir, f"rank-{environ.get('RANK', '0')}"), "w") as f:
                f.write(str(code))
        return code

    # First thing, before the slow imports: a signal at any moment becomes a stop request, never
    # a KeyboardInterrupt or a silent death, and a stuck stop still ends with our own exit code.
    stop = StopRequest(on_deadline=lambda s: exit_now(s, report, print_error)).install()
    return report(_run(environ, stop))


def _run(environ, stop: StopRequest) -> int:
    from job.observe.logs import setup_logging, use_format
    from job.observe.redaction import register_secrets

    register_secrets(environ)
    rank = int(environ["RANK"]) if "WORLD_SIZE" in environ and environ.get("WORLD_SIZE") != "1" else None
    setup_logging(rank=rank)
    log = logging.getLogger("job")
    settings = None
    try:
        from job.settings import load_settings

        settings = load_settings(environ)  # before the heavy imports: a typo is reported in a second
        use_format(settings.log_format, rank)
        stop.configure(settings.stop_grace_seconds)
        log.info("starting", extra={"event": "start", "run_id": settings.run_id, "settings": settings.public_dict()})
        stop.check()
        from job.pipeline import Ranks, run

        run(settings, Ranks.from_env(environ), stop)
    except JobError as exc:
        return _fail(log, exc.exit_code, str(exc), type(exc).__name__)
    except OSError as exc:
        code, message = _os_error(exc)
        if code is not None:
            return _fail(log, code, message, type(exc).__name__)
        return _unexpected(log, exc)
    except BaseException as exc:  # noqa: BLE001  the last line of defence, also for non-Exception panics
        # a full disk reported by a native library (safetensors, arrow, torch.save) as its own error
        if _disk_full(exc, settings.work_dir if settings is not None else None):
            return _fail(log, EXIT_UNAVAILABLE, f"no space left on the local disk ({type(exc).__name__}): "
                         "free space or give QA_WORK_DIR more, then rerun", type(exc).__name__)
        return _unexpected(log, exc)
    log.info("done", extra={"event": "done", "exit_code": EXIT_OK})
    return EXIT_OK


def _os_error(exc: OSError) -> tuple[int | None, str]:
    """Local disk problems are not bugs: a full disk may pass on rerun (75), a read-only or forbidden path will not (2)."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EXIT_UNAVAILABLE, f"no space left on the local disk{where}: free space or give QA_WORK_DIR more, then rerun"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return EXIT_CONFIG, f"cannot write{where}: {exc.strerror}; check QA_WORK_DIR / QA_OUTPUT_URI permissions"
    return None, ""


# torch.save's zip writer loses the errno of a failed write: it raises "basic_ios::clear: iostream error", then
# "[enforce fail at inline_container.cc] unexpected pos" (or "PytorchStreamWriter failed writing file")
_UNEXPLAINED_WRITE_FAILURES = ("iostream error", "inline_container.cc", "PytorchStreamWriter failed")
_ALMOST_FULL_BYTES = 64 * 2**20  # less than any checkpoint: such a failure there is the disk being full


def _disk_full(exc: BaseException, work_dir: str | None = None) -> bool:
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


def _unexpected(log, exc: BaseException) -> int:
    first = str(exc).splitlines()[0] if str(exc) else ""
    log.error("unexpected error", extra={"event": "failed", "exit_code": EXIT_UNEXPECTED,
                                         "error": f"{type(exc).__name__}: {first}", "traceback": traceback.format_exc()})
    print_error(f"unexpected error: {type(exc).__name__}: {first}", EXIT_UNEXPECTED)
    return EXIT_UNEXPECTED


def _fail(log, code: int, message: str, kind: str) -> int:
    log.error(message, extra={"event": "failed", "exit_code": code, "error_type": kind})
    print_error(message, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
