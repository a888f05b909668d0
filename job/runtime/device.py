"""Which device the job trains on (``QA_DEVICE``), decided once, before training, against what torch can use.

Three ways a GPU run goes wrong without a word, each an exit 2 before anything is tokenized or
trained instead (the check comes after the data is read: a bad row still ends the run before
torch is imported):

- ``QA_DEVICE=cuda`` (the GPU image and manifests) on a pod that cannot use CUDA (no device
  plugin, wrong runtime class, a driver too old for the CUDA build, a CPU wheel): without the
  check the job trains on the CPU, for hours. The message is torch's own reason.
- A GPU the installed torch has no kernels for (a V100, compute capability 7.0, under the CUDA 13
  build): without the check it crashes at the first kernel, after the data is downloaded.
- More than one visible GPU in one process: the Trainer then wraps the model in
  ``nn.DataParallel``, 12 x N windows per step at the recipe's learning rate (another model), with
  progress and resume arithmetic that assume one device. One GPU per process, or ``job.launch``.

``choose_device`` is a pure function of the setting, a ``Gpus`` description and the process
layout, so every case is tested on CPU with made-up GPUs; ``probe_gpus`` fills the description in.
``QA_DEVICE=auto`` keeps the old behaviour (CUDA when usable, else the CPU) with one warning line
when a CUDA build found no usable GPU.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from job.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gpus:
    """What the installed torch sees: made up in tests, probed for real by ``probe_gpus``."""

    cuda_build: str | None = None  # torch.version.cuda; None for a CPU (or ROCm) wheel
    usable: bool = False  # torch.cuda.is_available()
    count: int = 0  # visible devices (CUDA_VISIBLE_DEVICES, the device plugin's share)
    problem: str = ""  # why CUDA is not usable, in torch's own words
    name: str = ""  # device 0
    capability: tuple[int, int] = (0, 0)  # compute capability of device 0
    arch_list: tuple[str, ...] = ()  # what this torch has kernels for: sm_80, compute_90, ...
    torch_version: str = ""


def probe_gpus() -> Gpus:
    """Ask torch, without creating a CUDA context where CUDA works (every rank would put one on GPU 0)."""
    import torch

    build = torch.version.cuda or getattr(torch.version, "hip", None)  # ROCm runs through torch.cuda too
    if build is None:
        return Gpus(torch_version=torch.__version__, problem="this torch is a CPU build (no CUDA in the wheel)")
    if not torch.cuda.is_available():
        return Gpus(cuda_build=build, torch_version=torch.__version__, problem=_init_problem(torch))
    return Gpus(cuda_build=build, usable=True, count=torch.cuda.device_count(), name=torch.cuda.get_device_name(0),
                capability=tuple(torch.cuda.get_device_capability(0)), arch_list=tuple(torch.cuda.get_arch_list()),
                torch_version=torch.__version__)


def _init_problem(torch) -> str:
    """torch's reason for an unusable CUDA (no driver, a driver too old, no device), as one line."""
    try:
        torch.cuda.init()  # CUDA does not work here, so this creates nothing: it raises with the reason
        reason = "CUDA is not available"
    except Exception as exc:  # noqa: BLE001  RuntimeError or AssertionError, depending on the cause
        reason = " ".join(str(exc).split())[:300]
    return (f"{reason} (on Kubernetes check the nvidia.com/gpu request, the NVIDIA device plugin and the runtime "
            "class; with Docker, --gpus)")


def choose_device(setting: str, gpus: Gpus, world_size: int = 1, local_world_size: int = 1) -> str:
    """``"cuda"`` or ``"cpu"`` for ``QA_DEVICE=setting``; ConfigError (exit 2) when the GPU cannot be used as asked."""
    if setting == "cpu":
        return "cpu"
    if not gpus.usable:
        if setting == "cuda":
            raise ConfigError(f"QA_DEVICE=cuda: no usable GPU: {gpus.problem or 'CUDA is not available'}; "
                              "fix the node or the pod spec, or set QA_DEVICE=cpu to train on the CPU")
        return "cpu"
    if not has_kernels(gpus.capability, gpus.arch_list):
        major, minor = gpus.capability
        built = " ".join(gpus.arch_list)
        raise ConfigError(f"QA_DEVICE={setting}: the GPU {gpus.name} (compute capability {major}.{minor}) has no kernels "
                          f"in this torch {gpus.torch_version} (CUDA {gpus.cuda_build}, built for {built}); use an image "
                          "built for it (README, section GPUs: the CUDA 12.6 build for V100 and older) or QA_DEVICE=cpu")
    if world_size == 1 and gpus.count > 1:
        raise ConfigError(f"QA_DEVICE={setting}: {gpus.count} GPUs are visible to one process, and the Trainer would "
                          "spread each step over them with nn.DataParallel (another batch size, so another model, and "
                          "the slow way to use several GPUs); give the container one GPU (docker run --gpus device=0, "
                          f"or CUDA_VISIBLE_DEVICES=0), or run one process per GPU: python -m job.launch "
                          f"--nproc_per_node={gpus.count}")
    if local_world_size > gpus.count:
        raise ConfigError(f"QA_DEVICE={setting}: {local_world_size} processes on this node but {gpus.count} GPU(s) "
                          f"visible; use --nproc_per_node={gpus.count} or give the pod more GPUs")
    return "cuda"


def has_kernels(capability: tuple[int, int], arch_list) -> bool:
    """Whether a GPU of ``capability`` can run this torch: machine code for its major version at or
    below its minor (sm_80 runs on 8.6, not on 7.x or 9.0), or PTX at or below it (compiled when
    loaded). A list without NVIDIA architectures (empty, or ROCm's gfx names) is trusted, as torch
    itself does."""
    device = capability[0] * 10 + capability[1]
    codes = [m.groups() for m in (re.fullmatch(r"(sm|compute)_(\d+)[af]?", a) for a in arch_list) if m]
    if not codes:
        return True
    return any(int(code) <= device if kind == "compute" else int(code) // 10 == capability[0] and int(code) % 10 <= capability[1]
               for kind, code in codes)


def check_device(settings, world_size: int = 1, local_world_size: int = 1, gpus: Gpus | None = None) -> str:
    """``choose_device`` on this machine, logged once; the exit-2 check every run starts with."""
    gpus = probe_gpus() if gpus is None else gpus
    device = choose_device(settings.device, gpus, world_size, local_world_size)
    fields = {"event": "device", "setting": settings.device, "device": device, "gpus": gpus.count,
              "gpu": gpus.name or None, "torch": gpus.torch_version, "cuda_build": gpus.cuda_build}
    if device == "cpu" and settings.device == "auto" and gpus.cuda_build:
        log.warning(f"QA_DEVICE=auto: no usable GPU ({gpus.problem}); training on the CPU", extra=fields)
    else:
        log.info(f"training on {gpus.name if device == 'cuda' else 'the CPU'}", extra=fields)
    return device


def uses_cuda(settings) -> bool:
    """Whether this run uses CUDA: the decision ``check_device`` validated at start, asked again cheaply."""
    if settings.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()
