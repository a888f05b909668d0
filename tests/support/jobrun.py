"""Run the real job in a subprocess, as a container would, and read its JSON log lines back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
# what the child inherits from the developer's environment: nothing of AWS or QA_
_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def json_events(lines) -> list[dict]:
    """The JSON objects among a process's stdout lines (anything else is left to the checks of its logs)."""
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


@dataclass
class JobResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict]:
        return json_events(self.stdout.splitlines())

    def event(self, name: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == name]


def job_env(tmp: Path, model: Path, **settings: str) -> dict[str, str]:
    """A small, fast configuration: tiny model, test rows, local scratch under ``tmp``."""
    env = {
        "QA_RUN_ID": "test-run",
        "QA_MODEL_NAME": str(model),
        "QA_TRAIN_URI": str(DATA / "squad_v1_train_64.jsonl"),
        "QA_EVAL_URI": str(DATA / "squad_v1_dev_32.jsonl"),
        "QA_OUTPUT_URI": str(tmp / "out"),
        "QA_WORK_DIR": str(tmp / "work"),
        "QA_MAX_LENGTH": "128",
        "QA_DOC_STRIDE": "48",
        "QA_MAX_STEPS": "8",
        "QA_BATCH_SIZE": "8",
        "QA_LOGGING_STEPS": "2",
        "QA_CHECKPOINT_STEPS": "4",
        "QA_DATALOADER_WORKERS": "0",
        "QA_STORAGE_ATTEMPTS": "3",
        "QA_STORAGE_BACKOFF_SECONDS": "0.2",
        "QA_STORAGE_TIMEOUT_SECONDS": "5",
        "QA_LEASE_SECONDS": "10",
        # the ONNX export and its check add ~5 s to every published run: off here, on in tests/test_export.py
        "QA_EXPORT": "none",
    }
    env.update({k: str(v) for k, v in settings.items()})
    return env


def _child_env(env: dict[str, str]) -> dict[str, str]:
    full = {k: os.environ[k] for k in _KEEP if k in os.environ}
    full.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": str(ROOT), "AWS_EC2_METADATA_DISABLED": "true",
                 "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
    full.update(env)
    return full


def run_job(env: dict[str, str], module: str = "job", args: tuple[str, ...] = (), timeout: float = 300) -> JobResult:
    proc = subprocess.run([sys.executable, "-m", module, *args], env=_child_env(env), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    return JobResult(proc.returncode, proc.stdout, proc.stderr)


class RunningJob:
    """A job started in the background whose JSON events can be awaited while it runs."""

    def __init__(self, env: dict[str, str], module: str = "job", args: tuple[str, ...] = ()):
        import threading

        full = _child_env(env)
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], env=full, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._err: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink.append(line)

    def wait_for(self, event: str, timeout: float = 120, where=lambda e: True) -> dict:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") == event and where(entry):
                    return entry
            if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads[:1]):
                break
            time.sleep(0.05)
        raise AssertionError(f"no {event!r} event; exit {self.proc.poll()}; log tail: {''.join(self.lines[-20:])}{''.join(self._err[-5:])}")

    def finish(self, timeout: float = 300) -> JobResult:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for t in self._threads:
            t.join(5)
        return JobResult(self.proc.returncode, "".join(self.lines), "".join(self._err))
