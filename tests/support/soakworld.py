"""The soak's world: a real SeaweedFS behind the fault proxy, data that grows, job processes with faults.

``World`` owns the server (its own, with credentials made for the soak so they can be looked
for), a ``FaultProxy`` every job process reaches storage through, the tiny model, and the data
prefixes. ``World.start`` runs one of the job's commands as a subprocess with its faults:

- at a named point inside the process (``tests.support.killer``: SIGKILL or SIGTERM at the n-th
  upload, step, pointer write...): the same point on every replay;
- when the process logs its n-th event of a kind (a storage outage or the server stopped for some
  seconds, connections reset, replies lost, uploads cut, latency): replays as closely as the
  log lines arrive;
- after a delay (SIGKILL or SIGTERM "at any time"): replays only approximately;
- a clock off by minutes (libfaketime, ``faketime`` package, with a ``time.sleep`` it does not
  break) and a scratch disk that fills up (a small tmpfs, root only) are set up around the process
  by the caller (``faketime_env``, ``Tmpfs``).

``World.snapshot`` reads everything under the output prefix straight from the server (never
through the proxy) into a ``tests.support.snapshot.Snapshot``; objects are fetched once per
ETag, so a step costs what it changed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.faultproxy import FaultProxy
from tests.support.snapshot import Obj, Snapshot, make_obj
from tests.support.jobrun import ROOT, _child_env, json_events
from tests.support.seaweed import SeaweedServer
from tests.support.tiny import build_tiny_model

BUCKET = "soak"
OUT = "out"
HUNG_SECONDS = 600.0  # a process running this long is hung: killed, and reported


def faketime_lib() -> str | None:
    """Debian's libfaketime (``apt-get install faketime``; .ci/setup installs it where it can), in its variant
    for multi-threaded programs (the job has threads: lease renewal, uploads, torch, tokenizers)."""
    return next((str(p) for p in sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))), None)


# libfaketime 0.9.10 breaks clock_nanosleep on the real monotonic clock (EINVAL: Python's time.sleep), and
# faking that clock too makes every timed wait (Event.wait, Lock.acquire) overshoot by the offset. So the
# monotonic clock stays real and time.sleep waits on an Event instead, before the job imports anything.
_SLEEP_SHIM = """import threading
import time


def _sleep(seconds):  # the soak's clock fault: libfaketime cannot sleep on the real monotonic clock
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    threading.Event().wait(seconds)


