"""Chunks mapped over forked workers: results in order, and a dead or hung pool finishes in-process."""
import logging
import os
import time

import pytest

import job.runtime.parallel
from job.runtime.parallel import map_chunks

PARENT = os.getpid()


def square(tokenizer, rows, begin, offset=0):
    return [(r * r + offset, os.getpid()) for r in rows[begin:begin + 2]]


def dies_in_a_worker(tokenizer, rows, begin):
    if os.getpid() != PARENT:
        os._exit(1)  # as the OOM killer would end it: no exception, no cleanup
    return square(tokenizer, rows, begin)


def hangs_in_a_worker(tokenizer, rows, begin):
    if os.getpid() != PARENT:
        time.sleep(60)
    return square(tokenizer, rows, begin)


def tokenizers_setting_in_worker(tokenizer, rows, begin):
    return [os.environ.get("TOKENIZERS_PARALLELISM")]


def values(parts):
    return [value for part in parts for value, _ in part]


@pytest.mark.parametrize("workers", [1, 2, 3, 10])
def test_results_come_back_in_order(workers):
    rows = list(range(11))
    parts = list(map_chunks(square, range(0, 11, 2), workers, None, rows, offset=1))
    assert values(parts) == [r * r + 1 for r in rows]
    pids = {pid for part in parts for _, pid in part}
    assert (pids == {PARENT}) == (workers == 1)


def test_workers_tokenize_single_threaded_and_the_parent_keeps_its_setting(monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    assert list(map_chunks(tokenizers_setting_in_worker, [0, 1], 2, None, [0, 1])) == [["false"], ["false"]]
    assert "TOKENIZERS_PARALLELISM" not in os.environ


@pytest.mark.parametrize("fn, patch", [(dies_in_a_worker, {}), (hangs_in_a_worker, {"DEADLINE_BASE_SECONDS": 1.0, "DEADLINE_SECONDS_PER_TASK": 0.0})])
def test_a_failed_pool_finishes_in_this_process(monkeypatch, caplog, fn, patch):
    for name, value in patch.items():
        monkeypatch.setattr(job.runtime.parallel, name, value)
    caplog.set_level(logging.INFO, logger="job.runtime.parallel")
    rows = list(range(8))
    started = time.monotonic()
    assert values(map_chunks(fn, range(0, 8, 2), 2, None, rows)) == [r * r for r in rows]
    assert time.monotonic() - started < 30
    lines = [r for r in caplog.records if getattr(r, "event", None) == "preprocess_fallback"]
    assert len(lines) == 1


def test_workers_are_spawned_once_a_process_group_runs_threads_in_this_process(caplog):
    """After CUDA or a process group started (torchrun's ranks tokenize after both), a fork would copy their
    threads' state half-way: the workers are fresh interpreters then, with the same results in the same order."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caplog.set_level(logging.INFO, logger="job.runtime.parallel")
    assert job.runtime.parallel.start_method() == "fork"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        parts = list(map_chunks(square, range(0, 8, 2), 2, None, list(range(8))))
    finally:
        dist.destroy_process_group()
    assert values(parts) == [r * r for r in range(8)]
    assert PARENT not in {pid for part in parts for _, pid in part}
    (line,) = [r for r in caplog.records if getattr(r, "event", None) == "preprocess"]
    assert line.start == "spawn" and line.workers == 2
