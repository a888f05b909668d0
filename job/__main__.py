"""Container entrypoint: ``python -m job``. Settings from ``QA_*`` variables; the exit code says how it ended."""
from __future__ import annotations

import logging
import os
import sys

from job.errors import EXIT_OK
from job.observe.console import failure_exit, print_error
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
    except BaseException as exc:  # noqa: BLE001  the last line of defence, also for non-Exception panics
        return failure_exit(log, exc, work_dir=settings.work_dir if settings is not None else None)
    log.info("done", extra={"event": "done", "exit_code": EXIT_OK})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