time.sleep = _sleep
"""


def faketime_env(minutes: float, site: Path) -> dict[str, str]:
    """This process's wall clock off by ``minutes`` (its monotonic clock untouched, as on a skewed host);
    ``site``: a folder for the ``sitecustomize`` that gives it a working ``time.sleep``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_SLEEP_SHIM)
    return {"LD_PRELOAD": faketime_lib() or "", "FAKETIME": f"{minutes:+.0f}m", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_DONT_RESET": "1", "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


class Tmpfs:
    """A scratch folder of ``megabytes`` on its own tmpfs: writes past that fail with ENOSPC."""

    def __init__(self, path: Path, megabytes: float):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass
class Fault:
    """One fault of one process. ``kind``: kill, term (at ``hook``, a killer point, or ``after`` seconds);
    outage, down, resets, lost, cut, latency (when the process logs its ``nth`` ``event``, for ``seconds``)."""

    kind: str
    hook: str = ""  # killer spec, e.g. "put_file:optimizer.pt@2"
    after: float = 0.0
    event: str = ""
    nth: int = 1
    seconds: float = 0.0
    amount: float = 0.0
    fired: bool = False

    def describe(self) -> str:
        if self.hook:
            return f"{self.kind}@{self.hook}"
        if self.kind in ("clock", "disk"):
            return f"clock {self.amount:+g} min" if self.kind == "clock" else f"disk of {self.amount:g} MB"
        if self.event:
            what = f"{self.kind}({self.amount:g})" if self.amount else self.kind
            return f"{what} at {self.event}#{self.nth}" + (f" for {self.seconds:.0f}s" if self.seconds else "")
        return f"{self.kind} after {self.after:.1f}s"


@dataclass
class Running:
    label: str
    proc: subprocess.Popen
    faults: list[Fault]
    lines: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    signalled: list[int] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    hung: bool = False
    tmpfs: "Tmpfs | None" = None  # its scratch, when it had a small one of its own
    finished: bool = False

    def events(self) -> list[dict]:
        return json_events(self.lines)


class World:
    def __init__(self, root: Path, tag: str):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # credentials made for this soak: any object or log line holding them leaked a secret
        self.secrets = {"AWS_ACCESS_KEY_ID": f"SOAKKEY{tag}", "AWS_SECRET_ACCESS_KEY": f"soakSecret{tag}x9",
                        "HF_TOKEN": f"hf_soakToken{tag}"}
        self.server = SeaweedServer(root / "seaweed", access_key=self.secrets["AWS_ACCESS_KEY_ID"],
                                    secret_key=self.secrets["AWS_SECRET_ACCESS_KEY"]).start()
        self.proxy = FaultProxy(self.server.host, self.server.port)
        self.client = self.server.client()
        self.client.create_bucket(Bucket=BUCKET)
        self.model = build_tiny_model(root / "tiny")
        self._cache: dict[tuple[str, str], Obj] = {}
        self._down = threading.Lock()

    # ------------------------------------------------------------------ places
    @property
    def output(self) -> str:
        return f"s3://{BUCKET}/{OUT}"

    def uri(self, key: str) -> str:
        return f"s3://{BUCKET}/{key}"

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=BUCKET, Key=key, Body=body)

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def delete_prefix(self, prefix: str) -> None:
        for key in self.keys(prefix):
            self.client.delete_object(Bucket=BUCKET, Key=key)

    def download(self, prefix: str, dest: Path) -> bool:
        """Every object under ``prefix`` into ``dest`` (relative names); False when there is none."""
        keys = self.keys(prefix)
        for key in keys:
            path = dest / key[len(prefix):]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.get(key) or b"")
        return bool(keys)

    def env(self, through_proxy: bool = True) -> dict[str, str]:
        """What every process of the job gets: credentials (and a token) from the environment, the endpoint."""
        return {**self.secrets, "AWS_DEFAULT_REGION": self.server.region, "AWS_EC2_METADATA_DISABLED": "true",
                "QA_S3_ENDPOINT_URL": self.proxy.endpoint if through_proxy else self.server.endpoint,
                "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash leaves its Python stack on stderr

    # ------------------------------------------------------------------ processes
    def start(self, label: str, env: dict[str, str], module: str = "job", args: tuple[str, ...] = (),
              faults: list[Fault] = (), killer: str = "") -> Running:
        """Start ``python -m module args`` (under the killer when ``killer`` or a hook fault asks for it)."""
        faults = list(faults)
        spec = ",".join([s for s in (killer, *(f"{f.kind}:{f.hook}" for f in faults if f.hook)) if s])
        if spec:
            argv = [sys.executable, "-m", "tests.support.killer", spec, *([module] if module != "job" else []), *args]
        else:
            argv = [sys.executable, "-m", module, *args]
        proc = subprocess.Popen(argv, env=_child_env(env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace")
        run = Running(label, proc, faults)
        pumps = [threading.Thread(target=self._pump, args=(run, proc.stdout, run.lines), daemon=True),
                 threading.Thread(target=self._pump, args=(run, proc.stderr, run.err), daemon=True)]
        for t in pumps:
            t.start()
        run.threads += pumps
        for fault in faults:
            if fault.kind in ("kill", "term") and not fault.hook:
                timer = threading.Timer(fault.after, self.fire, args=(run, fault))
                timer.daemon = True
                timer.start()
                run.threads.append(timer)
        return run

    def _pump(self, run: Running, stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            if sink is not run.lines:
                continue
            try:
                entry = json.loads(line)
                name = entry.get("event")
            except (ValueError, AttributeError):
                continue
            run.counts[name] = run.counts.get(name, 0) + 1
            if name == "fault_injected":  # the killer's own signal, at its point, is about to arrive
                hooked = next((f for f in run.faults if f.hook and f.kind == entry.get("verb") and not f.fired), None)
                if hooked is not None:
                    hooked.fired = True
                run.signalled.append(9 if entry.get("verb") == "kill" else 15)
            for fault in run.faults:
                if fault.event == name and run.counts[name] == fault.nth and not fault.fired:
                    self.fire(run, fault)

    def fire(self, run: Running, fault: Fault) -> None:
        if run.proc.poll() is not None or fault.fired:
            return
        fault.fired = True
        if fault.kind in ("kill", "term"):
            sig = signal.SIGKILL if fault.kind == "kill" else signal.SIGTERM
            run.signalled.append(int(sig))
            run.proc.send_signal(sig)
            return
        if fault.kind == "down":
            thread = threading.Thread(target=self._server_down, args=(fault.seconds,), daemon=True)
        else:
            {"outage": self.proxy.blackhole, "resets": lambda: self.proxy.reset_next(int(fault.amount)),
             "lost": lambda: self.proxy.lose_next_replies(int(fault.amount)),
             "cut": lambda: self.proxy.reset_after_bytes(int(fault.amount)),
             "latency": lambda: self.proxy.latency(fault.amount)}[fault.kind]()
            thread = threading.Timer(fault.seconds, self.proxy.pass_through) if fault.seconds else None
        if thread is not None:
            thread.daemon = True
            thread.start()
            run.threads.append(thread)

    def _server_down(self, seconds: float) -> None:
        with self._down:
            self.server.stop()
            time.sleep(seconds)
            self.server.start()

    def finish(self, run: Running, timeout: float = HUNG_SECONDS) -> Running:
        """Wait for the process (killed as hung after ``timeout``), end its faults, keep its output; once."""
        if run.finished:
            return run
        run.finished = True
        try:
            run.proc.wait(max(1.0, timeout - (time.monotonic() - run.started)))
        except subprocess.TimeoutExpired:
            run.hung = True
            run.proc.kill()
            run.proc.wait()
        for t in run.threads:
            if isinstance(t, threading.Timer):
                t.cancel()
        for t in run.threads:
            t.join(60)
        self.heal()
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        stem = f"{len(list(logs.iterdir())) // 2:04d}-{run.label.replace('#', '.')}"
        (logs / f"{stem}.out").write_text("\n".join(run.lines))
        (logs / f"{stem}.err").write_text("\n".join(run.err) + f"\nexit {run.proc.returncode}\n")
        return run

    def heal(self) -> None:
        """Storage as it should be between steps: the server up, the proxy passing everything."""
        with self._down:
            if not self.server.running:
                self.server.start()
        self.proxy.pass_through()

    # ------------------------------------------------------------------ storage as a reader sees it
    def snapshot(self, step: int) -> Snapshot:
        """Every object under the output prefix: sizes, sha256, small bodies, secrets found (fetched once per ETag)."""
        objects = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{OUT}/")
        for page in pages:
            for o in page.get("Contents", []):
                cache_key = (o["Key"], o["ETag"])
                if cache_key not in self._cache:
                    body = self.get(o["Key"])
                    if body is None:
                        continue  # deleted since the listing
                    self._cache[cache_key] = make_obj(body, self.secrets)
                objects[o["Key"][len(OUT) + 1:]] = self._cache[cache_key]
        return Snapshot(step, objects)

    def close(self) -> None:
        self.proxy.close()
        self.server.close()
