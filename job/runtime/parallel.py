"""Map a function over chunks of data in forked worker processes, results in chunk order.

Used for preprocessing. The tokenizer spreads only its Rust encoding over threads; turning the
encodings into Python lists, labelling and building Arrow tables run on one core under the GIL,
so threads do not help and processes do. Workers are *forked*: they
inherit the tokenizer and the rows without pickling, and start in milliseconds instead of the
seconds a fresh interpreter takes to import transformers. Only the small task (a chunk's first
row) goes to a worker and only its columns come back.

Once this process has initialised CUDA or joined a process group (NCCL's and gloo's threads, the
CUDA driver's), a fork copies their state half-way: the workers are *spawned* then, fresh
interpreters that are handed the tokenizer and the rows (a memory-mapped split pickles as its file).

Each worker tokenizes with one thread (``TOKENIZERS_PARALLELISM=false`` in its environment):
the processes are the parallelism, and the Rust thread pool of every worker on the same cores
would only oversubscribe them. Results do not depend on the number of workers: every chunk is
computed by the same function from the same rows, and they are returned in order.

If a worker dies (killed for memory, say) or the pool passes its deadline, the remaining work
is done in this process, with one log line: a speed setting never stops a run.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

# Deadline for the whole pool: generous (serial preprocessing runs at ~1,000+ rows/s), it only
# catches a worker that hangs instead of dying.
DEADLINE_BASE_SECONDS = 120.0
DEADLINE_SECONDS_PER_TASK = 60.0

AHEAD_PER_WORKER = 2  # chunks in flight per worker: each busy, one more queued

_TASK: tuple | None = None  # (fn, tokenizer, rows, kwargs), inherited by each worker through fork


def _init(fn, tokenizer, rows, kwargs) -> None:
    global _TASK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a spawned worker did not inherit it (see _forking_workers)
    _TASK = (fn, tokenizer, rows, kwargs)


def _run(begin: int):
    fn, tokenizer, rows, kwargs = _TASK
    return fn(tokenizer, rows, begin, **kwargs)


@contextlib.contextmanager
def _forking_workers():
    # TOKENIZERS_PARALLELISM is set only while the workers fork, so they inherit it and this
    # process keeps its own setting; set before the fork (not in the worker), the tokenizers
    # library also skips its "process just got forked" warning.
    # Python >= 3.12 warns on any fork of a process with threads (the job has its lease and
    # upload threads). The risk is a lock held by one of them at the fork; the workers only run
    # the tokenizer (single-threaded, see above), Python and Arrow code, and take none of those
    # threads' locks, so the warning is silenced here and only here.
    name = "TOKENIZERS_PARALLELISM"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks", category=DeprecationWarning)
            yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def start_method() -> str:
    """``fork``, unless CUDA or a process group already runs threads in this process: ``spawn`` then."""
    import sys

    torch = sys.modules.get("torch")  # never imported here for this: a process without torch forks
    started = torch is not None and (torch.cuda.is_initialized() or (torch.distributed.is_available()
                                                                       and torch.distributed.is_initialized()))
    return "spawn" if started or "fork" not in multiprocessing.get_all_start_methods() else "fork"


def map_chunks(fn: Callable, begins: Iterable[int], workers: int, tokenizer, rows, **kwargs) -> Iterator:
    """``fn(tokenizer, rows, begin, **kwargs)`` for each begin, in order; ``workers`` processes at most."""
    begins = list(begins)
    workers = min(workers, len(begins))
    if workers <= 1:
        for begin in begins:
            yield fn(tokenizer, rows, begin, **kwargs)
        return
    t0 = time.monotonic()
    method = start_method()
    # spawned workers import the job and transformers first: seconds, counted in the deadline
    deadline = t0 + DEADLINE_BASE_SECONDS + DEADLINE_SECONDS_PER_TASK * len(begins) / workers
    done = 0
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                               initializer=_init, initargs=(fn, tokenizer, rows, kwargs))
    try:
        with _forking_workers():
            futures = collections.deque([pool.submit(_run, begins[0])])  # with fork, the first submit starts every worker
        submitted = 1
        while futures:
            # a few chunks ahead of the caller, not all of them: results the caller has not taken
            # yet wait here, in memory, so this bounds them whatever the number of chunks
            while submitted < len(begins) and len(futures) < AHEAD_PER_WORKER * workers:
                futures.append(pool.submit(_run, begins[submitted]))
                submitted += 1
            result = futures.popleft().result(timeout=max(deadline - time.monotonic(), 0.0))
            done += 1
            yield result
    except (BrokenProcessPool, TimeoutError) as exc:
        log.warning("preprocessing workers failed; finishing in this process",
                    extra={"event": "preprocess_fallback", "error": type(exc).__name__, "chunks_done": done,
                           "chunks": len(begins)})
        _stop(pool)
        for begin in begins[done:]:
            yield fn(tokenizer, rows, begin, **kwargs)
        return
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    log.info("preprocessed in parallel", extra={"event": "preprocess", "workers": workers, "start": method,
                                                 "chunks": len(begins), "seconds": round(time.monotonic() - t0, 2)})


def _stop(pool: ProcessPoolExecutor) -> None:
    """Kill the workers of a broken or late pool: a hung one would never exit on its own."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # no public way before Python 3.14
        with contextlib.suppress(Exception):
            process.kill()
