"""The speed switches run for real on CPU: their fallbacks, fused AdamW and bf16 included."""
import logging
import math

import pytest

from job.runtime.recipe import Machine, resolve_recipe
from job.settings import load_settings
from job.squad.features import train_features
from job.train import build_trainer, cpu_has_bf16, load_model, training_arguments


@pytest.fixture(scope="module")
def no_sdpa_model(tmp_path_factory):
    """A tiny ConvBERT QA model: an architecture transformers has no SDPA attention for."""
    from transformers import AutoTokenizer, ConvBertConfig, ConvBertForQuestionAnswering

    from tests.support.tiny import MINILM

    dest = tmp_path_factory.mktemp("convbert")
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM))
    config = ConvBertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, embedding_size=32, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    ConvBertForQuestionAnswering(config).save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest


def fallback_lines(caplog, setting):
    return [r for r in caplog.records if getattr(r, "event", None) == "speed_fallback" and r.setting == setting]


def test_sdpa_falls_back_to_eager_with_one_line(no_sdpa_model, caplog):
    caplog.set_level(logging.INFO, logger="job.train")
    _, model = load_model(str(no_sdpa_model), seed=0, attention="sdpa")
    assert model.config._attn_implementation == "eager"
    lines = fallback_lines(caplog, "QA_ATTENTION")
    assert len(lines) == 1 and "ConvBertForQuestionAnswering has no SDPA" in lines[0].getMessage()


@pytest.mark.parametrize("attention, expected", [("sdpa", "sdpa"), ("eager", "eager")])
def test_attention_setting_is_used(tiny_model, caplog, attention, expected):
    caplog.set_level(logging.INFO, logger="job.train")
    _, model = load_model(str(tiny_model), seed=0, attention=attention)
    assert model.config._attn_implementation == expected
    assert not fallback_lines(caplog, "QA_ATTENTION")


def run_steps(tmp_path, tiny_model, train_rows, precision, **env):
    """Two optimizer steps of the real Trainer with the job's arguments; returns (trainer, losses)."""
    settings = load_settings({"QA_MODEL_NAME": str(tiny_model), "QA_WORK_DIR": str(tmp_path), "QA_MAX_STEPS": "2",
                              "QA_BATCH_SIZE": "4", "QA_LOGGING_STEPS": "1", "QA_LEARNING_RATE": "1e-3", **env})
    tokenizer, model = load_model(settings.model_name, settings.seed, settings.attention)
    import datasets

    windows = datasets.Dataset.from_dict(train_features(tokenizer, train_rows[:16], 128, 48))
    args = training_arguments(settings, tmp_path / "trainer", precision)
    trainer = build_trainer(settings, model, tokenizer, windows, args, [])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


def test_defaults_on_cpu_train_with_every_fallback_logged(tmp_path, tiny_model, train_rows, caplog):
    caplog.set_level(logging.INFO, logger="job.runtime.recipe")
    trainer, losses = run_steps(tmp_path, tiny_model, train_rows, "fp32")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    args = trainer.args
    assert (args.torch_compile, args.dataloader_pin_memory, args.dataloader_num_workers) == (False, False, 0)
    assert {r.setting for r in caplog.records if getattr(r, "event", None) == "speed_fallback"} == {"QA_TF32", "QA_PIN_MEMORY"}
    recipe_lines = [r for r in caplog.records if getattr(r, "event", None) == "speed_recipe"]
    assert len(recipe_lines) == 1 and recipe_lines[0].compile is False


def test_fused_adamw_and_bf16_run_on_cpu(tmp_path, tiny_model, train_rows, caplog):
    caplog.set_level(logging.INFO, logger="job.train")
    trainer, losses = run_steps(tmp_path, tiny_model, train_rows, "bf16", QA_PRECISION="bf16")
    assert trainer.args.optim == "adamw_torch_fused" and trainer.optimizer.defaults.get("fused") is True
    assert trainer.args.bf16 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # an emulating CPU says so in one line; one with AVX512-BF16/AMX says nothing
    assert len(fallback_lines(caplog, "QA_PRECISION")) == (0 if cpu_has_bf16() else 1)


def test_explicit_recipe_is_used_as_given(tmp_path):
    settings = load_settings({"QA_WORK_DIR": str(tmp_path)})
    forced = resolve_recipe(load_settings({"QA_FUSED_ADAMW": "false", "QA_DATALOADER_WORKERS": "1"}), Machine(cpus=2))
    args = training_arguments(settings, tmp_path / "t", "fp32", recipe=forced)
    assert (args.optim, args.dataloader_num_workers, args.dataloader_persistent_workers) == ("adamw_torch", 1, True)


