"""QA_DEVICE and the GPUs torch sees: a GPU that cannot be used as asked is exit 2 at start, never a silent CPU run,
a crash at the first kernel or nn.DataParallel.

``choose_device`` is driven with made-up GPUs; the job path is driven with torch.cuda's probes
monkeypatched (the one thing that differs on a GPU machine) and, once, for real: this machine has
no GPU, so ``QA_DEVICE=cuda`` must stop the job.
"""
import pytest
import torch

from job.runtime.device import Gpus, choose_device, has_kernels
from job.errors import ConfigError
from job.runtime.preemption import StopRequest
from job.runtime.ranks import Ranks
from job.settings import load_settings
from tests.support.jobrun import job_env, run_job

CU130 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")  # torch's CUDA 13 wheels for x86-64
H100 = Gpus(cuda_build="13.0", usable=True, count=1, name="NVIDIA H100 80GB HBM3", capability=(9, 0), arch_list=CU130)
V100 = Gpus(cuda_build="13.0", usable=True, count=1, name="Tesla V100-SXM2-16GB", capability=(7, 0), arch_list=CU130)
NO_DRIVER = Gpus(cuda_build="13.0", problem="Found no NVIDIA driver on your system")
CPU_WHEEL = Gpus(problem="this torch is a CPU build (no CUDA in the wheel)")


def eight(gpus: Gpus) -> Gpus:
    return Gpus(**{**gpus.__dict__, "count": 8})


@pytest.mark.parametrize("setting, gpus, world, local, expected", [
    ("auto", H100, 1, 1, "cuda"),
    ("cuda", H100, 1, 1, "cuda"),
    ("cpu", H100, 1, 1, "cpu"),
    ("auto", NO_DRIVER, 1, 1, "cpu"),  # auto keeps what it always did: the CPU, with a warning line
    ("auto", CPU_WHEEL, 1, 1, "cpu"),
    ("cpu", eight(H100), 1, 1, "cpu"),  # the CPU: no DataParallel either
    ("cuda", eight(H100), 8, 8, "cuda"),  # one process per GPU (job.launch)
    ("cuda", eight(H100), 16, 8, "cuda"),  # two such nodes
])
def test_device_is_chosen(setting, gpus, world, local, expected):
    assert choose_device(setting, gpus, world, local) == expected


@pytest.mark.parametrize("setting, gpus, world, local, needles", [
    ("cuda", NO_DRIVER, 1, 1, ["QA_DEVICE=cuda: no usable GPU", "Found no NVIDIA driver", "QA_DEVICE=cpu"]),
    ("cuda", CPU_WHEEL, 1, 1, ["CPU build"]),
    ("cuda", V100, 1, 1, ["compute capability 7.0", "no kernels", "sm_75", "README", "QA_DEVICE=cpu"]),
    ("auto", V100, 1, 1, ["compute capability 7.0"]),  # a crash at the first kernel otherwise
    ("cuda", eight(H100), 1, 1, ["8 GPUs are visible to one process", "DataParallel", "--gpus device=0",
                                 "python -m job.launch --nproc_per_node=8"]),
    ("auto", eight(H100), 1, 1, ["DataParallel"]),
    ("cuda", H100, 4, 4, ["4 processes on this node but 1 GPU"]),
])
def test_unusable_gpu_is_a_configuration_error_saying_what_to_do(setting, gpus, world, local, needles):
    with pytest.raises(ConfigError) as error:
        choose_device(setting, gpus, world, local)
    assert all(n in str(error.value) for n in needles), str(error.value)


@pytest.mark.parametrize("capability, arch_list, expected", [
    ((9, 0), CU130, True),
    ((8, 9), CU130, True),  # L4, L40S: sm_86 machine code runs on 8.9
    ((7, 5), CU130, True),  # T4
    ((7, 0), CU130, False),  # V100 under CUDA 13
    ((6, 0), ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"), True),  # CUDA 12.6 wheels: P100
    ((9, 0), ("sm_80", "compute_80"), True),  # PTX, compiled when loaded
    ((8, 0), ("sm_90",), False),
    ((10, 0), ("sm_100a",), True),
    ((9, 0), (), True),  # torch did not say: trust it, as torch does
    ((9, 4), ("gfx90a", "gfx942"), True),  # ROCm names its targets otherwise
])
def test_kernels_for_a_compute_capability(capability, arch_list, expected):
    assert has_kernels(capability, arch_list) is expected


def test_two_visible_gpus_stop_the_job_before_anything_is_tokenized_or_trained(tmp_path, tiny_model, monkeypatch):
    """The job path with torch.cuda saying 2 H100s: exit 2 once the data is read, before features or a Trainer."""
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 2),
                        ("get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3"),
                        ("get_device_capability", lambda i=0: (9, 0)), ("get_arch_list", lambda: list(CU130))):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    from job.pipeline import run
    from tests.support.jobrun import DATA

    settings = load_settings({"QA_WORK_DIR": str(tmp_path / "work"), "QA_OUTPUT_URI": str(tmp_path / "out"),
                              "QA_RUN_ID": "two-gpus", "QA_MODEL_NAME": str(tiny_model),
                              "QA_TRAIN_URI": str(DATA / "squad_v1_train_64.jsonl"),
                              "QA_EVAL_URI": str(DATA / "squad_v1_dev_32.jsonl")})
    with pytest.raises(ConfigError, match="2 GPUs are visible to one process.*job.launch --nproc_per_node=2"):
        run(settings, Ranks(), StopRequest())
    # the read rows (rows/*.arrow) may be there: the check stops the job once the data is read
    left = [p.relative_to(tmp_path / "work" / "two-gpus").parts[0] for p in (tmp_path / "work" / "two-gpus").glob("*/*")]
    assert set(left) <= {"rows"}, f"nothing tokenized, trained or staged: {sorted(set(left))}"


def test_cuda_required_on_a_machine_without_one_is_exit_2_with_the_reason(tmp_path, tiny_model):
    result = run_job(job_env(tmp_path, tiny_model, QA_DEVICE="cuda"))
    assert result.returncode == 2, result.stderr + result.stdout[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert "QA_DEVICE=cuda: no usable GPU" in line and ("CPU build" in line or "driver" in line), line
    assert not result.event("features") and not result.event("train_start")
