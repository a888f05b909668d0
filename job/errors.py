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


class Diverged(JobError):
    """Training left the model with NaN or infinite weights, or its scores are not finite: nothing is
    published and no channel moves. The same run id would diverge again (the run is deterministic),
    so this is the settings' exit code: change them (learning rate, precision, temperature) and
    start under a new run id."""

    exit_code = EXIT_CONFIG


class StoppedUncommitted(JobError):
    """Stopped by a signal before the checkpoint taken for the stop reached storage: progress since the last one is lost."""

    exit_code = EXIT_UNAVAILABLE