@pytest.mark.parametrize("saved", ["float16", "bfloat16"])
def test_a_half_precision_checkpoint_trains_from_fp32_master_weights(tmp_path, tiny_model, saved):
    """transformers 5 loads the saved dtype: an fp16 base model would break the fp16 loss scaler, a bf16 one barely trains."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    half = tmp_path / saved
    AutoModelForQuestionAnswering.from_pretrained(str(tiny_model)).to(getattr(torch, saved)).save_pretrained(str(half))
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(half))
    _, model = load_model(str(half), seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_pinned_batches_are_copied_without_waiting(tmp_path):
    """QA_PIN_MEMORY's point: the host-to-GPU copy of a pinned batch does not block the training loop."""
    settings = load_settings({"QA_WORK_DIR": str(tmp_path)})
    cuda = resolve_recipe(settings, Machine(cuda=True, capability=(7, 5), cpus=8))  # a T4: no TF32 to set here
    args = training_arguments(settings, tmp_path / "t", "fp32", recipe=cuda)
    assert args.dataloader_pin_memory is False  # this machine has no GPU: the Trainer drops the pinning itself
    assert args.accelerator_config.non_blocking is True
    cpu = resolve_recipe(settings, Machine(cpus=2))
    assert training_arguments(settings, tmp_path / "c", "fp32", recipe=cpu).accelerator_config.non_blocking is False

def test_length_grouped_batches_are_transformers_own(tmp_path, tiny_model, train_rows):
    """The lengths come from the Arrow offsets instead of reading every window: the same batches, in the same order."""
    import datasets
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    settings = load_settings({"QA_MODEL_NAME": str(tiny_model), "QA_WORK_DIR": str(tmp_path), "QA_BATCH_SIZE": "4"})
    tokenizer, model = load_model(settings.model_name, settings.seed)
    features = datasets.Dataset.from_dict(train_features(tokenizer, train_rows, 128, 48))
    trainer = build_trainer(settings, model, tokenizer, features, training_arguments(settings, tmp_path / "t", "fp32"), [])
    ours = trainer._get_train_sampler(trainer._remove_unused_columns(features))
    theirs = LengthGroupedSampler(4, dataset=features, model_input_name="input_ids")  # what transformers builds
    assert ours.lengths == theirs.lengths == [len(ids) for ids in features["input_ids"]]
    torch.manual_seed(3)
    order = list(ours)
    torch.manual_seed(3)
    assert order == list(theirs) and sorted(order) == list(range(len(features)))


class HostReads:
    """Every read of a tensor's value into Python (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``...) made inside
    the Trainer's step loop, by the code that made it. On a GPU each is a device-to-host copy the CPU waits for."""

    READS = {"item", "__bool__", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__"}

    def __init__(self):
        import collections

        from torch.overrides import TorchFunctionMode

        self.seen = collections.Counter()
        reads = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in reads.READS:
                    reads.record(func.__name__)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def record(self, name: str) -> None:
        import traceback

        frames = [f.name for f in traceback.extract_stack()]
        # the step, not the data: batches are drawn and collated on the host (get_batch_samples: the sampler,
        # the collator) before they go to the device; and between logging steps only: at a logging step the
        # Trainer reads the loss and the norm (once per N steps)
        if "_run_epoch" in frames and not {"get_batch_samples", "_maybe_log_save_evaluate"} & set(frames):
            self.seen[(name, frames[-3])] += 1


def test_a_training_step_reads_nothing_back_and_a_nonfinite_loss_is_still_logged(tmp_path, tiny_model, train_rows, caplog):
    """No per-step host sync (the CPU runs ahead of the GPU), yet a NaN loss shows at its logging step.

    The one read left is transformers' own in eager SDPA (does this batch have padding?, in
    ``masking_utils``); torch.compile, the CUDA default, traces it away (README "GPUs").
    """
    import datasets
    import torch

    from job.store.checkpoints import CheckpointCallback
    from job.train import ProgressLog

    caplog.set_level(logging.INFO, logger="job.train")
    settings = load_settings({"QA_MODEL_NAME": str(tiny_model), "QA_WORK_DIR": str(tmp_path), "QA_MAX_STEPS": "6",
                              "QA_BATCH_SIZE": "4", "QA_LOGGING_STEPS": "2", "QA_LEARNING_RATE": "1e-3"})
    tokenizer, model = load_model(settings.model_name, settings.seed, settings.attention)
    windows = datasets.Dataset.from_dict(train_features(tokenizer, train_rows[:24], 128, 48))
    stop = type("Stop", (), {"requested": False})()
    callbacks = [ProgressLog(4), CheckpointCallback(every_steps=0, every_minutes=0, stop=stop, uploader=None)]
    trainer = build_trainer(settings, model, tokenizer, windows, training_arguments(settings, tmp_path / "t", "fp32"), callbacks)
    assert trainer.args.logging_nan_inf_filter is False
    compute_loss, calls = trainer.compute_loss, []

    def nan_at_step_3(*args, **kwargs):  # the loss's value only: the gradients, and so the weights, stay finite
        loss = compute_loss(*args, **kwargs)
        calls.append(1)
        return loss + torch.tensor(float("nan")) if len(calls) == 3 else loss

    trainer.compute_loss = nan_at_step_3
    reads = HostReads()
    with reads.mode:
        trainer.train()
    assert {where for _, where in reads.seen} <= {"_ignore_bidirectional_mask_sdpa"}, reads.seen
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and math.isnan(losses[1]) and math.isfinite(losses[0]) and math.isfinite(losses[2])
    (warning,) = [r for r in caplog.records if getattr(r, "event", None) == "nonfinite_loss"]
    assert warning.step == 4
