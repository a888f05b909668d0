"""Run the job with faults injected at named points: ``python -m tests.support.killer SPEC [MODULE]``.

SPEC is a comma-separated list of actions, each ``verb:hook[:match][@n|=seconds]``:
  kill:put_file:optimizer.pt@2   SIGKILL on the 2nd upload whose key contains "optimizer.pt"
  term:train_step@5              SIGTERM ourselves after the 5th training step (a real signal)
  slow:train_step=0.2            sleep after every training step (the maths is unchanged)
  pause:stage=3                  sleep before staging the results
  raise:evaluate@1               raise a BaseException that is not an Exception (like a Rust panic)
  meet:pointer_read@2=2          at the 2nd pointer read, wait until 2 processes got there
                                 (each touches a file in $KILLER_MEET_DIR): forces a real race
  pause:features#0=12            a hook with #R fires only in the process of LOCAL_RANK R (torchrun)
  wait:train_step@3=committed    at the 3rd training step, wait until the hook ``committed`` fired
                                 (once; 120 s at most): a kill listed after it then never races an upload
  fill:teacher_score@1=8192      at the 1st teacher pass, fill the filesystem of $QA_WORK_DIR to
                                 8192 bytes from full (a file .killer-filler there): a disk full now
Hooks: train_step, save_optimizer, put_file, put_bytes, delete, get_file, lease, train_end,
evaluate, stage, teacher_score (before the node's teacher logits are reserved and scored);
committed (after a checkpoint's upload: on rank 0, once its marker is written); features (before
the features are built or read); data_list (before a data folder or prefix is listed), data_fetch
and data_fetched (before and after a single data file is fetched); and the promotion steps:
promote (entered after COMPLETE), pointer_read (after a channel pointer is read), decided (after
promotion.json is written, before the pointer moves), pointer_write (after the pointer moved,
before its history entry). The job itself is unmodified: only these functions are wrapped.

With MODULE ``job.predict`` the batch predictions run instead, with the storage and lease hooks
and two of their own: chunk_written (a chunk's lines are in storage, its marker is not) and
chunk_committed (after its marker); the training hooks are not installed (nor their imports paid).
``python -m tests.support.killer SPEC job.channel ARGS...`` runs another of the job's commands (its
module and arguments) under the same hooks.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time


class Panic(BaseException):
    """What a pyo3 library raises when its Rust code panics: not an Exception subclass."""


def parse(spec: str):
    actions = []
    for part in filter(None, spec.split(",")):
        verb, rest = part.split(":", 1)
        value, at = 1.0, None
        if "=" in rest:
            rest, value = rest.rsplit("=", 1)
        if "@" in rest:
            rest, at = rest.rsplit("@", 1)
        if verb not in ("meet", "wait", "fill") and at is not None:
            value, at = at, None  # kill:hook@n: the n-th time
        hook, _, match = rest.partition(":")
        hook, _, local_rank = hook.partition("#")
        if local_rank and local_rank != os.environ.get("LOCAL_RANK", "0"):
            continue
        value = value if verb == "wait" else float(value)  # wait:hook@n=other: the value names the awaited hook
        actions.append({"verb": verb, "hook": hook, "match": match, "value": value, "at": int(at or 1), "count": 0})
    return actions


def install(actions, module: str = "job") -> None:
    import job.store.lease
    import job.store.storage

    lock = threading.Lock()
    fired = threading.Condition(lock)
    times: dict[str, int] = {}  # how often each hook fired, for ``wait``

    def fire(hook: str, key: str = "") -> None:
        with fired:
            times[hook] = times.get(hook, 0) + 1
            fired.notify_all()
        for a in actions:
            if a["hook"] != hook or (a["match"] and a["match"] not in key):
                continue
            with lock:
                a["count"] += 1
                count = a["count"]
            if a["verb"] in ("slow", "pause"):
                time.sleep(a["value"])
            elif a["verb"] == "meet" and count == a["at"]:
                meet(int(a["value"]))
            elif a["verb"] == "wait":
                if count == a["at"]:
                    with fired:
                        fired.wait_for(lambda: times.get(a["value"], 0) > 0, timeout=120)
            elif a["verb"] == "fill" and count == a["at"]:
                fill(int(a["value"]))
            elif count == int(a["value"]) and a["verb"] == "raise":
                raise Panic(f"injected panic at {hook} {os.environ.get('KILLER_PANIC_MESSAGE', '')}")
            elif count == int(a["value"]) and a["verb"] in ("kill", "term"):  # meet and fill never signal
                print(f'{{"event": "fault_injected", "verb": "{a["verb"]}", "hook": "{hook}", "key": "{key}"}}', flush=True)
                os.kill(os.getpid(), signal.SIGKILL if a["verb"] == "kill" else signal.SIGTERM)

    def wrap(owner, name, hook, before=True, keyed=False):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            key = str(args[1]) if keyed and name in ("put_bytes", "delete", "get_file") else str(args[2]) if keyed else ""
            if before:
                fire(hook, key)
            result = original(*args, **kwargs)
            if not before:
                fire(hook, key)
            return result

        setattr(owner, name, wrapper)

    for cls in (job.store.storage.LocalStorage, job.store.storage.S3Storage):
        for name in ("put_file", "put_bytes", "delete", "get_file"):
            wrap(cls, name, name, keyed=True)
    wrap(job.store.lease.Lease, "acquire", "lease", before=False)
    if module == "job.predict":
        import job.predictions.output

        wrap(job.predictions.output.ShardOutput, "put_chunk", "chunk_written", before=False)
        wrap(job.predictions.output.ShardOutput, "commit_chunk", "chunk_committed", before=False)
        return
    from transformers import Trainer

    import job.channels.channel
    import job.channels.promotion
    import job.data
    import job.distill
    import job.evaluate
    import job.observe.periodic_eval  # binds evaluate before the wrap: the hook is the final evaluation only
    import job.preprocess
    import job.publish
    import job.store.checkpoints
    import job.train

    wrap(Trainer, "training_step", "train_step", before=False)
    wrap(Trainer, "_save_optimizer_and_scheduler", "save_optimizer")
    wrap(job.store.checkpoints.CheckpointSync, "__call__", "committed", before=False)
    wrap(job.train, "train", "train_end", before=False)  # the pipeline imports both where training starts
    wrap(job.evaluate, "evaluate", "evaluate")
    wrap(job.publish, "stage", "stage")
    wrap(job.preprocess, "build_features", "features")
    wrap(job.data, "_choose", "data_list")
    wrap(job.data, "fetch", "data_fetch")
    wrap(job.data, "fetch", "data_fetched", before=False)
    wrap(job.distill, "reserve_logits", "teacher_score")
    wrap(job.channels.promotion, "promote", "promote")
    wrap(job.channels.channel.Channel, "read", "pointer_read", before=False)
    wrap(job.channels.promotion, "write_decision", "decided", before=False)
    wrap(job.channels.channel.Channel, "swap", "pointer_write", before=False)


def fill(free: int) -> None:
    """Fill the filesystem of $QA_WORK_DIR until ``free`` bytes are left (a small mount: the tests' tmpfs)."""
    from pathlib import Path

    fd = os.open(Path(os.environ["QA_WORK_DIR"]) / ".killer-filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for chunk in (bytes(1 << 20), bytes(4096)):
            try:
                while os.write(fd, chunk):
                    pass
            except OSError:
                pass  # full, for chunks this size
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - free))
    finally:
        os.close(fd)


