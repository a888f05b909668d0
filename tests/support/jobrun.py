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


@dataclass
class JobResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict]:
        out = []
        for line in self.stdout.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

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
    }
    env.update({k: str(v) for k, v in settings.items()})
    return env


def run_job(env: dict[str, str], module: str = "job", args: tuple[str, ...] = (), timeout: float = 300) -> JobResult:
    full = {k: os.environ[k] for k in _KEEP if k in os.environ}
    full.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                 "PYTHONPATH": str(ROOT), "AWS_EC2_METADATA_DISABLED": "true",
                 "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
    full.update(env)
    proc = subprocess.run([sys.executable, "-m", module, *args], env=full, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    return JobResult(proc.returncode, proc.stdout, proc.stderr)
