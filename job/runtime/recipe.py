"""The speed recipe: TF32, fused AdamW, torch.compile, pinned memory and DataLoader workers.

Each switch is a setting; the defaults are the measured choice for the device (bench/RESULTS.md):
on CUDA everything is on; on CPU only what did not slow CPU training (fused AdamW, SDPA). A
switch that cannot apply here (no CUDA, a GPU before Ampere, no compiler for torch.compile)
falls back with one log line and the job goes on: a speed setting never stops a run.

``resolve_recipe`` is a pure function of the settings and a ``Machine`` description, so every
fallback is tested on CPU with a made-up machine; ``probe_machine`` fills the description in.
"""
from __future__ import annotations

import logging
import os
import shutil
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Tensor cores want sequence lengths in multiples of 8; it also bounds the batch shapes
# torch.compile can meet to max_length / 8 per batch size (see ``pad_to_multiple_of``).
CUDA_PAD_MULTIPLE = 8
# DataLoader workers on CUDA: collating pre-tokenized windows is light, a few processes keep the
# GPU fed without taking every core of a shared node.
MAX_CUDA_DATALOADER_WORKERS = 4


@dataclass(frozen=True)
class Machine:
    """What the switches depend on: the device and the tools torch.compile needs."""

    cuda: bool = False
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability of device 0; (8, 0) = Ampere
    cpus: int = 1  # usable by the whole pod or container: torchrun's processes on this node share them
    ranks_on_node: int = 1  # torchrun's local world size
    triton: bool = False  # inductor's CUDA backend
    c_compiler: bool = False  # Triton builds its CUDA launcher with one (CC, cc, gcc or clang)
    cxx_compiler: bool = False  # inductor's CPU kernels are C++
    python_headers: bool = False  # both builds include Python.h


@dataclass(frozen=True)
class Recipe:
    tf32: bool
    fused_adamw: bool
    compile: bool
    pin_memory: bool
    dataloader_workers: int
    pad_to_multiple_of: int | None
    compile_threads: int = 1  # Inductor's compile workers for this process (its share of the node's CPUs)
    fallbacks: tuple[str, ...] = field(default=())  # one line per switch that could not apply

    def as_dict(self) -> dict:
        return {"tf32": self.tf32, "fused_adamw": self.fused_adamw, "compile": self.compile,
                "pin_memory": self.pin_memory, "dataloader_workers": self.dataloader_workers,
                "pad_to_multiple_of": self.pad_to_multiple_of, "compile_threads": self.compile_threads}


def usable_cpus() -> int:
    """CPUs this process may run on (the container's cpuset), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def probe_machine(cuda: bool | None = None, ranks_on_node: int = 1) -> Machine:
    """This machine; ``cuda`` is the device the run uses (``job.runtime.device``), default: whether CUDA is usable;
    ``ranks_on_node``: the processes torchrun runs on this node, which share its CPUs."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    # compute capabilities are NVIDIA's; a ROCm build reports its own numbers, and TF32 is a CUDA switch
    capability = torch.cuda.get_device_capability(0) if cuda and torch.version.cuda else (0, 0)
    try:
        from torch.utils._triton import has_triton

        triton = cuda and has_triton()
    except ImportError:
        triton = False
    include = sysconfig.get_paths().get("include")
    # CC and CXX are the compilers' own variables, read here the way Triton and inductor read them
    return Machine(
        cuda=cuda, capability=tuple(capability), cpus=usable_cpus(), ranks_on_node=max(ranks_on_node, 1), triton=triton,
        c_compiler=any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang")),
        cxx_compiler=any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")),
        python_headers=bool(include) and (Path(include) / "Python.h").is_file(),
    )


