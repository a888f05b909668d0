"""The stop vote under several processes: every rank saves and stops at the same step, once per period, without a per-step host sync.

One real gloo process group of one process stands in for the job's (the collectives run for real);
the callback is told it is one rank of two, as under torchrun. The end-to-end guarantees (every
rank stops at the same step, resume is exact) are tests/test_distributed.py's.
"""
import json
import socket
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from transformers import TrainerControl

from job.store.checkpoints import CheckpointCallback


@pytest.fixture
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Stop:
    requested = False


def test_the_vote_is_asynchronous_off_the_device_and_one_step_late(group, monkeypatch, tmp_path):
    calls = []
    real = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        calls.append({"device": tensor.device.type, "async": kwargs.get("async_op", False),
                      "default_group": kwargs.get("group") in (None, dist.group.WORLD)})
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", recording)
    stop = Stop()
    callback = CheckpointCallback(every_steps=0, every_minutes=0, stop=stop, uploader=None)
    args = SimpleNamespace(world_size=2, device="cpu", output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=0, max_steps=100)
    callback.on_train_begin(args, state, TrainerControl())
    decisions = []
    for step in range(1, 6):
        state.global_step = step
        stop.requested = step >= 2  # SIGTERM arrives during step 2
        control = callback.on_step_end(args, state, TrainerControl())
        decisions.append((control.should_save, control.should_training_stop))
    callback.on_train_end(args, state, TrainerControl())
    # every rank reads the same vote at the same step: the stop seen at step 2 is acted on at step 3
    assert decisions[:3] == [(False, False), (False, False), (True, True)]
    assert len(calls) == 5 and all(c == {"device": "cpu", "async": True, "default_group": False} for c in calls)


# One rank of two under a real gloo group, its clock a fake one (a second per step, rank 1 a tenth slower):
# the callback's decisions at every step, as JSON on stdout.
_RANK = r"""
import json, os, sys, types
import torch.distributed as dist
from transformers import TrainerControl
import job.store.checkpoints as checkpoints

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
now = [0.0]
checkpoints.time = types.SimpleNamespace(monotonic=lambda: now[0], time=lambda: now[0])
callback = checkpoints.CheckpointCallback(every_steps=0, every_minutes=0.1, stop=types.SimpleNamespace(requested=False), uploader=None)
args = types.SimpleNamespace(world_size=2, output_dir="unused")
state = types.SimpleNamespace(global_step=0, max_steps=1000)
callback.on_train_begin(args, state, TrainerControl())
saves = []
for step in range(1, 31):
    now[0] = step * (1.0 + 0.1 * rank)
    state.global_step = step
    if callback.on_step_end(args, state, TrainerControl()).should_save:
        saves.append(step)
        callback._last = now[0]  # what on_save does once the Trainer has written the folder
callback.on_train_end(args, state, TrainerControl())
dist.destroy_process_group()
print(json.dumps(saves))
"""


def test_two_ranks_save_each_time_based_checkpoint_once(tmp_path):
    """Every 6 s of a fake clock, two gloo processes voting one step late: one save per period on both ranks,
    at the steps a single rank under the vote saves at (due at 6, saved at 7; due again 6 s after that save)."""
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(rank), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    saves = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert saves[0] == saves[1] == [7, 14, 21, 28]
