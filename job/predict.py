"""Batch predictions as a job: ``python -m job.predict``. Settings from ``QA_*`` variables; the exit code says how it ended.

Predicts every question of a file, folder, ``s3://`` object or prefix, or hub dataset with a
published model (a folder, an ``s3://`` run, or the model a channel names), as JSON Lines in
committed chunks under ``QA_PREDICT_OUTPUT_URI``; a rerun resumes at the first uncommitted chunk,
and the pods of a Kubernetes Indexed Job share the rows (``JOB_COMPLETION_INDEX``). See the
README, "Batch predictions", and ``job.predictions``.
"""
from __future__ import annotations

import logging
import os
import sys

from job.errors import EXIT_OK
from job.observe.console import failure_exit, print_error
from job.predictions import RERUN
from job.runtime.preemption import StopRequest, exit_now

PROGRAM = "qa-finetune predict"  # the one error line's prefix
PLACES = "QA_WORK_DIR / QA_PREDICT_OUTPUT_URI"


def out_of_time(stop: StopRequest) -> None:
    """The stop's grace period ran out: the one error line says how a shard resumes, and the process ends now."""
    exit_now(stop, say=lambda message, code: print_error(message, code, PROGRAM), rerun=RERUN)


def main(environ=None) -> int:
    environ = os.environ if environ is None else environ
    # first thing: a signal at any moment is a stop request, and a stuck stop still ends with our own code
    stop = StopRequest(on_deadline=out_of_time).install()
    from job.observe.logs import setup_logging, use_format
    from job.observe.redaction import register_secrets

    register_secrets(environ)
    setup_logging()
    log = logging.getLogger("job.predict")
    try:
        from job.predictions.settings import load_predict_settings

        settings = load_predict_settings(environ)  # before the heavy imports: a typo is reported in a second
        use_format(settings.log_format)
        stop.configure(settings.stop_grace_seconds)
        log.info("starting", extra={"event": "predict_start", "shard": settings.shard, "shards": settings.predict_shards,
                                    "settings": settings.public_dict()})
        from job.predictions.run import check_stop, run

        check_stop(stop)
        run(settings, stop)
    except BaseException as exc:  # noqa: BLE001  the last line of defence, also for non-Exception panics
        return failure_exit(log, exc, PLACES, PROGRAM)
    log.info("done", extra={"event": "done", "exit_code": EXIT_OK})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
