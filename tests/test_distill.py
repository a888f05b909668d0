"""Distillation in-process: the teacher's logits cache (verified, rebuilt when tampered, downloaded on a fresh
machine), the collator that hands them to the loss, and every teacher the job refuses at start (exit 2)."""
import json
import shutil
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from job import distill
from job.errors import ConfigError
from job.evaluate import predict_logits
from job.preprocess import feature_dataset
from job.settings import load_settings
from job.store.fingerprint import differences, training_inputs
from job.store.storage import LocalStorage


def settings_for(tmp_path, teacher, **extra):
    return load_settings({"QA_RUN_ID": "distil", "QA_MODEL_NAME": str(teacher), "QA_TRAIN_URI": "x",
                          "QA_WORK_DIR": str(tmp_path / "work"), "QA_OUTPUT_URI": str(tmp_path / "out"),
                          "QA_MAX_LENGTH": "128", "QA_DOC_STRIDE": "48", "QA_EVAL_BATCH_SIZE": "4",
                          "QA_DEVICE": "cpu", "QA_TEACHER_MODEL": str(teacher), **extra})


@pytest.fixture(scope="module")
def windows(tokenizer, train_rows):
    return SimpleNamespace(train=feature_dataset("train", tokenizer, train_rows[:6], 128, 48), cache_key="k" * 24)


def cache_events(caplog):
    return [r.cache for r in caplog.records if getattr(r, "event", None) == "teacher_logits"]


def test_logits_are_scored_once_verified_and_downloaded_on_a_fresh_machine(tmp_path, tiny_model, windows, caplog, monkeypatch):
    caplog.set_level("INFO", logger="job.distill")
    settings = settings_for(tmp_path, tiny_model)
    teacher = distill.resolve_teacher(settings)
    store = LocalStorage(tmp_path / "out" / "distil")
    first = distill.prepare(settings, teacher, windows, store)

    # the teacher's own prediction loop, real tokens only, in fp16, window after window
    from job.train import load_model

    tok, model = load_model(str(tiny_model), 0)
    start, end = predict_logits(model, tok, windows.train.select_columns(["input_ids", "attention_mask"]), 4)
    lengths = np.diff(first.offsets)
    real = np.arange(start.shape[1]) < lengths[:, None]
    assert np.array_equal(np.asarray(first.logits), np.stack([start[real], end[real]], 1).astype(np.float16))
    assert first.logits.shape == (int(lengths.sum()), 2) and len(lengths) == len(windows.train)
    expected = np.array(first.logits)

    # the teacher is not loaded again while a verified cache exists
    monkeypatch.setattr(distill, "score", lambda *a, **k: pytest.fail("scored again"))
    assert distill.prepare(settings, teacher, windows, store).cache == "local"
    fresh = settings_for(tmp_path / "fresh", tiny_model)
    assert distill.prepare(fresh, teacher, windows, store).cache == "remote"
    monkeypatch.undo()

    # tampered locally and remotely: neither is trusted, the logits are scored again, the same
    local = next((tmp_path / "work" / "distil" / "teacher").iterdir())
    remote = next((tmp_path / "out" / "distil" / "cache").glob("teacher-*"))
    for folder in (local, remote):
        raw = bytearray((folder / distill.LOGITS).read_bytes())
        raw[-1] ^= 0xFF
        (folder / distill.LOGITS).write_bytes(bytes(raw))
    shutil.rmtree(tmp_path / "fresh")
    again = distill.prepare(fresh, teacher, windows, store)
    assert again.cache == "miss" and np.array_equal(np.asarray(again.logits), expected)
    assert cache_events(caplog) == ["miss", "local", "remote", "miss"]
    # another teacher is another cache
    assert distill.cache_key("k" * 24, teacher.identity) != distill.cache_key("k" * 24, "sha256:other")


def test_the_teacher_is_freed_before_the_student_trains(tmp_path, tiny_model, windows, monkeypatch):
    import job.train

    loaded = []
    load = job.train.load_model

    def watched(*args, **kwargs):
        tokenizer, model = load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return tokenizer, model

    monkeypatch.setattr(job.train, "load_model", watched)
    settings = settings_for(tmp_path, tiny_model)
    taught = distill.prepare(settings, distill.resolve_teacher(settings), windows, None)
    assert len(loaded) == 1 and loaded[0]() is None  # gone when prepare returns: nobody holds the teacher
    assert taught.logits.shape[0] == taught.offsets[-1]


