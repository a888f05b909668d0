"""The soak's machinery (``bench/soak.py``): its state, data drops, faults drawn per process, and retries.

An operation (``_soak_steps``) runs the job's real commands in subprocesses (``tests.support.soakworld``), gives
each process the faults drawn for it, and retries a run as a Kubernetes Job with a
``podFailurePolicy`` would (k8s/base/job.yaml): 143 is retried without counting, 2 and 3 fail
for good, anything else (75, 4, 1, SIGKILL) is retried while ``BACKOFF_LIMIT`` allows; the last
attempt is given no faults, so it must settle the run. What may be drawn never depends on what
an earlier step's processes did (only on the seed), so a seed replays the same schedule.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.outcomes import Proc
from tests.support.jobrun import DATA, ROOT
from tests.support.soakworld import Fault, Tmpfs, World, can_mount, faketime_env, faketime_lib

CHANNELS = ("alpha", "beta")
GATES = {"alpha": ("f1", 0.0, 5.0), "beta": ("f1", 0.0, 100.0)}  # metric, QA_GATE_MIN, QA_GATE_MAX_DROP
SEEDS = {"alpha": 1, "beta": 2}
KEEP_RUNS = 2
BACKOFF_LIMIT = 3  # failed attempts (143 not counted) before the Job gives up
MAX_ATTEMPTS = 6
ROWS_PER_DROP = 8
BASE = {  # every night's settings: the tiny model, little data, short leases, frequent checkpoints
    "QA_MAX_LENGTH": "128", "QA_DOC_STRIDE": "48", "QA_MAX_STEPS": "8", "QA_BATCH_SIZE": "4",
    "QA_LEARNING_RATE": "1e-2", "QA_LOGGING_STEPS": "2", "QA_CHECKPOINT_STEPS": "2", "QA_CHECKPOINTS_TO_KEEP": "2",
    "QA_DATALOADER_WORKERS": "0", "QA_PREPROCESS_WORKERS": "1", "QA_STORAGE_ATTEMPTS": "3",
    "QA_STORAGE_BACKOFF_SECONDS": "0.2", "QA_STORAGE_TIMEOUT_SECONDS": "5", "QA_LEASE_SECONDS": "10",
    "QA_STOP_GRACE_SECONDS": "30", "QA_KEEP_RUNS": str(KEEP_RUNS), "QA_TRAIN_SELECT": "newest:2",
    "QA_WARM_START_LIMIT": "3", "QA_LOG_FORMAT": "json", "QA_REPORT_TO": "tensorboard",
}
SLOW_STEPS = "slow:train_step=0.25"  # sleeps, the maths unchanged (tests.support.killer)
LEASE = r"lease|already running"
# exit 2/3 messages an operation may end with, by what it is (anything else is reported)
REFUSALS = {
    "warm": (r"starts from run .*'s model, which is gone",),
    "distill": (r"QA_TEACHER_CHANNEL=\S+: no such channel", r"QA_TEACHER_CHANNEL=.*retention or a person removed it"),
    "promote": (r"is not complete", r"has no model/config.json", r"already holds"),
    "rollback": (r"no earlier holder", r"already holds", r"never held", r"is not complete", r"has no model/config.json",
                 r"does not exist"),
    "hold": (r"is already held", r"does not exist"),
    "release": (r"is already not held", r"does not exist"),
    "repair": (r"is not corrupted", r"does not exist", r"is not complete", r"has no model/config.json"),
    "answer": (r"does not exist",),
    "rerun": (r"run '\S+' has no model/config\.json",),  # a held run, released since, whose model was pruned (README)
}
# SIGKILL / SIGTERM points inside a job process: (killer hook, highest n). Every night that trains passes the
# first ones; the others only some nights do (pruning, a distilled run, a night with a holder to replace)
JOB_HOOKS = [
    ("train_step", 8), ("save_optimizer", 3), ("put_file:optimizer.pt", 3), ("put_bytes:COMMIT.json", 3),
    ("put_file:cache/features", 1), ("lease", 1), ("train_end", 1), ("evaluate", 1), ("put_file:model/model.safetensors", 1),
    ("put_bytes:COMPLETE", 1), ("promote", 1), ("pointer_read", 2), ("decided", 1), ("data_fetch", 2), ("put_bytes:run.json", 1),
    ("put_bytes:channels/", 3), ("put_file:logs/", 2), ("get_file", 2),
]
RARE_JOB_HOOKS = [("delete:checkpoints/", 2), ("pointer_write", 1), ("put_bytes:retention.json", 1), ("delete:/model/", 2),
                  ("put_file:cache/teacher", 1), ("put_bytes:lease.json", 2), ("teacher_score", 1), ("data_fetched", 2)]
FILL_HOOKS = ["save_optimizer", "stage", "teacher_score", "data_fetched", "train_step", "evaluate", "put_file:cache/features"]
CLI_HOOKS = [("pointer_read", 2), ("pointer_write", 1), ("put_bytes:channels/", 2), ("delete", 1)]
JOB_EVENTS = [("lease", 1), ("data", 2), ("features", 1), ("train_start", 1), ("progress", 3), ("checkpoint_committed", 3),
              ("train_end", 1), ("eval", 1), ("published", 1), ("promotion", 1), ("init", 1)]


@dataclass
class RunSpec:
    """A run id and the environment every attempt of it gets (a retry with other settings would be another run)."""

    run_id: str
    kind: str  # night, warm, distill, race, twin
    channel: str
    env: dict
    refusals: tuple = ()
    attempts: list = field(default_factory=list)  # (exit code, faults described)
    resumed: bool = False  # an attempt logged a resume from a committed checkpoint
    interrupted: bool = False  # an attempt ended by a fault before the run settled
    settled: bool = False


@dataclass
class Outcome:
    """What one step did: its processes (for the process checks), runs it touched, one line for the history."""

    line: str
    kind: str = ""  # the operation run (a rerun with nothing to rerun runs a night)
    procs: list = field(default_factory=list)
    runs: list = field(default_factory=list)
    attempts: dict = field(default_factory=dict)  # run id or command -> this step's attempts: "exit[faults]"
    faults: list = field(default_factory=list)  # fault kinds that fired
    unfired: list = field(default_factory=list)  # fault kinds drawn whose point or event the process never reached
    unsettled: list = field(default_factory=list)  # (label, codes) of runs whose fault-free last attempt did not settle
    settled: list = field(default_factory=list)  # run ids whose last process ended settling them (0, 2, 3)
    notes: list = field(default_factory=list)


class Soak:
    """The state the operations share: the world, the runs made so far, the data dropped so far."""

    def __init__(self, world: World, root: Path):
        self.world, self.root = world, root
        self.runs: dict[str, RunSpec] = {}
        self.drops = self.eval_drops = self.nodes = 0
        rows = [json.loads(line) for path in (DATA / "squad_v1_train_64.jsonl", ROOT / "job/sample_data/squad_v1_train_300.jsonl")
                for line in path.read_text().splitlines()]
        self.rows = list({r["id"]: r for r in rows}.values())  # the two files share rows: a drop's ids must differ
        self.dev = [json.loads(line) for line in (ROOT / "job/sample_data/squad_v1_dev_100.jsonl").read_text().splitlines()]
        self.can_mount, self.faketime = can_mount(), faketime_lib() is not None
        self.drop_eval(random.Random(0), 16)  # the same first eval set and training file for every seed
        self.drop_train(random.Random(0))

    # ------------------------------------------------------------------ data
    def drop_train(self, rng: random.Random) -> None:
        """A new training file; now and then one whose key holds a credential value (a producer's mistake the
        job must not publish: README "Security")."""
        self.drops += 1
        rows = [dict(r, id=f"{r['id']}-d{self.drops}") for r in rng.sample(self.rows, ROWS_PER_DROP)]
        leaky = f"-{self.world.secrets['HF_TOKEN']}" if rng.random() < 0.08 else ""
        self.world.put(f"data/train/drop-{self.drops:04d}{leaky}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())

    def drop_eval(self, rng: random.Random, n: int = 8) -> None:
        rows = [dict(r, id=f"{r['id']}-e{self.eval_drops}") for r in rng.sample(self.dev, n)]
        self.world.put(f"data/eval/part-{self.eval_drops:03d}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        self.eval_drops += 1

    # ------------------------------------------------------------------ settings
    def night_env(self, run_id: str, channel: str, **extra) -> dict:
        return {**BASE, **self.world.env(), "QA_RUN_ID": run_id, "QA_OUTPUT_URI": self.world.output,
                "QA_MODEL_NAME": str(self.world.model), "QA_TRAIN_URI": self.world.uri("data/train/"),
                "QA_EVAL_URI": self.world.uri("data/eval/"), "QA_CHANNEL": channel, "QA_SEED": str(SEEDS[channel]),
                "QA_GATE_METRIC": GATES[channel][0], "QA_GATE_MIN": str(GATES[channel][1]),
                "QA_GATE_MAX_DROP": str(GATES[channel][2]), **extra}

    def new_run(self, kind: str, channel: str, **extra) -> RunSpec:
        run_id = f"{channel}-{len(self.runs) + 1:03d}"
        refusals = (LEASE, *REFUSALS.get(kind, ()), *(REFUSALS["warm"] if extra.get("QA_INIT_FROM") == "channel" else ()),
                    *(REFUSALS["distill"] if "QA_TEACHER_CHANNEL" in extra else ()))
        spec = RunSpec(run_id, kind, channel, self.night_env(run_id, channel, **extra), refusals)
        self.runs[run_id] = spec
        return spec

    def cli_env(self) -> dict:
        return {**self.world.env()}

    def work_dir(self, run_id: str) -> Path:
        self.nodes += 1
        return self.root / "work" / f"{run_id}.node{self.nodes}"

    # ------------------------------------------------------------------ faults
    def draw_faults(self, rng: random.Random, kind: str, chance: float) -> tuple[list[Fault], dict]:
        """Faults for one process (``kind``: job or cli) and what its setting-up needs (disk, clock)."""
        faults, setup = [], {}
        # drawn whether or not this machine can inject them, so a seed draws the same schedule everywhere
        clock = rng.choice([-9, -5, -3, 3, 5, 9]) if rng.random() < 0.1 else None
        if clock and self.faketime:
            setup["clock"] = clock
        if rng.random() >= chance:
            return faults, setup
        roll = rng.random()
        hooks = (JOB_HOOKS if rng.random() < 0.7 else RARE_JOB_HOOKS) if kind == "job" else CLI_HOOKS
        if roll < 0.38:
            hook, most = rng.choice(hooks)
            faults.append(Fault(rng.choice(["kill", "kill", "term"]), hook=f"{hook}@{rng.randint(1, most)}"))
        elif roll < 0.50:  # "at any time": a process lives 5-30 s (a command line 3-6 s)
            faults.append(Fault(rng.choice(["kill", "term"]), after=round(rng.uniform(0.5, 25.0 if kind == "job" else 6.0), 1)))
        elif roll < 0.92:
            event, most = rng.choice(JOB_EVENTS) if kind == "job" else ("start", 1)
            what = rng.choice(["outage", "outage", "down", "resets", "resets", "lost", "cut", "latency"])
            seconds = {"outage": rng.uniform(3, 25), "down": rng.uniform(2, 12), "cut": rng.uniform(1, 8),
                       "latency": rng.uniform(3, 15)}.get(what, 0.0)
            amount = {"resets": rng.randint(1, 6), "lost": rng.randint(1, 3), "cut": rng.randint(2_000, 300_000),
                      "latency": round(rng.uniform(0.02, 0.3), 2)}.get(what, 0)
            faults.append(Fault(what, event=event, nth=rng.randint(1, most), seconds=round(seconds, 1), amount=amount))
        elif kind == "job":  # a scratch too small for the run, or one that fills up at a named point
            megabytes, fill = rng.choice([3, 6, 12, 20, 30, 45]), rng.random() < 0.5
            point = f"{rng.choice(FILL_HOOKS)}@1={rng.choice([0, 4096, 65536, 1 << 20])}"
            if self.can_mount:
                setup["disk_mb"] = 64 if fill else megabytes
                if fill:
                    faults.append(Fault("fill", hook=point))
        return faults, setup

    # ------------------------------------------------------------------ one process
    def launch(self, label: str, env: dict, faults: list[Fault], setup: dict, module: str = "job", args=(), killer="",
               slow: bool = True):
        """Start a process with its faults; a full disk gets a tmpfs of its own as QA_WORK_DIR (closed by ``finish``)."""
        tmpfs = None
        if "disk_mb" in setup:
            tmpfs = Tmpfs(self.root / "full" / label.replace("#", "."), setup["disk_mb"])
            env = {**env, "QA_WORK_DIR": str(tmpfs.path)}
        elif any(f.kind == "fill" for f in faults):
            raise AssertionError("the killer's fill may only fill a tmpfs of the soak's")
        if "clock" in setup:
            env = {**env, **faketime_env(setup["clock"], self.root / "clock-site")}
        if module == "job" and slow:  # a tiny model's step is 0.1 s: slower steps let uploads keep up, so kills find commits
            killer = ",".join(filter(None, (SLOW_STEPS, killer)))
        running = self.world.start(label, env, module, tuple(args), faults, killer)
        if tmpfs is not None:
            running.tmpfs = tmpfs
            running.faults.append(Fault("disk", amount=setup["disk_mb"]))
        return running

    def finish(self, running):
        self.world.finish(running)
        if running.tmpfs is not None:
            running.tmpfs.close()
            running.tmpfs = None
        return running

    def proc(self, running, kind: str, refusals: tuple, setup: dict) -> Proc:
        label = running.label + (" (hung: the soak killed it after its time limit)" if running.hung else "")
        return Proc(label, kind, running.proc.returncode, "\n".join(running.lines), "\n".join(running.err),
                    tuple(running.signalled), refusals)

    # ------------------------------------------------------------------ a run, retried as a Kubernetes Job
    def run_job(self, spec: RunSpec, rng: random.Random, out: Outcome, first=None, work: Path | None = None,
                chance: float = 0.7, refusals: tuple = ()) -> None:
        """Attempts of ``spec`` until one settles it (or the Job gives up); ``first``: a started first attempt;
        ``refusals``: exit 2/3 messages this operation may end with besides the run's own."""
        failures, attempt = 0, 0
        work = work or self.work_dir(spec.run_id)
        while True:
            last = attempt == MAX_ATTEMPTS - 1 or failures == BACKOFF_LIMIT
            if first is not None:
                running, setup, first = first[0], first[1], None
            else:
                faults, setup = self.draw_faults(rng, "job", 0.0 if last else chance * (0.6 if attempt else 1.0))
                if last:
                    setup.pop("clock", None)
                running = self.launch(f"{spec.run_id}#{attempt + 1}", {**spec.env, "QA_WORK_DIR": str(work)}, faults, setup)
            self.finish(running)
            proc = self.proc(running, "job", spec.refusals + tuple(refusals), setup)
            out.procs.append(proc)
            fired = [f for f in running.faults if f.fired or f.kind in ("disk", "fill")] + ([Fault("clock", amount=setup["clock"])]
                                                                                  if "clock" in setup else [])
            out.faults += [f.kind for f in fired]
            out.unfired += [f.kind for f in running.faults if not f.fired and f.kind not in ("disk", "fill")]
            spec.attempts.append((proc.code, [f.describe() for f in fired]))
            described = ", ".join(f.describe() for f in fired)
            out.attempts.setdefault(spec.run_id, []).append(f"{proc.code}" + (f"[{described}]" if described else ""))
            events = [e.get("event") for e in running.events()]
            spec.resumed |= "resume" in events
            code = proc.code
            if code == 0 or code in (2, 3) or running.hung:
                spec.settled = code in (0, 2, 3)
                break
            spec.interrupted = True
            if code != 143:
                failures += 1
            attempt += 1
            if last or failures > BACKOFF_LIMIT or attempt >= MAX_ATTEMPTS:
                break  # the Job gives up: reported by retries_converge when its last attempt had no fault
            if "disk_mb" not in setup:  # the next pod: the same node and scratch, another node, or a copy of this scratch
                place = rng.choice(["same", "same", "fresh", "fresh", "copy"])
                if place != "same":
                    new = self.work_dir(spec.run_id)
                    if place == "copy" and work.exists():
                        shutil.copytree(work, new, symlinks=True)
                        out.faults.append("copied_workdir")
                    work = new
        if not spec.settled and not running.faults and "clock" not in setup:
            out.unsettled.append((spec.run_id, [c for c, _ in spec.attempts]))
        if spec.settled:
            out.settled.append(spec.run_id)
        out.runs.append(spec.run_id)

    def run_cli(self, label: str, module: str, args: list, refusals: tuple, rng: random.Random, out: Outcome,
                chance: float = 0.4, kind: str = "channel") -> list[int]:
        """An operator's command, rerun by the operator while it fails for a retryable reason."""
        codes = []
        for attempt in range(MAX_ATTEMPTS):
            last = attempt == MAX_ATTEMPTS - 1 or attempt == BACKOFF_LIMIT
            faults, setup = self.draw_faults(rng, "cli", 0.0 if last else chance)
            if last:
                setup.pop("clock", None)
            running = self.launch(f"{label}#{attempt + 1}", self.cli_env(), faults, setup, module=module, args=args)
            for f in faults:
                if f.event == "start":
                    self.world.fire(running, f)
            self.finish(running)
            proc = self.proc(running, kind, refusals, setup)
            out.procs.append(proc)
            fired = [f.describe() for f in running.faults if f.fired] + ([f"clock {setup['clock']:+d} min"] if "clock" in setup else [])
            out.faults += [f.kind for f in running.faults if f.fired] + (["clock"] if "clock" in setup else [])
            out.unfired += [f.kind for f in running.faults if not f.fired]
            out.attempts.setdefault(label, []).append(f"{proc.code}" + (f"[{', '.join(fired)}]" if fired else ""))
            codes.append(proc.code)
            if proc.code in (0, 2, 3) or running.hung:
                break
            if last:
                if not running.faults:
                    out.unsettled.append((label, codes))
                break
        return codes