def resolve_recipe(settings, machine: Machine) -> Recipe:
    """Which switches this machine gets, with one line for each that was asked for and cannot apply."""
    fallbacks: list[str] = []

    tf32 = settings.tf32
    if tf32 and not machine.cuda:
        tf32 = False
        fallbacks.append("QA_TF32: no CUDA device; fp32 matmuls stay exact")
    elif tf32 and machine.capability < (8, 0):
        tf32 = False
        fallbacks.append(f"QA_TF32: the GPU (compute capability {machine.capability[0]}.{machine.capability[1]}) "
                         "predates Ampere and has no TF32")

    # torch >= 2.4 has fused AdamW kernels for CUDA and CPU, the only devices the job runs on; on
    # CPU its optimizer step is about 4x faster than foreach, 1.07x per training step
    # (bench/RESULTS.md), so on everywhere
    fused = settings.fused_adamw

    compile_ = settings.compile == "true" or (settings.compile == "auto" and machine.cuda)
    if compile_:
        missing = _compile_missing(machine)
        if missing:
            compile_ = False
            fallbacks.append(f"QA_COMPILE={settings.compile}: {missing}; running eager")

    pin = settings.pin_memory
    if pin and not machine.cuda:
        pin = False
        fallbacks.append("QA_PIN_MEMORY: no CUDA device; nothing to pin for")

    # every process on the node counts its workers and compile threads from the same CPUs: each takes its share
    share = max(machine.cpus // max(machine.ranks_on_node, 1), 1)
    workers = settings.dataloader_workers
    if workers == "auto":
        # CPU: worker processes only take cores from the model (bench/RESULTS.md)
        workers = min(MAX_CUDA_DATALOADER_WORKERS, max(share - 1, 0)) if machine.cuda else 0

    return Recipe(tf32=tf32, fused_adamw=fused, compile=compile_, pin_memory=pin, dataloader_workers=workers,
                  pad_to_multiple_of=pad_to_multiple_of(machine.cuda, compile_), compile_threads=min(share, 32),
                  fallbacks=tuple(fallbacks))


def _compile_missing(machine: Machine) -> str | None:
    if machine.cuda:
        if not machine.triton:
            return "Triton is not installed"
        if not machine.c_compiler:
            return "no C compiler for Triton's launcher (install gcc, or set CC)"
    elif not machine.cxx_compiler:
        return "no C++ compiler for inductor's CPU kernels (install g++, or set CXX)"
    if not machine.python_headers:
        return "no Python.h (install the python3-dev package)"
    return None


def pad_to_multiple_of(cuda: bool, compiled: bool) -> int | None:
    """Bucket batch lengths: multiples of 8 on CUDA or when compiled, exact lengths otherwise.

    Compiled, the number of distinct batch shapes is then at most max_length / 8 per batch size,
    whatever the data; in practice torch.compile marks the length dynamic at its second shape and
    stops recompiling (the ``compile`` log line counts the graphs). On CPU eager, padding is pure
    cost, so none.
    """
    return CUDA_PAD_MULTIPLE if cuda or compiled else None


def set_compile_threads(threads: int) -> None:
    """Inductor's compile worker pool for this process: its share of the node's CPUs, not every CPU the pod has
    (Inductor counts the CPUs it sees, up to 32, in each of torchrun's processes). Before the first compile."""
    import torch._inductor.config

    torch._inductor.config.compile_threads = threads


def set_matmul_precision(tf32: bool) -> None:
    """TF32 on or off for fp32 matmuls, through the one API every reader agrees with.

    transformers turns TF32 on through torch's new generic ``torch.backends.fp32_precision``
    (whenever it compiles in bf16, even with ``tf32=False``), accelerate through the legacy
    ``allow_tf32`` flag, and torch >= 2.9 raises on a legacy read once the two disagree; Inductor
    (2.10, 2.11) reads the legacy flag when it lowers a ``bmm``, so a compiled model with eager
    attention crashed at its first step on Ampere and later GPUs. Called once the Trainer exists:
    the generic flag goes back to "none" (each backend its own) and
    ``torch.set_float32_matmul_precision`` sets the legacy and the new flag together.
    """
    import torch

    if hasattr(torch.backends, "fp32_precision"):
        torch.backends.fp32_precision = "none"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


class CompileFallback(logging.Filter):
    """A model that fails to compile runs eager, with one ``speed_fallback`` line instead of a crash.

    ``guard_compile`` makes torch.compile fall back to eager for a frame it cannot compile
    (``torch._dynamo.config.suppress_errors``) and compile the backward with the forward, so a
    backward that fails to compile is caught there too, not at the first ``loss.backward()``.
    Dynamo reports each suppressed error as a warning with a traceback ("WON'T CONVERT ..."), on
    its own logger; this filter turns the first into the ``speed_fallback`` line and drops the
    later ones (the same fallback, frame after frame). Any other warning there (a recompile limit
    hit, say) passes on as it is, and does not count as the failure.
    """

    LOGGER = "torch._dynamo.convert_frame"

    def __init__(self):
        super().__init__()
        self.reported = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not _suppressed_compile_error(record):
            return True
        if not self.reported:
            self.reported = True
            error = _innermost(record.exc_info[1]) if record.exc_info else None
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}" \
                if error else record.getMessage().splitlines()[0]
            log.warning(f"QA_COMPILE: torch.compile failed ({reason[:300]}); running eager",
                        extra={"event": "speed_fallback", "setting": "QA_COMPILE"})
        return False


def _suppressed_compile_error(record: logging.LogRecord) -> bool:
    """Dynamo's line for an error it suppressed (``suppress_errors``): its traceback, under "WON'T CONVERT"."""
    return record.exc_info is not None and str(record.msg).startswith("WON'T CONVERT")


def _innermost(error: BaseException) -> BaseException:
    """The error a compiler wrapper (BackendCompilerFailed, InductorError) carries: the one that says why."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if inner is None:
            break
        error = inner
    return error


def guard_compile() -> CompileFallback:
    """Install the eager fallback for torch.compile errors (once per process); see ``CompileFallback``."""
    import torch._dynamo
    import torch._functorch.config

    torch._dynamo.config.suppress_errors = True
    if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):
        torch._functorch.config.force_non_lazy_backward_lowering = True
    logger = logging.getLogger(CompileFallback.LOGGER)
    for existing in logger.filters:
        if isinstance(existing, CompileFallback):
            return existing
    fallback = CompileFallback()
    logger.addFilter(fallback)
    return fallback


def log_recipe(recipe: Recipe) -> None:
    """Log the recipe and each fallback, one line each."""
    for line in recipe.fallbacks:
        log.info(line, extra={"event": "speed_fallback", "setting": line.split(":", 1)[0].split("=")[0]})
    log.info("speed recipe", extra={"event": "speed_recipe", **recipe.as_dict()})