def test_the_collator_hands_each_window_its_own_logits(tmp_path, tiny_model, windows, tokenizer):
    from transformers import DataCollatorWithPadding

    settings = settings_for(tmp_path, tiny_model)
    taught = distill.prepare(settings, distill.resolve_teacher(settings), windows, None)
    train = distill.indexed(windows.train)
    collate = taught.collator(DataCollatorWithPadding(tokenizer))
    picked = [5, 0, 3]
    batch = collate([train[i] for i in picked])
    labels = batch["labels"]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"} - (
        set() if "token_type_ids" in windows.train.column_names else {"token_type_ids"})
    for row, i in enumerate(picked):
        n = int(taught.offsets[i + 1] - taught.offsets[i])
        assert labels["start_positions"][row] == windows.train[i]["start_positions"]
        assert torch.equal(labels["teacher"][row, :n], torch.from_numpy(taught.logits[taught.offsets[i]:taught.offsets[i + 1]].astype(np.float32)))
        assert (labels["teacher"][row, n:] == 0).all() and labels["mask"][row].sum() == n
    # evaluation windows carry no index: only padded, as without a teacher
    plain = collate([{k: v for k, v in train[i].items() if k in ("input_ids", "attention_mask")} for i in picked])
    assert "labels" not in plain


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tiny_model):
    """Folders that are not usable teachers for the tiny student."""
    root = tmp_path_factory.mktemp("teachers")
    config = json.loads((tiny_model / "config.json").read_text())
    encoder, short = root / "encoder", root / "short"
    for folder, change in ((encoder, {"architectures": ["DistilBertModel"]}), (short, {"max_position_embeddings": 64})):
        shutil.copytree(tiny_model, folder)
        (folder / "config.json").write_text(json.dumps({**config, **change}))
    other = root / "other-vocab"
    shutil.copytree(tiny_model, other)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["qafinetunetoken"])
    tok.save_pretrained(str(other))
    nested = root / "nested"  # a config.json nested 100,000 deep: transformers' parser recursed until RecursionError
    shutil.copytree(tiny_model, nested)
    (nested / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return {"missing": root / "nothing-here", "encoder": encoder, "short": short, "other": other, "nested": nested}


@pytest.mark.parametrize("which, needle", [
    ("missing", "no model there"),
    ("encoder", "not a question-answering model (DistilBertModel"),
    ("short", "has 64 positions, fewer than QA_MAX_LENGTH=128"),
    ("other", "vocabulary differs from QA_MODEL_NAME="),
    ("nested", "cannot load (config.json:"),
])
def test_a_teacher_that_cannot_teach_is_refused_naming_it(tmp_path, tiny_model, teachers, which, needle):
    settings = settings_for(tmp_path, tiny_model, QA_TEACHER_MODEL=str(teachers[which]))
    with pytest.raises(ConfigError) as err:
        distill.resolve_teacher(settings)
    message = str(err.value)
    assert message.startswith(f"QA_TEACHER_MODEL={teachers[which]}: ") and needle in message and "\n" not in message
    if which == "other":
        assert str(tiny_model) in message  # names both models


def test_teacher_settings_and_channel(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="QA_TEACHER_CHANNEL: names the teacher as QA_TEACHER_MODEL does"):
        settings_for(tmp_path, tiny_model, QA_TEACHER_CHANNEL="prod")
    with pytest.raises(ConfigError, match="QA_DISTILL_ALPHA.*QA_DISTILL_TEMPERATURE"):
        settings_for(tmp_path, tiny_model, QA_DISTILL_ALPHA="1.5", QA_DISTILL_TEMPERATURE="0")
    channel = settings_for(tmp_path, tiny_model, QA_TEACHER_MODEL="", QA_TEACHER_CHANNEL="big")
    with pytest.raises(ConfigError, match=r"^QA_TEACHER_CHANNEL=big: no such channel under QA_OUTPUT_URI="):
        distill.resolve_teacher(channel)


def test_another_teacher_alpha_or_temperature_is_another_run(tmp_path, tiny_model):
    base = settings_for(tmp_path, tiny_model)
    inputs = training_inputs(base, "t", "e", None, "b", "sha256:one")
    assert differences(inputs, training_inputs(base, "t", "e", None, "b", "sha256:two")) == ["teacher"]
    for name, value in (("QA_DISTILL_ALPHA", "0.7"), ("QA_DISTILL_TEMPERATURE", "3")):
        other = settings_for(tmp_path, tiny_model, **{name: value})
        assert differences(inputs, training_inputs(other, "t", "e", None, "b", "sha256:one")) == [name[3:].lower()]
    assert "teacher" not in training_inputs(base, "t", "e", None, "b")


def test_a_channel_teacher_is_the_model_its_pointer_names(tmp_path, tiny_model):
    from tests.support.runs import GOLD, gate, publish_run

    out = tmp_path / "out"
    publish_run(out, "big-1", GOLD)
    for file in tiny_model.iterdir():  # the published run's model: the tiny QA model
        shutil.copy(file, out / "big-1" / "model" / file.name)
    assert gate(out, "big-1", "big")["decision"] == "promote"
    settings = settings_for(tmp_path, tiny_model, QA_TEACHER_MODEL="", QA_TEACHER_CHANNEL="big", QA_OUTPUT_URI=str(out))
    teacher = distill.resolve_teacher(settings)
    assert teacher.name == "channel big (run big-1)" and teacher.path == str(out / "big-1" / "model")
    assert teacher.identity == distill.resolve_teacher(settings_for(tmp_path, tiny_model)).identity  # by content
    assert teacher.run == "big-1"

    # a retry learns from the run its first attempt pinned, wherever the pointer is; once that run's
    # model is gone the retry stops, naming it
    shutil.copytree(out / "big-1", out / "big-0")
    assert distill.resolve_teacher(settings, pinned_run="big-0").path == str(out / "big-0" / "model")
    shutil.rmtree(out / "big-0" / "model")
    with pytest.raises(ConfigError) as err:
        distill.resolve_teacher(settings, pinned_run="big-0")
    assert str(err.value).startswith("QA_TEACHER_CHANNEL=big (run big-0, pinned by this run's first attempt): ")
    assert str(err.value).endswith("start over with a new QA_RUN_ID")


class MovesAndGradients:
    """The batches the collator built, the first ``.to`` each of their tensors received (the copy to the
    training device), and the gradients the optimizer is about to apply."""

    def __init__(self):
        from torch.overrides import TorchFunctionMode
        from transformers import TrainerCallback

        self.batches, self.first_move, self.grads = [], {}, None
        outer = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if getattr(func, "__name__", "") == "to" and args and id(args[0]) not in outer.first_move:
                    outer.first_move[id(args[0])] = bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
                return func(*args, **kwargs)

        class Grads(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                outer.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

        self.mode, self.callback = Mode(), Grads()

    def collating(self, collate):
        def collated(windows):
            self.batches.append(collate(windows))
            return self.batches[-1]

        return collated

    def tensors(self, batch):
        for value in batch.values():
            yield from self.tensors(value) if isinstance(value, dict) else [value]


@pytest.mark.parametrize("transformers_rule", ["divides when told the loss is not scaled",
                                               "never divides a compute_loss_func's loss (5.17)"])
def test_accumulated_distillation_batches_move_non_blocking_and_average_their_gradients(
        tmp_path, tiny_model, windows, transformers_rule):
    """Two accumulated batches: every tensor of each (the labels dict's too) goes to the device non-blocking when
    batches are pinned, and the step's gradient is the mean of the two batches' gradients whichever rule the
    installed transformers follows for a ``compute_loss_func`` (5.17 on the GPU machine never divides it)."""
    import copy

    from job.runtime.recipe import Machine, resolve_recipe
    from job.squad.distillation import distillation_loss
    from job.train import build_trainer, load_model, training_arguments

    settings = settings_for(tmp_path, tiny_model, QA_BATCH_SIZE="2", QA_GRAD_ACCUM_STEPS="2", QA_MAX_STEPS="1",
                            QA_LEARNING_RATE="1e-3", QA_REPORT_TO="none", QA_DATALOADER_WORKERS="0")
    taught = distill.prepare(settings, distill.resolve_teacher(settings), windows, None)
    tokenizer, model = load_model(str(tiny_model), 0)
    for module in model.modules():  # no dropout: the gradient is recomputed below from the same batches
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    start = copy.deepcopy(model)
    pinned = resolve_recipe(settings, Machine(cuda=True, capability=(7, 5), cpus=8))  # pin_memory, non_blocking
    args = training_arguments(settings, tmp_path / "trainer", "fp32", recipe=pinned)
    args.max_grad_norm = 0.0  # the gradient as the loss made it, not clipped
    watch = MovesAndGradients()
    trainer = build_trainer(settings, model, tokenizer, distill.indexed(windows.train), args, [watch.callback], loss=taught)
    trainer.data_collator = watch.collating(trainer.data_collator)
    if "5.17" in transformers_rule:  # what a Trainer without the attribute does: reads nothing, never divides
        trainer.__class__ = type("Before", (type(trainer),), {"loss_is_scaled_for_ga": property(lambda s: True, lambda s, v: None)})
    with watch.mode:
        trainer.train()

    used = watch.batches[:2]  # accelerate's loader draws one batch ahead of the one it hands out
    for batch in used:
        assert type(batch) is dict and set(batch["labels"]) == {"start_positions", "end_positions", "mask", "teacher"}
        assert all(watch.first_move.get(id(t)) is True for t in watch.tensors(batch))
    for batch in used:
        out = start(**{k: v for k, v in batch.items() if k != "labels"})
        labels = batch["labels"]
        loss = distillation_loss(out.start_logits, out.end_logits, labels["start_positions"], labels["end_positions"],
                                 labels["teacher"][..., 0], labels["teacher"][..., 1], labels["mask"], 0.5, 2.0) / 2
        loss.backward()
    expected = {n: p.grad for n, p in start.named_parameters() if p.grad is not None}
    assert watch.grads.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(watch.grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
