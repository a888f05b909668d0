"""Container entrypoint: ``python -m job``. Settings from ``QA_*`` variables; the exit code says how it ended."""
from __future__ import annotations

import logging
import os
import sys
import traceback

from job.errors import EXIT_OK, EXIT_UNEXPECTED, JobError


def main(environ=None) -> int:
    environ = os.environ if environ is None else environ
    code = _run(environ)
    exit_dir = environ.get("QAFT_LAUNCH_EXIT_DIR")  # set by job.launch, which reports our code for torchrun
    if exit_dir:
        with open(os.path.join(exit_dir, f"rank-{environ.get('RANK', '0')}"), "w") as f:
            f.write(str(code))
    return code


def _run(environ) -> int:
    from job.logs import setup_logging

    setup_logging(rank=int(environ["RANK"]) if "WORLD_SIZE" in environ and environ.get("WORLD_SIZE") != "1" else None)
    log = logging.getLogger("job")
    try:
        from job.pipeline import Ranks, run
        from job.settings import load_settings

        settings = load_settings(environ)
        log.info("starting", extra={"event": "start", "run_id": settings.run_id, "settings": settings.public_dict()})
        run(settings, Ranks.from_env(environ))
    except JobError as exc:
        return _fail(log, exc.exit_code, str(exc), type(exc).__name__)
    except KeyboardInterrupt:
        return _fail(log, 143, "interrupted before a checkpoint could be taken", "Interrupted")
    except Exception as exc:  # the last line of defence: one line, with the traceback inside the JSON
        log.error("unexpected error", extra={"event": "failed", "exit_code": EXIT_UNEXPECTED,
                                             "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        print(f"qa-finetune: unexpected error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return EXIT_UNEXPECTED
    log.info("done", extra={"event": "done", "exit_code": EXIT_OK})
    return EXIT_OK


def _fail(log, code: int, message: str, kind: str) -> int:
    log.error(message, extra={"event": "failed", "exit_code": code, "error_type": kind})
    print(f"qa-finetune: error: {message} (exit {code})", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
