"""Fine-tune with the transformers ``Trainer``: precision, the speed recipe, per-batch padding, progress lines, resume."""
from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import torch
from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainerCallback, TrainingArguments, set_seed)
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from job.runtime.device import uses_cuda
from job.errors import ConfigError, Diverged, StorageUnavailable
from job.observe.logs import resolve_format
from job.observe.trackers import trainer_integrations
from job.runtime.recipe import (Recipe, guard_compile, log_recipe, pad_to_multiple_of, probe_machine, resolve_recipe,
                                set_compile_threads, set_matmul_precision)
from job.store.models import check_json_files

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


def precision_for(settings) -> str:
    """``QA_PRECISION`` resolved for the device this run uses."""
    cuda = uses_cuda(settings)
    return resolve_precision(settings.precision, cuda, cuda and torch.cuda.is_bf16_supported(including_emulation=False))


class Fp32Head(torch.nn.Linear):
    """The QA head computed in fp32 even under autocast: start/end logits are accumulated and kept in fp32
    (with TF32 on, its matmul rounds the inputs to TF32's 10-bit mantissa, as every fp32 matmul then does).

    Under bf16 autocast the head's matmul would round every logit to 8 bits of mantissa, so two
    spans tie that fp32 tells apart, and a GPU night's answers would not be comparable with the
    holder's. The encoder stays in the autocast dtype; the head is 2 x hidden multiply-adds per
    token. Same parameters and state dict as the ``nn.Linear`` it replaces (only the class changes).
    """

    def forward(self, hidden):
        with torch.autocast(hidden.device.type, enabled=False):
            bias = self.bias.float() if self.bias is not None else None
            return torch.nn.functional.linear(hidden.float(), self.weight.float(), bias)


def load_model(model_name: str, seed: int, attention: str = "sdpa"):
    """Tokenizer and QA model; a missing local path is a configuration error, an unreachable hub exit 75.

    ``attention="sdpa"`` (``QA_ATTENTION``) uses torch's fused scaled-dot-product attention where
    the architecture has it and falls back to the eager implementation, with one log line, where
    it does not; ``"eager"`` forces the eager one.
    """
    set_seed(seed)  # a fresh QA head is drawn from the global RNG: seed it, or QA_SEED repeats nothing
    # hub ids are "name" or "org/name"; anything else is a path
    looks_local = model_name.startswith(("/", ".", "~")) or model_name.count("/") > 1
    if looks_local and not Path(model_name).expanduser().is_dir():
        raise ConfigError(f"QA_MODEL_NAME={model_name}: no such model directory")
    check_json_files(model_name, f"QA_MODEL_NAME={model_name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        # transformers picks SDPA by default where the model supports it and eager otherwise, quietly;
        # asking for "sdpa" explicitly would raise on models without it instead of falling back
        # dtype: fp32 master weights whatever the checkpoint was saved in (transformers 5 keeps the
        # saved dtype: an fp16 one breaks the fp16 loss scaler, a bf16 one barely trains)
        model = AutoModelForQuestionAnswering.from_pretrained(
            model_name, attn_implementation="eager" if attention == "eager" else None, dtype=torch.float32)
    except OSError as exc:
        first = str(exc).splitlines()[0][:200]
        if Path(model_name).expanduser().is_dir() or "offline" not in first.lower() and "connect" not in first.lower():
            raise ConfigError(f"QA_MODEL_NAME={model_name}: cannot load ({first})") from None
        raise StorageUnavailable(f"QA_MODEL_NAME={model_name}: hub unreachable ({first})") from None
    if not tokenizer.is_fast:
        raise ConfigError(f"QA_MODEL_NAME={model_name}: needs a fast tokenizer (character offsets)")
    if type(getattr(model, "qa_outputs", None)) is torch.nn.Linear:  # BERT, DistilBERT, RoBERTa, ... heads
        model.qa_outputs.__class__ = Fp32Head
    used = getattr(model.config, "_attn_implementation", None)
    if attention == "sdpa" and used != "sdpa":
        log.info(f"QA_ATTENTION=sdpa: {type(model).__name__} has no SDPA attention; using {used}",
                 extra={"event": "speed_fallback", "setting": "QA_ATTENTION"})
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


def training_arguments(settings, output_dir: Path, precision: str, recipe: Recipe | None = None,
                       ranks_on_node: int = 1) -> TrainingArguments:
    """The Trainer's arguments; ``recipe`` defaults to this machine's (logged, with its fallbacks), its CPUs
    shared by the ``ranks_on_node`` processes torchrun runs on this node."""
    cuda = uses_cuda(settings)
    if recipe is None:
        recipe = resolve_recipe(settings, probe_machine(cuda, ranks_on_node))
        log_recipe(recipe)
    if recipe.compile:
        set_compile_threads(recipe.compile_threads)
    if precision == "bf16" and not cuda and not cpu_has_bf16():
        log.warning("QA_PRECISION=bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX); it runs emulated, "
                    "likely slower than fp32", extra={"event": "speed_fallback", "setting": "QA_PRECISION"})
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
        # None leaves TF32 as torch has it; True is only passed where it exists (it raises elsewhere)
        tf32=True if recipe.tf32 else None,
        # fused: one kernel for the whole AdamW update; "adamw_torch" is the multi-tensor (foreach) one
        optim="adamw_torch_fused" if recipe.fused_adamw else "adamw_torch",
        torch_compile=recipe.compile,
        dataloader_num_workers=recipe.dataloader_workers,
        dataloader_pin_memory=recipe.pin_memory,
        # pinned batches are copied to the GPU without waiting for the copy (the point of pinning)
        accelerator_config={"non_blocking": recipe.pin_memory},
        # workers forked once for the whole run instead of once per epoch
        dataloader_persistent_workers=recipe.dataloader_workers > 0,
        logging_strategy="steps",
        logging_steps=settings.logging_steps,
        # the filter tests every step's loss for NaN/inf in Python: a device-to-host read each step, so
        # the CPU would wait for the GPU and never run ahead; and it dropped NaN and infinite step losses
        # from the logged mean, so weights gone NaN were logged as a loss of 0.0. Off: every step counts,
        # and a non-finite loss shows in the progress line of its logging step, with a nonfinite_loss
        # warning (_Trainer.log)
        logging_nan_inf_filter=False,
        # saving is decided by CheckpointCallback alone (steps, minutes, SIGTERM, last step)
        save_strategy="no",
        save_total_limit=None,
        # TensorBoard runs as job.observe.tracking.RunTensorBoard (the run's own folder); the others as the Trainer has them
        report_to=trainer_integrations(settings.trackers),
        # bars only for JSON lines on a terminal: the text format has its own progress lines
        disable_tqdm=not sys.stdout.isatty() or resolve_format(settings.log_format) == "text",
        ddp_find_unused_parameters=False,
        ddp_timeout=int(settings.process_group_timeout_seconds),  # NCCL's watchdog aborts a collective past it
        # distillation: the Trainer keeps only the columns the model's forward takes or labels name; each
        # training window's index travels to the collator as a label (job.distill.WINDOW). An eval batch has
        # none of them, so prediction is unchanged.
        label_names=["start_positions", "end_positions", "teacher_window"] if getattr(settings, "distilling", False) else None,
    )


