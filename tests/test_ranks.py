"""The stop vote under several processes: every rank saves and stops at the same step, without a per-step host sync.

One real gloo process group of one process stands in for the job's (the collectives run for real);
the callback is told it is one rank of two, as under torchrun. The end-to-end guarantees (every
rank stops at the same step, resume is exact) are tests/test_distributed.py's.
"""
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
