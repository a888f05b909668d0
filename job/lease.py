"""One process per run id: a lease object in storage, taken with a conditional write and renewed.

The lease is ``<run>/lease.json``. Taking it is ``put IfNoneMatch=*``; renewing and taking over a
stale one are ``put IfMatch=<etag>``, so among racing processes exactly one write wins. A holder
that stops renewing (killed, partitioned) loses the lease once ``expires_at`` has passed.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from job.errors import RunLocked, StorageUnavailable
from job.storage import NotFound, PreconditionFailed, Storage

log = logging.getLogger(__name__)
KEY = "lease.json"


class Lease:
    def __init__(self, store: Storage, run_id: str, ttl_seconds: float):
        self.store, self.run_id, self.ttl = store, run_id, ttl_seconds
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires_at": time.time() + self.ttl}).encode()

    def acquire(self) -> None:
        for _ in range(4):  # the lease may change or vanish between our failed create and our read
            try:
                self.etag = self.store.put_bytes(KEY, self._body(), if_none_match=True)
                break
            except PreconditionFailed:
                pass
            try:
                raw, etag = self.store.get_bytes(KEY)
            except NotFound:
                continue
            current = _parse(raw)
            if current.get("holder") == self.token:  # our own create, retried after a lost reply
                self.etag = etag
                break
            if not self._holder_gone(current, etag):
                raise RunLocked(
                    f"QA_RUN_ID={self.run_id} is already running on {current.get('host')} (pid {current.get('pid')}); "
                    "wait for it to finish, or use another run id")
            try:
                self.etag = self.store.put_bytes(KEY, self._body(), if_match=etag)
                log.warning("took over a stale lease", extra={"event": "lease_takeover", "previous_host": current.get("host"),
                                                              "previous_pid": current.get("pid")})
                break
            except PreconditionFailed:
                continue  # someone else renewed or took it over meanwhile: look again
        else:
            raise RunLocked(f"QA_RUN_ID={self.run_id}: could not take the run lease")
        log.info("lease taken", extra={"event": "lease", "ttl_seconds": self.ttl})
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()

    def _holder_gone(self, current: dict, etag: str) -> bool:
        """True when the holder is dead: a dead pid on this host, or no renewal until expiry.

        A live holder renews every ttl/3, so a lease unchanged after ttl/2 belongs to a process
        that was killed; we then wait for its expiry rather than exit and burn a Job retry.
        """
        if current.get("host") == socket.gethostname() and (current.get("pid") == os.getpid() or not _alive(current.get("pid"))):
            return True  # same machine (or container restarted in place): that process is gone
        if current.get("expires_at", 0) <= time.time():
            return True
        time.sleep(self.ttl / 2)
        try:
            raw, now_etag = self.store.get_bytes(KEY)
        except NotFound:
            return True
        if now_etag != etag:
            return False  # renewed: the holder is alive
        wait = _parse(raw).get("expires_at", 0) - time.time()
        log.warning("lease not renewed, waiting for it to expire", extra={"event": "lease_wait", "seconds": round(max(wait, 0), 1)})
        time.sleep(max(wait, 0) + 0.5)
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.etag = self.store.put_bytes(KEY, self._body(), if_match=self.etag)
            except PreconditionFailed:
                log.error("lease lost to another process", extra={"event": "lease_lost"})
                self.lost.set()
                return
            except StorageUnavailable as exc:  # keep training; the next renewal may get through
                log.warning("lease renewal failed", extra={"event": "lease_renew_failed", "error": str(exc)})

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.lost.is_set() or self.etag is None:
            return
        try:
            raw, _ = self.store.get_bytes(KEY)
            if _parse(raw).get("holder") == self.token:
                self.store.delete(KEY)
        except (NotFound, StorageUnavailable):
            pass  # an expired lease is taken over anyway

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse(raw: bytes) -> dict:
    try:
        return json.loads(raw)
    except ValueError:
        return {}