class _Trainer(Trainer):
    """The Trainer, with ``group_by_length``'s window lengths read from the Arrow column's offsets,
    and a non-finite loss reported at its logging step.

    transformers finds the lengths by reading every training window in Python (``len(input_ids)``
    of each): seconds per 100,000 windows, and every page of the memory-mapped features pulled into
    the process. The list offsets hold the same numbers, so the sampler, and the order of the
    batches, are exactly what they were (tests/test_train.py).
    """

    def get_test_dataloader(self, test_dataset):
        """One prediction DataLoader per dataset for the whole run, as the Trainer keeps its eval loader.

        With persistent workers (``QA_DATALOADER_WORKERS`` > 0) the Trainer builds a new loader for every
        ``predict``, and accelerate keeps every loader it prepared: each evaluation during training
        forked another set of workers, and none of them ever exited.
        """
        key = getattr(test_dataset, "_fingerprint", None)
        if key is None or not self.args.dataloader_persistent_workers:
            return super().get_test_dataloader(test_dataset)
        loaders = self.__dict__.setdefault("_prediction_loaders", {})
        if key not in loaders:
            loaders[key] = super().get_test_dataloader(test_dataset)
        return loaders[key]

    def log(self, logs: dict, *args, **kwargs) -> None:
        """A NaN or infinite loss since the last logging step is logged as it is, with one warning line.

        The loss accumulates on the device between logging steps (no per-step read: see
        ``logging_nan_inf_filter``), where the Trainer reads it anyway. It then resets the sum by
        subtracting it from itself, which leaves a NaN a NaN: the sum is zeroed here, so a loss
        that recovers (fp16's scaler skips an overflowing step) is logged finite again.
        """
        loss = logs.get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            log.warning("non-finite training loss", extra={"event": "nonfinite_loss", "step": self.state.global_step,
                                                           "loss": str(loss)})
            accumulated = getattr(self, "_tr_loss", None)
            if isinstance(accumulated, torch.Tensor):
                accumulated.zero_()  # on the device, queued like any kernel: no wait
        super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not hasattr(dataset, "with_format"):
            return super()._get_train_sampler(train_dataset)
        import pyarrow.compute as pc

        name = self.processing_class.model_input_names[0] if self.processing_class is not None else "input_ids"
        lengths = pc.list_value_length(dataset.with_format("arrow")[name]).to_numpy().tolist()
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=lengths)


