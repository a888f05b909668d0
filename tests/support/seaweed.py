"""A real S3 server for tests: SeaweedFS ``weed mini`` bound to 127.0.0.1 only.

Real, because commit markers and leases depend on conditional writes (IfNoneMatch/IfMatch) and
on wrong credentials being refused; a hand-rolled fake would agree with whatever we assumed.
"""
from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# weed always listens on admin.port + 10000 for the admin gRPC; passing -admin.port.grpc breaks
# mini (NOTES), so that port is chosen by choosing admin.port.
_ADMIN_GRPC_OFFSET = 10000
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "webdav.port", "debug.port", "s3.debug.port",
)
_FIXED_FLAGS = (
    "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-s3.port.iceberg=0",
    "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-volume.preStopSeconds=0",
)
_LIVE: "weakref.WeakSet[SeaweedServer]" = weakref.WeakSet()


def _pick_ports() -> dict[str, int]:
    # Ports below the kernel's ephemeral range: client sockets and port-0 listeners (FaultProxy)
    # are never handed these, so a server stopped for a while gets its own ports back.
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = low if low >= 16000 else 32768  # odd kernel setting: accept a small collision risk
    pool, rng, held = range(low - 12000, low), random.SystemRandom(), []

    def grab(port: int) -> bool:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            return False
        held.append(s)  # held until all are chosen, so no port is picked twice
        return True

    try:
        while not (grab(admin := rng.randrange(pool.start, pool.stop - _ADMIN_GRPC_OFFSET))
                   and grab(admin + _ADMIN_GRPC_OFFSET)):
            pass
        ports = {"admin.port": admin}
        for flag in _PORT_FLAGS:
            while not grab(port := rng.randrange(pool.start, pool.stop)):
                pass
            ports[flag] = port
        return ports
    finally:
        for s in held:
            s.close()


class SeaweedServer:
    """One ``weed mini``; ``stop()`` then ``start()`` reuses the same ports and data."""

    region = "us-east-1"
    host = "127.0.0.1"

    def __init__(self, data_dir: str | os.PathLike | None = None, *, start_timeout: float = 30.0,
                 access_key: str = "qa-test-admin", secret_key: str = "qa-test-secret-0123456789"):
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="seaweed-"))
        self.store_dir = self.data_dir / "store"
        self.log_path = self.data_dir / "weed.log"
        self.config_path = self.data_dir / "s3.json"
        self.access_key, self.secret_key = access_key, secret_key
        self.start_timeout = start_timeout
        self.ports: dict[str, int] | None = None
        self._proc: subprocess.Popen | None = None
        if self.store_dir.exists():
            raise ValueError(f"{self.store_dir} exists: weed mini reloads mini.options from it")

    @property
    def port(self) -> int:
        if self.ports is None:
            raise RuntimeError("server never started")
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "SeaweedServer":
        if self.running:
            raise RuntimeError("already running")
        restart = self.ports is not None  # a restart keeps its ports and its data
        for attempt in range(3):
            if not restart:
                self.ports = _pick_ports()
                shutil.rmtree(self.store_dir, ignore_errors=True)
            try:
                self._launch()
                return self
            except RuntimeError as e:  # a port taken between picking and binding: pick again
                if restart or attempt == 2 or "Port allocation failed" not in str(e):
                    raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir(exist_ok=True)
        self.config_path.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        # Every option on every start: weed saves them to store/mini.options and reloads that file,
        # but explicit flags win over it, so a restart cannot pick up anything stale.
        # the venv's bin/ first: pip puts weed there, and the venv may not be activated
        weed = shutil.which("weed", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
        args = [weed or "weed", "-logtostderr=true", "mini", f"-dir={self.store_dir}",
                f"-s3.config={self.config_path}", *_FIXED_FLAGS,
                *(f"-{flag}={port}" for flag, port in self.ports.items())]
        # the server must not pick up credentials or buckets from the caller's AWS_/S3_ variables
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(args)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(args, cwd=self.data_dir, env=env, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _LIVE.add(self)
        probe = self.client(connect_timeout=1, read_timeout=2, retries={"total_max_attempts": 1})
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self.stop()
                raise RuntimeError(f"weed mini exited with {rc}:\n{self.log_tail()}")
            try:
                probe.list_buckets()  # signed: proves S3, filer and the identity file are up
                if self._volumes_registered():
                    return
            except (BotoCoreError, ClientError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"S3 not ready after {self.start_timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def _volumes_registered(self) -> bool:
        # S3 answers before the master has the volume server: its first heartbeat can reach the
        # master before it elects itself and is retried seconds later. Until then writes find no
        # volume and, after a restart, reads of old objects fail with 500 InternalError.
        master = f"http://{self.host}:{self.ports['master.port']}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{master}/dir/status", timeout=2) as r:
                if not json.load(r)["Topology"].get("Max"):  # 0 until a volume server joined
                    return False
            for dat in self.store_dir.glob("*.dat"):  # "<id>.dat" or "<collection>_<id>.dat"
                opener.open(f"{master}/dir/lookup?volumeId={dat.stem.rsplit('_', 1)[-1]}",
                            timeout=2).close()  # 404 while that volume is unknown
        except (OSError, ValueError, KeyError):
            return False
        return True

    def stop(self, timeout: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:  # never signal a pid that was already reaped (and reused)
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: reaches anything it forks
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        except ProcessLookupError:
            pass
        finally:
            _LIVE.discard(self)
            # weed leaves its unix sockets in /tmp, named after our ports
            for port in [*self.ports.values(), self.ports["admin.port"] + _ADMIN_GRPC_OFFSET]:
                for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def client(self, endpoint: str | None = None, *, secret_key: str | None = None, **config):
        """A boto3 S3 client; ``config`` overrides botocore ``Config`` fields (retries, timeouts)."""
        settings = dict(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                        response_checksum_validation="when_required", proxies={},  # never a proxy
                        connect_timeout=5, read_timeout=30)
        settings.update(config)
        return boto3.session.Session().client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=Config(**settings))

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _stop_leftovers() -> None:  # a crashed or interrupted session must not leave weed running
    for server in list(_LIVE):
        server.close()