def meet(parties: int, timeout: float = 120.0) -> None:
    """Wait until ``parties`` processes reached this point (files in $KILLER_MEET_DIR), or the timeout."""
    from pathlib import Path

    folder = Path(os.environ["KILLER_MEET_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < parties and time.monotonic() < deadline:
        time.sleep(0.05)


def install_after_stop_handler(actions, module: str = "job") -> None:
    """Wrap once the job's own SIGTERM handling is in place, as it is first thing in ``python -m job``: the
    wrapping imports the Trainer (seconds), and a SIGTERM then must be the job's stop, not a plain death."""
    from job.runtime.preemption import StopRequest

    original = StopRequest.install

    def install_then_wrap(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        install(actions, module)
        return result

    StopRequest.install = install_then_wrap


if __name__ == "__main__":
    entry = sys.argv[2] if len(sys.argv) > 2 else "job"
    if entry not in ("job", "job.predict"):  # another of the job's commands: killer SPEC job.channel hold --output ...
        import runpy

        install(parse(sys.argv[1]), entry)
        sys.argv = [entry, *sys.argv[3:]]
        runpy.run_module(entry, run_name="__main__", alter_sys=True)
    install_after_stop_handler(parse(sys.argv[1]), entry)
    if entry == "job.predict":
        from job.predict import main
    else:
        from job.__main__ import main

    sys.exit(main())
