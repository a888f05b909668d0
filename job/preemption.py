"""SIGTERM / SIGINT turn into a request to checkpoint at the next step boundary and exit 143.

Kubernetes sends SIGTERM on preemption, eviction and ``kubectl delete``, then SIGKILL after the
pod's grace period. The handler only records the request; the training callback acts on it, so
the checkpoint is taken between steps, never in the middle of an optimizer update.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger(__name__)


class StopRequest:
    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.event = threading.Event()
        self.deadline: float | None = None
        self.signal_name = ""

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.event.is_set():
            return
        self.signal_name = signal.Signals(signum).name
        self.deadline = time.monotonic() + self.grace_seconds
        self.event.set()
        log.warning("stop requested", extra={"event": "stop_requested", "signal": self.signal_name,
                                             "grace_seconds": self.grace_seconds})

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic()) if self.deadline else self.grace_seconds
