"""Run the job with faults injected at named points: ``python -m tests.support.killer SPEC``.

SPEC is a comma-separated list of actions, each ``verb:hook[:match][@n|=seconds]``:
  kill:put_file:optimizer.pt@2   SIGKILL on the 2nd upload whose key contains "optimizer.pt"
  term:train_step@5              SIGTERM ourselves after the 5th training step (a real signal)
  slow:train_step=0.2            sleep after every training step (the maths is unchanged)
  pause:stage=3                  sleep before staging the results
  raise:evaluate@1               raise a BaseException that is not an Exception (like a Rust panic)
Hooks: train_step, save_optimizer, put_file, put_bytes, delete, get_file, lease, train_end,
evaluate, stage. The job itself is unmodified: only these functions are wrapped.
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
        value = 1.0
        if "@" in rest:
            rest, value = rest.rsplit("@", 1)
        elif "=" in rest:
            rest, value = rest.rsplit("=", 1)
        hook, _, match = rest.partition(":")
        actions.append({"verb": verb, "hook": hook, "match": match, "value": float(value), "count": 0})
    return actions


def install(actions) -> None:
    from transformers import Trainer

    import job.lease
    import job.pipeline
    import job.publish
    import job.storage

    lock = threading.Lock()

    def fire(hook: str, key: str = "") -> None:
        for a in actions:
            if a["hook"] != hook or (a["match"] and a["match"] not in key):
                continue
            with lock:
                a["count"] += 1
                count = a["count"]
            if a["verb"] in ("slow", "pause"):
                time.sleep(a["value"])
            elif count == int(a["value"]) and a["verb"] == "raise":
                raise Panic(f"injected panic at {hook} {os.environ.get('KILLER_PANIC_MESSAGE', '')}")
            elif count == int(a["value"]):
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

    wrap(Trainer, "training_step", "train_step", before=False)
    wrap(Trainer, "_save_optimizer_and_scheduler", "save_optimizer")
    for cls in (job.storage.LocalStorage, job.storage.S3Storage):
        for name in ("put_file", "put_bytes", "delete", "get_file"):
            wrap(cls, name, name, keyed=True)
    wrap(job.lease.Lease, "acquire", "lease", before=False)
    wrap(job.pipeline, "train", "train_end", before=False)
    wrap(job.pipeline, "evaluate", "evaluate")
    wrap(job.publish, "stage", "stage")


if __name__ == "__main__":
    install(parse(sys.argv[1]))
    from job.__main__ import main

    sys.exit(main())