def build_trainer(settings, model, tokenizer, train_dataset, args: TrainingArguments, callbacks, loss=None) -> Trainer:
    """The job's Trainer; ``loss`` (``job.distill.Distillation``) brings its own collator and loss function.

    Its loss is a per-batch mean, and the Trainer adds up the accumulated batches' losses: divided
    here by the accumulation steps, as the Trainer divides the model's own loss. The Trainer does
    not divide a ``compute_loss_func``'s loss itself: transformers before the
    ``loss_is_scaled_for_ga`` attribute (5.17, the GPU machine's, among them) never does, later
    ones only when told it is not scaled; it is told it is (``True``), so both train one recipe.
    """
    # pad each batch to its own longest window (bucketed on CUDA and when compiled), never to 384
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of(not args.use_cpu, args.torch_compile))
    if loss is not None:
        collator = loss.collator(collator)
    if args.torch_compile:
        guard_compile()  # a model that does not compile trains eager, with one speed_fallback line
        callbacks = [*callbacks, CompileStats()]
    trainer = _Trainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                      processing_class=tokenizer, callbacks=callbacks,
                      compute_loss_func=_PerAccumulatedBatch(loss.compute_loss) if loss is not None else None)
    if loss is not None:
        trainer.compute_loss_func.trainer = trainer
        trainer.loss_is_scaled_for_ga = True  # an attribute older versions ignore: they never divide this loss
    set_matmul_precision(bool(args.tf32))  # after the Trainer: transformers and accelerate each set TF32 their way
    trainer.remove_callback(PrinterCallback)  # prints raw dicts; ProgressLog replaces it
    if args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
    return trainer


class _PerAccumulatedBatch:
    """A per-batch-mean loss divided by the batches of this optimizer step (fewer in an epoch's last step)."""

    def __init__(self, compute):
        self.compute, self.trainer = compute, None

    def __call__(self, outputs, labels, num_items_in_batch=None):
        return self.compute(outputs, labels, num_items_in_batch) / self.trainer.current_gradient_accumulation_steps


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU instructions that make bf16 autocast fast (torch's own probes)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def compile_stats() -> dict:
    """What torch.compile did in this process so far: graphs compiled, graph breaks, seconds spent."""
    try:
        from torch._dynamo.utils import calculate_time_spent, counters
    except ImportError:  # a private module: its absence must not break a run
        return {}
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "compile_seconds": round(calculate_time_spent().get("total_wall_time", 0.0), 1)}


class CompileStats(TrainerCallback):
    """One ``compile`` line after training and after each prediction: the graph count must stay small.

    torch.compile compiles once per new shape until it marks the length (and batch) dimensions
    dynamic, about 4 graphs for training plus evaluation; a count growing with the data means
    recompiling on every batch, which the ``pad_to_multiple_of`` buckets bound anyway.
    """

    def on_train_end(self, args, state, control, **kwargs):
        log.info("compile", extra={"event": "compile", "stage": "train", **compile_stats()})

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        log.info("compile", extra={"event": "compile", "stage": "predict", **compile_stats()})


def check_finite(trainer: Trainer) -> None:
    """A model with a NaN or infinite weight is never evaluated, published or promoted (``Diverged``, exit 2).

    After training, before anything is staged: one pass over the weights where they are (a count per
    tensor, one sum, one transfer: milliseconds on a GPU, tens of them for DistilBERT on a CPU). NaN
    weights still decode to answers (NaN logits count as -inf) and score a few points, so nothing
    after this point would notice: a fresh channel's first-model gate promoted such a model.
    """
    params = list(trainer.model.parameters())
    with torch.no_grad():
        bad = int(torch.stack([(~torch.isfinite(p)).sum() for p in params]).sum()) if params else 0
    if not bad:
        return
    first = next((e.get("step") for e in trainer.state.log_history if "loss" in e and not _finite(e["loss"])), None)
    raise Diverged(f"training diverged: {bad:,} of {sum(p.numel() for p in params):,} weights are NaN or infinite "
                   f"after step {trainer.state.global_step}"
                   + (f" (the logged loss was first not finite at step {first})" if first is not None else "")
                   + "; nothing is published. Lower QA_LEARNING_RATE, or check QA_PRECISION, QA_DISTILL_TEMPERATURE, "
                   "the base model and the data, then start under a new QA_RUN_ID")


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def train(trainer: Trainer, resume_from: Path | None) -> dict:
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics = dict(result.metrics)
    log.info("training finished", extra={"event": "train_end", "step": trainer.state.global_step,
                                          "train_runtime": metrics.get("train_runtime"),
                                          "train_samples_per_second": metrics.get("train_samples_per_second")})
    return metrics
