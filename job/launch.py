"""Several processes: ``python -m job.launch --nproc_per_node=4 [other torchrun options]``.

torchrun itself exits 1 whatever its workers exit with, and kills them 30 s after its own SIGTERM.
That would turn a preemption (143) or a data error (3) into a plain failure, and cut the
checkpoint upload short. This wrapper runs torchrun with the job as its module, forwards
SIGTERM/SIGINT, gives the workers the job's grace period, and exits with the workers' own code.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from job.errors import EXIT_CONFIG, EXIT_DATA, EXIT_OK, EXIT_PREEMPTED, EXIT_RUN_LOCKED, EXIT_UNAVAILABLE, EXIT_UNEXPECTED

EXIT_DIR_VARIABLE = "QAFT_LAUNCH_EXIT_DIR"  # not a QA_ setting: the workers' channel back to the launcher
# When workers disagree, the code that tells the operator most wins: a bad configuration or bad
# data explains everything else; a preemption explains the ranks torchrun then tore down.
_DEFAULT_GRACE, _MAX_GRACE = 120.0, 86_400.0  # QA_STOP_GRACE_SECONDS' default and ceiling (job/settings.py)
_PRIORITY = (EXIT_CONFIG, EXIT_DATA, EXIT_RUN_LOCKED, EXIT_PREEMPTED, EXIT_UNAVAILABLE, EXIT_UNEXPECTED)


def worker_code(codes: list[int], launcher_rc: int, stopped: bool) -> int:
    """The job's exit code from the workers' reported codes and torchrun's own exit status."""
    for code in _PRIORITY:
        if code in codes:
            return code
    if launcher_rc == 0 and codes and all(c == EXIT_OK for c in codes):
        return EXIT_OK
    return EXIT_PREEMPTED if stopped else (EXIT_UNEXPECTED if launcher_rc else EXIT_OK)


def shutdown_timeout(grace: str | None) -> str:
    """torchrun's wait for its workers after a signal: the job's grace period plus 30 s.

    The workers validate ``QA_STOP_GRACE_SECONDS`` (a bad one is their exit 2); the launcher only
    must not die on it first: "inf" or "1e400" once raised OverflowError here, "x" ValueError. An
    unusable value gets the default's timeout, and the workers then refuse it.
    """
    try:
        seconds = float(grace if grace is not None else _DEFAULT_GRACE)
    except ValueError:
        seconds = _DEFAULT_GRACE
    if not 0 < seconds <= _MAX_GRACE:
        seconds = _DEFAULT_GRACE
    return str(int(seconds + 30))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    entry = ["job"]
    if "--entry" in argv:  # "--entry MODULE ARGS...": tests run the job under a fault injector
        at = argv.index("--entry")
        argv, entry = argv[:at], argv[at + 1:]
    with tempfile.TemporaryDirectory(prefix="qa-launch-") as exit_dir:
        env = dict(os.environ, **{EXIT_DIR_VARIABLE: exit_dir})
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", shutdown_timeout(env.get("QA_STOP_GRACE_SECONDS")))
        child = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv, "-m", *entry], env=env)
        stopped = []

        def forward(signum, _frame):
            stopped.append(signum)
            child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        rc = child.wait()
        codes = [int(p.read_text()) for p in Path(exit_dir).glob("rank-*") if p.read_text().strip().isdigit()]
    code = worker_code(codes, rc, bool(stopped))
    print(f"qa-finetune launch: workers exited {sorted(codes)}, torchrun {rc}: exit {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
