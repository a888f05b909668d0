"""SIGTERM / SIGINT turn into a request to stop at the next safe point, with one shared deadline.

Kubernetes sends SIGTERM on preemption, eviction and ``kubectl delete``, then SIGKILL after the
pod's grace period. The handler only records the request; training checkpoints at the next step
boundary, evaluation and publishing stop between batches or files, and a lease wait wakes up.
Everything after the signal (upload wait, lease release, thread joins) shares one deadline,
``QA_STOP_GRACE_SECONDS`` after the signal; a watchdog ends the process at that deadline if a
step is stuck (a network partition can hold a storage call far longer), so the exit code is ours,
not the kubelet's SIGKILL.

The handler is installed first thing in ``python -m job``. After the first signal every later one
is ignored by the kernel itself (``SIG_IGN``) until the process exits with its own code: a Python
handler alone is not enough, because the interpreter puts the default action back for the
handlers it installed when it shuts down, and a Ctrl-C pressed again then ended the process
with 130 after it had printed "(exit 143)". Forked preprocessing workers inherit the handler;
in them it does nothing (a Ctrl-C reaches the whole process group): the job decides, once.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

from job.errors import EXIT_PREEMPTED, EXIT_UNAVAILABLE, Preempted, StoppedUncommitted

log = logging.getLogger(__name__)
WATCHDOG_MARGIN_SECONDS = 1.0  # after the deadline: time for the last log line to be written


class StopRequest:
    def __init__(self, grace_seconds: float = 120.0, on_deadline=None):
        self.grace_seconds = grace_seconds
        self.event = threading.Event()
        self.deadline: float | None = None
        self.signal_name = ""
        # None: no checkpoint was due when the stop came; True/False: whether it reached storage
        self.committed: bool | None = None
        self._on_deadline = on_deadline or exit_now
        self._pid = os.getpid()  # the process the stop is for; forked children only inherit the handler

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def configure(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds

    def _handle(self, signum, _frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked worker's copy: the stop is the job's, not the worker's
        for later in (signal.SIGTERM, signal.SIGINT):  # dropped by the kernel from now on, shutdown included
            signal.signal(later, signal.SIG_IGN)
        self.request(signal.Signals(signum).name)

    def request(self, cause: str) -> None:
        """A stop from ``cause`` (a signal's name, or another process's stop under torchrun), with its own deadline."""
        if self.event.is_set():
            return  # a signal that beat SIG_IGN, or a second cause: the first one's deadline holds
        self.signal_name = cause
        self.deadline = time.monotonic() + self.grace_seconds
        self.event.set()
        if logging.getLogger().handlers:  # before logging is set up, the failed line will say it all
            log.warning("stop requested", extra={"event": "stop_requested", "signal": self.signal_name,
                                                 "grace_seconds": self.grace_seconds})
        threading.Thread(target=self._watchdog, name="stop-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        time.sleep(self.grace_seconds + WATCHDOG_MARGIN_SECONDS)
        self._on_deadline(self)

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic()) if self.deadline else self.grace_seconds

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True (at once) when a stop is requested."""
        return self.event.wait(max(0.0, seconds))

    def checkpoint_committed(self, committed: bool) -> None:
        self.committed = committed

    @property
    def exit_code(self) -> int:
        # 143 promises that a rerun loses nothing the job had saved; say so only when it is true
        return EXIT_UNAVAILABLE if self.committed is False else EXIT_PREEMPTED

    def check(self) -> None:
        """Raise the stop as an exception at a safe point; nothing when no stop was requested."""
        if not self.requested:
            return
        if self.committed is False:
            raise StoppedUncommitted(f"stopped by {self.signal_name} before the last checkpoint reached storage; "
                                     "a rerun with the same QA_RUN_ID resumes from the previous committed one")
        raise Preempted(f"stopped by {self.signal_name}; rerun with the same QA_RUN_ID to resume")


def exit_now(stop: StopRequest, report=lambda code: code, say=lambda message, code: None,
             rerun: str = "rerun with the same QA_RUN_ID to resume") -> None:
    """The grace period is over and the job has not finished stopping: log, ``say`` the one error line
    (the entry point's printer: this layer sits below the console), ``report`` the code and leave at once.
    ``rerun``: how this entry point resumes (the training job by its run id)."""
    code = stop.exit_code
    message = (f"stopped by {stop.signal_name}: the {stop.grace_seconds:g} s grace period (QA_STOP_GRACE_SECONDS) "
               f"ran out before the job finished stopping; {rerun}")
    try:
        log.error(message, extra={"event": "failed", "exit_code": code, "error_type": "GraceExpired"})
        say(message, code)
        for handler in logging.getLogger().handlers:
            handler.flush()
        report(code)
    finally:
        os._exit(code)
