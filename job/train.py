"""Fine-tune with the transformers ``Trainer``: precision, per-batch padding, progress lines, resume."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainerCallback, TrainingArguments, set_seed)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from job.errors import ConfigError, StorageUnavailable
from job.logs import resolve_format
from job.tracking import trainer_integrations

log = logging.getLogger(__name__)


def resolve_precision(setting: str, cuda: bool, bf16_supported: bool) -> str:
    """``auto``: bf16 where the GPU supports it, else fp16 on CUDA, fp32 on CPU."""
    if setting == "auto":
        return ("bf16" if bf16_supported else "fp16") if cuda else "fp32"
    if setting == "fp16" and not cuda:
        raise ConfigError("QA_PRECISION=fp16: needs a CUDA GPU; use auto, bf16 or fp32 on CPU")
    if setting == "bf16" and cuda and not bf16_supported:
        raise ConfigError("QA_PRECISION=bf16: this GPU does not support bf16; use auto or fp16")
    return setting


def load_model(model_name: str, seed: int):
    """Tokenizer and QA model; a missing local path is a configuration error, an unreachable hub exit 75."""
    set_seed(seed)  # a fresh QA head is drawn from the global RNG: seed it, or QA_SEED repeats nothing
    # hub ids are "name" or "org/name"; anything else is a path
    looks_local = model_name.startswith(("/", ".", "~")) or model_name.count("/") > 1
    if looks_local and not Path(model_name).expanduser().is_dir():
        raise ConfigError(f"QA_MODEL_NAME={model_name}: no such model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        model = AutoModelForQuestionAnswering.from_pretrained(model_name)
    except OSError as exc:
        first = str(exc).splitlines()[0][:200]
        if Path(model_name).expanduser().is_dir() or "offline" not in first.lower() and "connect" not in first.lower():
            raise ConfigError(f"QA_MODEL_NAME={model_name}: cannot load ({first})") from None
        raise StorageUnavailable(f"QA_MODEL_NAME={model_name}: hub unreachable ({first})") from None
    if not tokenizer.is_fast:
        raise ConfigError(f"QA_MODEL_NAME={model_name}: needs a fast tokenizer (character offsets)")
    return tokenizer, model


def check_window_fits(model, max_length: int) -> None:
    """A window longer than the model's position table fails deep inside the first forward pass."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise ConfigError(f"QA_MAX_LENGTH={max_length}: longer than this model's {limit} positions; use at most {limit}")


class ProgressLog(TrainerCallback):
    """A JSON line per logging step: step, epoch, loss, learning rate, samples/s and ETA."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self._t0 = self._first_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._first_step = time.monotonic(), state.global_step
        log.info("training started", extra={"event": "train_start", "step": state.global_step, "max_steps": state.max_steps})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        done = state.global_step - self._first_step
        elapsed = time.monotonic() - self._t0
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        log.info("progress", extra={
            "event": "progress", "step": state.global_step, "max_steps": state.max_steps,
            "epoch": round(state.epoch or 0.0, 4), "loss": logs.get("loss"), "learning_rate": logs.get("learning_rate"),
            "samples_per_second": round(rate * self.samples_per_step, 2),
            "eta_seconds": round((state.max_steps - state.global_step) / rate, 1) if rate else None,
        })


def training_arguments(settings, output_dir: Path, precision: str) -> TrainingArguments:
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        gradient_accumulation_steps=settings.grad_accum_steps,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        seed=settings.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        dataloader_num_workers=settings.dataloader_workers,
        dataloader_pin_memory=cuda,
        logging_strategy="steps",
        logging_steps=settings.logging_steps,
        # saving is decided by CheckpointCallback alone (steps, minutes, SIGTERM, last step)
        save_strategy="no",
        save_total_limit=None,
        # TensorBoard runs as job.tracking.RunTensorBoard (the run's own folder); the others as the Trainer has them
        report_to=trainer_integrations(settings.trackers),
        # bars only for JSON lines on a terminal: the text format has its own progress lines
        disable_tqdm=not sys.stdout.isatty() or resolve_format(settings.log_format) == "text",
        ddp_find_unused_parameters=False,
    )


def build_trainer(settings, model, tokenizer, train_dataset, args: TrainingArguments, callbacks) -> Trainer:
    # pad each batch to its own longest window (multiple of 8 for tensor cores), never to 384
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if torch.cuda.is_available() else None)
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                      processing_class=tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # prints raw dicts; ProgressLog replaces it
    if args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
    return trainer


def train(trainer: Trainer, resume_from: Path | None) -> dict:
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics = dict(result.metrics)
    log.info("training finished", extra={"event": "train_end", "step": trainer.state.global_step,
                                          "train_runtime": metrics.get("train_runtime"),
                                          "train_samples_per_second": metrics.get("train_samples_per_second")})
    return metrics
