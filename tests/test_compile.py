"""torch.compile and TF32, set one way, and a compile failure that falls back to eager instead of crashing.

transformers sets TF32 through torch's new generic precision flag; Inductor 2.10/2.11 reads the
legacy ``allow_tf32`` flag when it lowers a ``bmm`` (eager attention), and that read raises once
the two APIs disagree. The GPU is the only place TF32 is on, so the TF32 switch is turned on here
the way transformers turns it on, and what Inductor reads is checked, then a real CPU compile runs.
"""
import logging
import math

import pytest
import torch

from job.runtime.recipe import CompileFallback, Machine, resolve_recipe
from job.settings import load_settings
from job.train import build_trainer, compile_stats, load_model, training_arguments
from tests.test_train import fallback_lines

CPU = Machine(cuda=False, cpus=2, cxx_compiler=True, c_compiler=True, python_headers=True)


@pytest.fixture(autouse=True)
def clean_torch_state():
    """Each test starts and ends with torch's defaults: TF32 off, no compiled graphs, dynamo's error policy."""
    import torch._dynamo
    import torch._functorch.config

    saved = (torch._dynamo.config.suppress_errors, getattr(torch._functorch.config, "force_non_lazy_backward_lowering", None))
    yield
    torch.backends.fp32_precision = "none"
    torch.set_float32_matmul_precision("highest")
    torch._dynamo.reset()
    torch._dynamo.config.suppress_errors = saved[0]
    if saved[1] is not None:
        torch._functorch.config.force_non_lazy_backward_lowering = saved[1]
    logger = logging.getLogger(CompileFallback.LOGGER)
    logger.filters = [f for f in logger.filters if not isinstance(f, CompileFallback)]


def compiled_trainer(tmp_path, tiny_model, train_rows, tf32: bool, steps: int = 1):
    import datasets

    from job.squad.features import train_features

    settings = load_settings({"QA_MODEL_NAME": str(tiny_model), "QA_WORK_DIR": str(tmp_path), "QA_MAX_STEPS": str(steps),
                              "QA_BATCH_SIZE": "4", "QA_LOGGING_STEPS": "1", "QA_COMPILE": "true", "QA_ATTENTION": "eager"})
    tokenizer, model = load_model(settings.model_name, settings.seed, settings.attention)
    windows = datasets.Dataset.from_dict(train_features(tokenizer, train_rows[:8], 128, 48))
    recipe = resolve_recipe(settings, CPU)
    args = training_arguments(settings, tmp_path / "trainer", "fp32", recipe=recipe)
    if tf32:
        torch.backends.fp32_precision = "tf32"  # what transformers' enable_tf32(True) does on an Ampere GPU
        args.tf32 = True  # the recipe's switch, as on CUDA
    return build_trainer(settings, model, tokenizer, windows, args, [])


def test_tf32_is_set_through_one_api_that_inductor_can_read(tmp_path, tiny_model, train_rows):
    compiled_trainer(tmp_path, tiny_model, train_rows, tf32=True)
    # the legacy reads Inductor makes raise on mixed APIs; here they agree with the new flag
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_tf32_off_is_off_even_where_transformers_turns_it_on(tmp_path, tiny_model, train_rows):
    torch.backends.fp32_precision = "tf32"  # transformers does so under compile with bf16, whatever tf32 says
    compiled_trainer(tmp_path, tiny_model, train_rows, tf32=False)
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.get_float32_matmul_precision() == "highest"


def test_compiled_eager_attention_with_tf32_on_trains(tmp_path, tiny_model, train_rows, caplog):
    caplog.set_level(logging.INFO)
    trainer = compiled_trainer(tmp_path, tiny_model, train_rows, tf32=True)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)
    assert compile_stats()["graphs"] >= 1  # compiled for real, by Inductor on the CPU
    assert not fallback_lines(caplog, "QA_COMPILE")


def test_a_compile_failure_trains_eager_with_one_line(tmp_path, tiny_model, train_rows, caplog, monkeypatch):
    import torch._inductor.compile_fx

    def broken(*args, **kwargs):
        raise RuntimeError("injected: Inductor cannot lower aten.bmm")

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", broken)
    caplog.set_level(logging.INFO)
    trainer = compiled_trainer(tmp_path, tiny_model, train_rows, tf32=False, steps=2)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    (line,) = fallback_lines(caplog, "QA_COMPILE")
    assert "torch.compile failed" in line.getMessage() and "injected" in line.getMessage() and "running eager" in line.getMessage()


def test_only_a_compile_failure_is_reported_as_one(caplog):
    """Another Dynamo warning before it passes on as it is; the failure after it is still the fallback line."""
    import sys

    from job.runtime.recipe import guard_compile

    caplog.set_level(logging.INFO)
    guard_compile()
    logger = logging.getLogger(CompileFallback.LOGGER)
    logger.warning("torch._dynamo hit config.recompile_limit (8)\n   function: 'forward'")
    try:
        raise RuntimeError("injected: cannot lower aten.bmm")
    except RuntimeError:
        logger.warning("WON'T CONVERT forward model.py line 10 \ndue to: \n...", exc_info=sys.exc_info())
        logger.warning("WON'T CONVERT backward model.py line 20 \ndue to: \n...", exc_info=sys.exc_info())
    (line,) = fallback_lines(caplog, "QA_COMPILE")
    assert "injected: cannot lower aten.bmm" in line.getMessage()
    passed = [r.getMessage() for r in caplog.records if r.name == CompileFallback.LOGGER]
    assert passed == ["torch._dynamo hit config.recompile_limit (8)\n   function: 'forward'"]
