"""One process per run id: a lease object in storage, taken with a conditional write and renewed.

The lease is ``<run>/lease.json``. Taking it is ``put IfNoneMatch=*``; renewing and taking over a
stale one are ``put IfMatch=<etag>``, so among racing processes exactly one write wins.

Who holds it is a random token made by each process, never a host name and pid: two containers
on one node can share both. Whether a holder is alive is decided by watching the lease object
over a monotonic interval, never by comparing clocks: a live holder rewrites it every third of
its TTL, so a lease unchanged for a whole TTL belongs to a dead or cut-off process. Its
``expires_at`` is written for people only; a clock ahead or behind by any amount changes nothing.

A holder that died on this machine in this work dir is recognised at once through the lock file
it kept locked (``flock``) while it lived: the kernel drops the lock when the process dies,
whatever PID namespace it was in. That proof is only accepted for the very file the holder
locked, on the very kernel it ran on (boot id, device, inode, all recorded in the lease): a
copied or restored work dir, or a network volume whose locks are local to each node, carries the
lock file's content but not its lock, and its holder may be alive elsewhere.

A holder that finds the lease changed or gone, or is refused by storage, has lost it: ``lost`` is
set and ``guard`` makes every further write raise, so it can no longer commit, prune or publish
anything. A holder that merely could not renew (storage down) keeps training, but its next write
first renews the lease with a compare-and-swap: if another process took it over meanwhile (only
possible after a whole unrenewed TTL), that renewal fails and the lease is lost before anything
is written.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from job import safe_json
from job.errors import RunLocked, StorageDenied, StorageUnavailable
from job.store.storage import NotFound, PreconditionFailed, Storage

log = logging.getLogger(__name__)
KEY = "lease.json"
LOCK_FILE = "lease.lock"
_MAX_WATCH_SECONDS = 3600.0  # a hostile or broken lease cannot make us watch it for longer


class LeaseLost(RunLocked):
    """This process no longer holds the run lease: another process may be writing the run."""


class Lease:
    def __init__(self, store: Storage, run_id: str, ttl_seconds: float, stop=None, lock_dir: Path | None = None):
        self.store, self.run_id, self.ttl, self.stop = store, run_id, ttl_seconds, stop
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed_at = 0.0
        self._renew_lock = threading.Lock()  # the renewal thread and a writer renewing on demand
        self._lock_dir = lock_dir
        self._lock_file = None
        self._lock_id = uuid.uuid4().hex
        self._lock_where: str | None = None  # boot id, device and inode of the lock file we hold
        self._previous_lock_id = ""

    def _body(self) -> bytes:
        lock = {"id": self._lock_id, "file": self._lock_where} if self._lock_file and self._lock_where else None
        return json.dumps({"holder": self.token, "lock": lock, "host": socket.gethostname(), "ttl_seconds": self.ttl,
                           "expires_at": time.time() + self.ttl}).encode()  # expires_at: for people, never trusted

    # ------------------------------------------------------------------ taking it
    def acquire(self) -> None:
        self._take_local_lock()
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
                self._release_local_lock()
                raise RunLocked(
                    f"QA_RUN_ID={self.run_id} is already running on {str(current.get('host'))[:64]} "
                    "(its lease is being renewed); wait for it to finish, or use another run id")
            try:
                self.etag = self.store.put_bytes(KEY, self._body(), if_match=etag)
                log.warning("took over a stale lease", extra={"event": "lease_takeover", "previous_host": str(current.get("host"))[:64]})
                break
            except PreconditionFailed:
                continue  # someone else renewed or took it over meanwhile: look again
        else:
            self._release_local_lock()
            raise RunLocked(f"QA_RUN_ID={self.run_id}: could not take the run lease")
        self._renewed_at = time.monotonic()
        log.info("lease taken", extra={"event": "lease", "ttl_seconds": self.ttl})
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renew", daemon=True)
        self._thread.start()

    def _take_local_lock(self) -> None:
        """Hold ``<work>/<run>/lease.lock`` while we live; a live holder in this work dir is known at once."""
        if self._lock_dir is None:
            return
        self._lock_dir.mkdir(parents=True, exist_ok=True)
        f = open(self._lock_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RunLocked(f"QA_RUN_ID={self.run_id} is already running in this work dir ({self._lock_dir}); "
                            "wait for it to finish, or use another run id") from None
        f.seek(0)
        self._previous_lock_id = f.read().strip()  # the id a dead holder of this work dir left behind
        f.seek(0)
        f.truncate()
        f.write(self._lock_id)
        f.flush()
        self._lock_file = f
        self._lock_where = _file_identity(f.fileno())

    def _release_local_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None

    def _holder_gone(self, current: dict, etag: str) -> bool:
        """True when the holder is dead: the lock file it held here is ours now, or the lease went unrenewed for a TTL."""
        lock = current.get("lock")
        if (self._lock_file is not None and self._lock_where and isinstance(lock, dict)
                and lock.get("id") == self._previous_lock_id and lock.get("file") == self._lock_where):
            return True  # we could just lock the very file it held locked while it lived: that process is gone
        ttl = current.get("ttl_seconds")
        watch = ttl if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and math.isfinite(ttl) and ttl > 0 else self.ttl
        watch = min(max(watch, 1.0), _MAX_WATCH_SECONDS)
        log.warning("lease held elsewhere; watching for renewals", extra={"event": "lease_wait", "seconds": round(watch, 1)})
        deadline = time.monotonic() + watch
        while time.monotonic() < deadline:
            if self._sleep(min(watch / 6, deadline - time.monotonic())):
                self.stop.check()
            try:
                _, now_etag = self.store.get_bytes(KEY)
            except NotFound:
                return True
            if now_etag != etag:
                return False  # renewed: the holder is alive
        return True

    def _sleep(self, seconds: float) -> bool:
        if self.stop is not None:
            return self.stop.wait(seconds)
        time.sleep(max(0.0, seconds))
        return False

    # ------------------------------------------------------------------ keeping it
    def _renew_loop(self) -> None:
        try:
            while not self._stop.wait(self.ttl / 3):
                if self._renew_once():
                    return
        except BaseException as exc:  # noqa: BLE001  a dead renewal thread must never go unnoticed
            self._lose(f"lease renewal crashed: {type(exc).__name__}")

    def _renew_once(self) -> bool:
        """One renewal; True once the lease is lost (the loop ends)."""
        try:
            self._renew()
        except LeaseLost:
            return True
        except Exception as exc:  # noqa: BLE001  storage down: keep training; writes renew first (ensure_held)
            log.warning("lease renewal failed", extra={"event": "lease_renew_failed", "error": str(exc)[:300]})
        return False

    def _renew(self) -> None:
        """Compare-and-swap our lease forward; LeaseLost when it is not ours any more, storage errors propagate."""
        with self._renew_lock:
            if self.lost.is_set():
                raise LeaseLost(f"QA_RUN_ID={self.run_id}: this process lost the run lease; it writes nothing more")
            sent_at = time.monotonic()
            try:
                self.etag = self.store.put_bytes(KEY, self._body(), if_match=self.etag)
                self._renewed_at = sent_at
            except PreconditionFailed:
                self._adopt_own_write(sent_at)
            except NotFound:
                self._lose("the lease was changed or removed by another process")
            except StorageDenied as exc:  # e.g. an expired token: we cannot prove we hold it any more
                self._lose(f"storage refused the lease renewal ({exc})")
            if self.lost.is_set():
                raise LeaseLost(f"QA_RUN_ID={self.run_id}: another process holds the run lease; this one writes nothing more")

    def _adopt_own_write(self, sent_at: float) -> None:
        # A write that landed but whose reply was lost (a reset, a timeout) is retried by the storage
        # layer, and that retry's If-Match then fails against our own new etag. Only this process
        # writes its token, so a lease still naming it is ours: take its etag, counted from the send.
        try:
            raw, etag = self.store.get_bytes(KEY)
        except NotFound:
            raw, etag = b"", None
        if _parse(raw).get("holder") == self.token:
            self.etag, self._renewed_at = etag, sent_at
        else:
            self._lose("the lease was changed or removed by another process")

    @property
    def fresh(self) -> bool:
        """Renewed within the last two thirds of the TTL: nobody can have taken it over since."""
        return time.monotonic() - self._renewed_at < 2 * self.ttl / 3

    def ensure_held(self) -> None:
        """Before any write: LeaseLost if lost; after a renewal gap, renew (CAS) first, so a thief is found out."""
        if self.lost.is_set() or not self.fresh:
            self._renew()  # raises LeaseLost when lost, before or by this renewal

    def _lose(self, why: str) -> None:
        if not self.lost.is_set():
            log.error("lease lost", extra={"event": "lease_lost", "reason": why})
            self.lost.set()

    def verify(self) -> None:
        """Before a commit point: raise LeaseLost unless the lease in storage is still ours."""
        self.ensure_held()
        try:
            raw, _ = self.store.get_bytes(KEY)
        except NotFound:
            raw = b""
        if _parse(raw).get("holder") != self.token:
            self._lose("the lease in storage names another holder")
            raise LeaseLost(f"QA_RUN_ID={self.run_id}: another process holds the run lease; this one writes nothing more")

    def guard(self, store: Storage) -> "FencedStorage":
        return FencedStorage(store, self)

    # ------------------------------------------------------------------ giving it back
    def release(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=max(0.0, min(timeout, 5.0)))
        try:
            if self.lost.is_set() or self.etag is None or timeout <= 0:
                return
            raw, _ = self.store.get_bytes(KEY)
            if _parse(raw).get("holder") == self.token:
                self.store.delete(KEY)
        except (NotFound, StorageUnavailable, StorageDenied):
            pass  # an unreleased lease is taken over once it goes unrenewed
        finally:
            self._release_local_lock()

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release(self.stop.time_left() if self.stop is not None and self.stop.requested else 5.0)


class FencedStorage:
    """The run's storage as seen by a lease holder: no write once the lease is lost.

    Bulk uploads check the ``lost`` flag (and renew first after a renewal gap); markers and deletes
    (the writes that make something count or disappear) also read the lease back and check it
    still names this process.
    """

    def __init__(self, store: Storage, lease: Lease):
        self._store, self._lease = store, lease
        self.uri = store.uri

    def __getattr__(self, name):  # reads (get_bytes, list, size, get_file, check_access) pass through
        return getattr(self._store, name)

    def put_file(self, local, key: str) -> None:
        self._lease.ensure_held()
        self._store.put_file(local, key)

    def put_bytes(self, key: str, data: bytes, **conditions) -> str:
        self._lease.verify()
        return self._store.put_bytes(key, data, **conditions)

    def delete(self, key: str) -> None:
        self._lease.verify()
        self._store.delete(key)


def _file_identity(fd: int) -> str | None:
    """``<boot id>:<device>:<inode>`` of an open file: the same only for this very file on this very kernel."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:  # shared by every container of a node
            boot = f.read().strip()
    except OSError:
        return None  # no way to tell this kernel from another: never take the shortcut
    st = os.fstat(fd)
    return f"{boot}:{st.st_dev}:{st.st_ino}" if boot else None


def _parse(raw: bytes) -> dict:
    try:
        value = safe_json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
