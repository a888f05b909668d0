"""Where this process sits under torchrun, and the decisions every process must take together.

Under several processes every rank must take the same path: a rank that goes elsewhere leaves the
others waiting in their next collective until the process group times out (30 minutes), or until
torchrun's agent kills them. So a decision that depends on what one process sees (staged results
in node 0's work dir, the channel pointer read at start, a stop signal that reached one node) is
taken once and shared: rank 0 decides and every rank follows (``from_rank0``), or every rank's
flag is combined (``any_of`` / ``all_of``). These are collectives: every rank must call them, at
the same point, once the process group exists (the Trainer's arguments create it). A plain
``python -m job`` is rank 0 of 1 and never touches ``torch.distributed``.

They run in a gloo group of their own (``joined``), on the CPU, with a long timeout: while one
process works for all (the node leader tokenizes, downloads a cache, scores the teacher's logits;
rank 0 fetches the checkpoint), the others wait in one of these, and the training group's timeout
(``QA_PROCESS_GROUP_TIMEOUT_SECONDS``, NCCL's watchdog on GPUs) would abort the run at 30 minutes
and throw the unfinished work away, on every retry alike. A leader that dies ends the wait at once
(torchrun's agent stops its node; a lost peer breaks gloo's connections).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, TypeVar

from job.errors import JobError

T = TypeVar("T")
# how long a rank waits for another's work before the run fails: only a hung (not a dead) process reaches it
WAIT_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class Ranks:
    """Where this process sits under torchrun; a plain ``python -m job`` is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node: int = 0  # torchrun's GROUP_RANK
    waits: object = field(default=None, compare=False, repr=False)  # the gloo group of ``joined``

    def joined(self) -> "Ranks":
        """These ranks with their waiting group, once the process group exists (a collective: every rank calls it)."""
        if self.world_size == 1 or self.waits is not None:
            return self
        from datetime import timedelta

        import torch.distributed as dist

        return replace(self, waits=dist.new_group(backend="gloo", timeout=timedelta(seconds=WAIT_SECONDS)))

    @classmethod
    def from_env(cls, environ) -> "Ranks":
        world = int(environ.get("WORLD_SIZE", 1))
        rank, local_world = int(environ.get("RANK", 0)), int(environ.get("LOCAL_WORLD_SIZE", world))
        return cls(rank, int(environ.get("LOCAL_RANK", 0)), world, local_world, int(environ.get("GROUP_RANK", rank // max(local_world, 1))))

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone holds the lease, commits checkpoints and publishes."""
        return self.rank == 0

    @property
    def is_node_leader(self) -> bool:
        """The first process of each node uploads the checkpoint files only its node has."""
        return self.local_rank == 0

    @property
    def nodes(self) -> int:
        return max(self.world_size // max(self.local_world_size, 1), 1)

    def from_rank0(self, decide: Callable[[], T]) -> T:
        """``decide()`` on rank 0 alone; its result on every rank. A JobError it raises is raised on
        every rank, so all of them exit with its code at once instead of waiting for rank 0."""
        if self.world_size == 1:
            return decide()
        import torch.distributed as dist

        box: list = [None]
        if self.rank == 0:
            try:
                box[0] = ("value", decide())
            except JobError as exc:
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0, group=self.waits)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def leaders_first(self, build: Callable[[], T]) -> T:
        """``build()`` on the first process of each node, then on the others, which find its work
        done (a cache in the node's work dir) instead of repeating it side by side."""
        if self.world_size == 1:
            return build()
        result, error = None, None
        if self.is_node_leader:
            try:
                result = build()
            except JobError as exc:
                error = exc
        if not self.all_of(error is None):
            raise error or JobError("the first process of a node failed before this one could go on (see its log)")
        return result if self.is_node_leader else build()

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, by rank, on every rank."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        values: list = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.waits)
        return values

    def barrier(self) -> None:
        """Every rank got here (however long the slowest took)."""
        self.all_of(True)

    def any_of(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any."""
        return self._reduce(flag, "MAX")

    def all_of(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on all: nobody returns before the slowest has its answer."""
        return self._reduce(flag, "MIN")

    def _reduce(self, flag: bool, op: str) -> bool:
        if self.world_size == 1:
            return bool(flag)
        import torch
        import torch.distributed as dist

        on_gpu = self.waits is None and dist.get_backend() == "nccl"
        value = torch.tensor([int(flag)], device=torch.device("cuda", self.local_rank) if on_gpu else torch.device("cpu"))
        dist.all_reduce(value, op=getattr(dist.ReduceOp, op), group=self.waits)
        return bool(value.item())


class StepVote:
    """Flags OR-ed over every rank at each step end, without stalling the GPU.

    A vote on the training device costs a host-to-device copy, a collective in the CUDA stream and
    a device-to-host read: the host waits for the GPU to drain at every step. Here each rank's
    flags go into an all-reduce on a CPU (gloo) group started asynchronously at one step end and
    read at the next, when it has long finished; every rank reads the same result at the same
    step, so they still save and stop together, one step after the flag was raised.
    """

    def __init__(self):
        import torch.distributed as dist

        self.group = dist.new_group(backend="gloo")  # a collective call: every rank makes it at train begin
        self._pending = None

    def exchange(self, *flags: bool) -> list[bool]:
        """Start the vote on ``flags``; return the previous step's result (all False at the first step)."""
        import torch
        import torch.distributed as dist

        result = [False] * len(flags)
        if self._pending is not None:
            work, votes = self._pending
            work.wait()
            result = [bool(v) for v in votes.tolist()]
        votes = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        self._pending = (dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.group, async_op=True), votes)
        return result

    def close(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()  # every rank started it: finish it before the group goes unused
            self._pending = None
