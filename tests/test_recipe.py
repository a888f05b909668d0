"""The speed recipe: a pure function of the settings and a machine description, table-driven.

Every fallback is driven on CPU with a made-up machine: no CUDA, a GPU before Ampere, no
compiler. The switches themselves run for real in tests/test_train.py.
"""
import pytest

from job.runtime.recipe import Machine, pad_to_multiple_of, resolve_recipe
from job.settings import load_settings

CPU = Machine(cuda=False, cpus=2, cxx_compiler=True, c_compiler=True, python_headers=True)
H100 = Machine(cuda=True, capability=(9, 0), cpus=16, triton=True, c_compiler=True, cxx_compiler=True, python_headers=True)
V100 = Machine(cuda=True, capability=(7, 0), cpus=8, triton=True, c_compiler=True, cxx_compiler=True, python_headers=True)
BARE_CUDA_IMAGE = Machine(cuda=True, capability=(8, 0), cpus=8, triton=True)  # no gcc, no Python.h


def recipe(machine, **env):
    return resolve_recipe(load_settings({f"QA_{k.upper()}": v for k, v in env.items()}), machine)


@pytest.mark.parametrize("case, machine, env, expected", [
    ("CPU defaults: nothing that slows CPU training", CPU, {},
     dict(tf32=False, fused_adamw=True, compile=False, pin_memory=False, dataloader_workers=0, pad_to_multiple_of=None)),
    ("H100 defaults: everything on", H100, {},
     dict(tf32=True, fused_adamw=True, compile=True, pin_memory=True, dataloader_workers=4, pad_to_multiple_of=8)),
    ("V100: no TF32, the rest on", V100, {},
     dict(tf32=False, fused_adamw=True, compile=True, pin_memory=True, dataloader_workers=4, pad_to_multiple_of=8)),
    ("CUDA image without a compiler runs eager", BARE_CUDA_IMAGE, {},
     dict(tf32=True, fused_adamw=True, compile=False, pin_memory=True, dataloader_workers=4, pad_to_multiple_of=8)),
    ("everything off on H100", H100, dict(tf32="false", fused_adamw="false", compile="false", pin_memory="false", dataloader_workers="0"),
     dict(tf32=False, fused_adamw=False, compile=False, pin_memory=False, dataloader_workers=0, pad_to_multiple_of=8)),
    ("forced on CPU: compile applies, compiled lengths bucketed", CPU, dict(compile="true"),
     dict(tf32=False, fused_adamw=True, compile=True, pin_memory=False, dataloader_workers=0, pad_to_multiple_of=8)),
    ("explicit worker count wins", CPU, dict(dataloader_workers="3"),
     dict(dataloader_workers=3)),
    ("few CPUs on a GPU node keep one for the trainer", Machine(cuda=True, capability=(9, 0), cpus=2, triton=True), {},
     dict(dataloader_workers=1)),
    ("16 CPUs for 8 GPU processes: each takes its 2 (one worker, two compile threads), not the pod's 16",
     Machine(cuda=True, capability=(9, 0), cpus=16, ranks_on_node=8, triton=True, c_compiler=True, python_headers=True), {},
     dict(dataloader_workers=1, compile_threads=2)),
    ("one process alone has the node", H100, {}, dict(dataloader_workers=4, compile_threads=16)),
])
def test_resolve_recipe(case, machine, env, expected):
    got = recipe(machine, **env).as_dict()
    assert {k: got[k] for k in expected} == expected, case


@pytest.mark.parametrize("case, machine, env, setting, needle", [
    ("TF32 on CPU", CPU, {}, "QA_TF32", "no CUDA device"),
    ("TF32 before Ampere", V100, {}, "QA_TF32", "compute capability 7.0"),
    ("pinned memory on CPU", CPU, {}, "QA_PIN_MEMORY", "no CUDA device"),
    ("compile without a C++ compiler", Machine(cpus=2, python_headers=True), dict(compile="true"), "QA_COMPILE", "no C++ compiler"),
    ("compile without Triton", Machine(cuda=True, capability=(9, 0)), {}, "QA_COMPILE", "Triton is not installed"),
    ("compile without a C compiler for Triton", BARE_CUDA_IMAGE, {}, "QA_COMPILE", "no C compiler"),
    ("compile without Python.h", Machine(cpus=2, cxx_compiler=True), dict(compile="true"), "QA_COMPILE", "Python.h"),
])
def test_each_fallback_is_one_line(case, machine, env, setting, needle):
    lines = [line for line in recipe(machine, **env).fallbacks if line.startswith(setting)]
    assert len(lines) == 1 and needle in lines[0], (case, lines)


def test_nothing_falls_back_where_everything_applies():
    assert recipe(H100).fallbacks == ()
    assert recipe(CPU, tf32="false", pin_memory="false").fallbacks == ()  # auto choices on CPU are not fallbacks


def test_padding_buckets():
    assert pad_to_multiple_of(cuda=False, compiled=False) is None  # CPU eager: padding is pure cost
    assert pad_to_multiple_of(cuda=True, compiled=False) == 8
    assert pad_to_multiple_of(cuda=False, compiled=True) == 8


@pytest.mark.parametrize("env, needle", [
    ({"QA_COMPILE": "yes"}, "QA_COMPILE"),
    ({"QA_FUSED_ADAMW": "sometimes"}, "QA_FUSED_ADAMW"),
    ({"QA_ATTENTION": "flash"}, "QA_ATTENTION"),
    ({"QA_DATALOADER_WORKERS": "many"}, "QA_DATALOADER_WORKERS: must be auto or a number"),
    ({"QA_DATALOADER_WORKERS": "-1"}, "QA_DATALOADER_WORKERS: must be auto or a number"),
    ({"QA_PREPROCESS_WORKERS": "0"}, "QA_PREPROCESS_WORKERS"),
])
def test_bad_speed_settings_name_the_variable(env, needle):
    from job.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        load_settings(env)
