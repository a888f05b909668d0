"""The soak's checks of what a step did: each process (exit code, error line, log lines, secrets), runs retried
to the end, leases let go, resumed weights against a fault-free reference, answers through every channel.

Pure functions of what the soak recorded (``Proc``) and of a ``tests.support.snapshot.Snapshot``;
each returns ``[(invariant, problem)]``. Each is unit-tested on a case that breaks it (tests/test_soak.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping

from tests.support.snapshot import Snapshot


@dataclass
class Proc:
    """One process the soak ran, as its checks see it."""

    label: str
    kind: str  # "job" (python -m job), "channel" (python -m job.channel), "answer" (python -m job.answer)
    code: int  # exit code; -N: killed by signal N
    stdout: str
    stderr: str
    signalled: tuple[int, ...] = ()  # signals the soak sent or had the killer send (9, 15)
    refusals: tuple[str, ...] = ()  # regexes of the exit-2/3/4 messages this operation may legitimately end with


DOCUMENTED = {0, 2, 3, 4, 75, 143}
ERROR_LINE = re.compile(r"qa-finetune(?: channel| answer)?: error: (.*) \(exit (\d+)\)")


def check_process(proc: Proc, secrets: Mapping[str, str]) -> list[tuple[str, str]]:
    """``[(invariant, problem)]`` for one process: exit code, error line, log lines, secrets."""
    out = []
    code = proc.code
    if code < 0:
        # the job turns SIGTERM into its own exit code (README "Exit codes"); the command lines promise
        # nothing of the kind, and their moves are single conditional writes: they may die of it
        allowed = {9} if proc.kind == "job" else {9, 15}
        if -code not in proc.signalled or -code not in allowed:
            out.append(("exit_codes_documented", f"{proc.label}: died of signal {-code} (only an injected SIGKILL may"
                        f"{', or a SIGTERM sent to a command line' if proc.kind != 'job' else ''})"))
    elif code not in DOCUMENTED:
        out.append(("exit_codes_documented", f"{proc.label}: exit {code}, not in the README's table"
                    + (f": {_last_error(proc.stderr)}" if _last_error(proc.stderr) else "")))
    elif code == 143 and 15 not in proc.signalled:
        out.append(("exit_codes_documented", f"{proc.label}: exit 143 without a SIGTERM"))
    if code > 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        match = ERROR_LINE.fullmatch(lines[-1]) if lines else None
        if match is None or int(match.group(2)) != code:
            out.append(("one_error_line", f"{proc.label}: exit {code} without its error line on stderr "
                        f"(last: {lines[-1][:200] if lines else 'nothing'})"))
        elif code in (2, 3, 4) and not any(re.search(r, match.group(1)) for r in proc.refusals):
            out.append(("refusals_expected", f"{proc.label}: exit {code}: {match.group(1)[:300]}"))
    if proc.kind == "job":
        for n, line in enumerate(proc.stdout.splitlines(), 1):
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok:
                out.append(("log_lines_json", f"{proc.label}: stdout line {n} is not a JSON object: {line[:160]!r}"))
                break
    elif proc.kind in ("channel", "answer") and code == 0:
        try:
            json.loads(proc.stdout)
        except ValueError:
            out.append(("log_lines_json", f"{proc.label}: printed no JSON: {proc.stdout[:160]!r}"))
    for name, value in secrets.items():
        for stream, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            if value and value in text:
                out.append(("no_secret_in_logs", f"{proc.label}: {stream} contains the value of {name}"))
    return out


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def retries_converged(label: str, codes: list[int], settled: bool) -> list[tuple[str, str]]:
    """A run retried as a Kubernetes Job would be ends: its last attempt, given without faults, must settle it
    (exit 0, or a documented refusal), never leave it needing another retry."""
    if settled:
        return []
    return [("retries_converge", f"{label}: attempts ended {codes}; the last, without faults, did not settle the run")]


def same_as_reference(run: str, model_sha256: str, reference_sha256: str) -> list[tuple[str, str]]:
    """A run resumed after faults ends with the weights of the same run without faults (README: bit for bit on CPU)."""
    if model_sha256 == reference_sha256:
        return []
    return [("resumed_equals_reference", f"run {run}: model.safetensors {model_sha256[:12]} differs from the "
             f"fault-free reference's {reference_sha256[:12]}")]


def leases_released(cur: Snapshot, settled: list[str]) -> list[tuple[str, str]]:
    """A run whose last process ended (exit 0, or refused with 2 or 3) holds no lease: ``lease.json`` is there
    only while a process works on the run (README), and retention never touches a run that has one."""
    return [("leases_released", f"run {run}: lease.json left behind after its last process ended")
            for run in sorted(set(settled)) if cur.has(f"{run}/lease.json")]


def answers_through_every_channel(results: Mapping[str, tuple[int, str]]) -> list[tuple[str, str]]:
    """``job.answer --channel C`` answers through every channel: ``results`` maps a channel to (exit code, error)."""
    return [("answers_through_every_channel", f"channel {channel}: job.answer exit {code}: {error}")
            for channel, (code, error) in sorted(results.items()) if code != 0]
