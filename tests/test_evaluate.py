"""Evaluation predicts windows longest first and decodes them in dataset order: same answers."""
import json
import logging

import numpy as np
import pytest

from job.evaluate import evaluate, length_order, restore_order
from job.preprocess import feature_dataset
from job.settings import load_settings
from tests.support.jobrun import DATA


@pytest.mark.parametrize("lengths, expected", [
    ([3, 5, 4], [1, 2, 0]),
    ([4, 4, 2, 4], [0, 1, 3, 2]),  # ties keep dataset order
    ([], []),
])
def test_length_order(lengths, expected):
    assert length_order(lengths).tolist() == expected


def test_restore_order_inverts_the_permutation():
    values = np.arange(12).reshape(6, 2)
    order = np.array([4, 0, 5, 2, 1, 3])
    assert (restore_order(values[order], order) == values).all()


@pytest.fixture(scope="module")
def dev_rows():
    return [json.loads(line) for line in (DATA / "squad_v1_dev_32.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, dev_rows):
    from job.train import build_trainer, load_model, training_arguments

    tmp = tmp_path_factory.mktemp("evaluate")
    settings = load_settings({"QA_MODEL_NAME": str(tiny_model), "QA_WORK_DIR": str(tmp), "QA_EVAL_BATCH_SIZE": "8"})
    tokenizer, model = load_model(settings.model_name, settings.seed)
    # short windows: most examples span several, of many lengths, so sorting really reorders
    features = feature_dataset("eval", tokenizer, dev_rows, 128, 48)
    trainer = build_trainer(settings, model, tokenizer, None, training_arguments(settings, tmp / "t", "fp32"), [])
    return settings, trainer, features


class RecordingTrainer:
    """Stands in for the Trainer: logits that depend only on each window's own tokens, batch order recorded."""

    def __init__(self, trainer):
        self.args, self.state = trainer.args, trainer.state
        self.seen = None

    def predict(self, dataset):
        ids = dataset["input_ids"]
        self.seen = [len(x) for x in ids]
        width = max(self.seen)
        rng = [np.random.default_rng(sum(x) + 7 * len(x)) for x in ids]
        start = np.full((len(ids), width), -100.0)
        end = np.full((len(ids), width), -100.0)
        for i, x in enumerate(ids):
            start[i, :len(x)] = rng[i].normal(size=len(x))
            end[i, :len(x)] = rng[i].normal(size=len(x))

        class Output:
            predictions = (start, end)
        return Output()


def test_windows_go_longest_first_and_answers_land_on_their_examples(setup, dev_rows):
    settings, trainer, features = setup
    fake = RecordingTrainer(trainer)
    _, sorted_answers = evaluate(fake, features, dev_rows, settings)
    assert fake.seen == sorted(fake.seen, reverse=True) and len(set(fake.seen)) > 5
    _, dataset_order = evaluate(fake, features, dev_rows, settings, length_sorted=False)
    assert fake.seen != sorted(fake.seen, reverse=True)
    assert sorted_answers == dataset_order  # exact: these logits do not depend on batch shapes


def test_length_sorted_gives_the_same_answers_on_real_rows(setup, dev_rows):
    settings, trainer, features = setup
    scores, answers = evaluate(trainer, features, dev_rows, settings)
    scores_before, answers_before = evaluate(trainer, features, dev_rows, settings, length_sorted=False)
    assert answers == answers_before and scores == scores_before
    assert trainer.args.train_sampling_strategy == "group_by_length"  # restored after predicting


def test_non_finite_logits_are_reported(setup, dev_rows, caplog):
    settings, trainer, features = setup
    fake = RecordingTrainer(trainer)
    original = fake.predict

    def predict_with_nan(dataset):
        out = original(dataset)
        out.predictions[0][0, 1] = np.nan
        return out

    fake.predict = predict_with_nan
    caplog.set_level(logging.WARNING, logger="job.evaluate")
    evaluate(fake, features, dev_rows, settings)
    lines = [r for r in caplog.records if getattr(r, "event", None) == "nonfinite_logits"]
    assert len(lines) == 1 and lines[0].windows == 1 and lines[0].of == len(features)


def test_window_offsets_are_the_offset_mapping(setup):
    from job.evaluate import window_offsets

    _, _, features = setup
    subset = features.select([5, 0, 3])  # an indices mapping: the Arrow path must honour it
    for got, expected in zip(window_offsets(subset), subset["offset_mapping"]):
        assert got.tolist() == expected


def test_a_model_scored_without_a_trainer_answers_as_the_trainer_does(setup, dev_rows):
    """The holder's re-scoring path (no Trainer, no collective) decodes the same answers from the same model."""
    from job.evaluate import evaluate_model

    settings, trainer, features = setup
    scores, answers = evaluate(trainer, features, dev_rows, settings)
    plain_scores, plain_answers = evaluate_model(trainer.model, trainer.processing_class, features, dev_rows, settings)
    assert plain_answers == answers and plain_scores == scores


def bf16_rounded(values) -> bool:
    import torch

    x = torch.as_tensor(np.asarray(values, dtype=np.float32))
    return bool((x.to(torch.bfloat16).float() == x).all())


def test_logits_keep_fp32_resolution_under_bf16(setup, tmp_path):
    """A GPU night runs the encoder in bf16; the QA head stays fp32, so near-tied spans are told apart as in fp32."""
    from job.train import build_trainer, training_arguments

    settings, trainer, features = setup
    bf16 = build_trainer(settings, trainer.model, trainer.processing_class, None,
                         training_arguments(settings, tmp_path / "bf16", "bf16"), [])
    inputs = features.remove_columns(["example_index", "offset_mapping"]).select(range(8))
    start, end = bf16.predict(inputs).predictions[:2]
    assert not bf16_rounded(start[:, :16]) and not bf16_rounded(end[:, :16])
    from job.evaluate import predict_logits  # the holder's path (no Trainer)

    start, end = predict_logits(trainer.model, trainer.processing_class, features.select(range(8)), 8, "cpu", "bf16")
    assert not bf16_rounded(start[:, :16]) and not bf16_rounded(end[:, :16])

@pytest.fixture(scope="module")
def arrow_rows(tmp_path_factory, dev_rows):
    from job.rows import RowWriter, open_rows

    writer = RowWriter(tmp_path_factory.mktemp("rows") / "eval.arrow")
    writer.write([{**r, "title": r.get("title", "")} for r in dev_rows])
    return open_rows(writer.close())


@pytest.mark.parametrize("shuffled", [False, True])
def test_decoding_chunk_by_chunk_gives_the_answers_of_decoding_all_at_once(setup, dev_rows, arrow_rows, monkeypatch, shuffled):
    """Arrow rows, 5 examples a chunk, windows in dataset order or not: the answers and scores of one pass over everything."""
    import job.evaluate
    from job.evaluate import decode_examples, window_offsets
    from job.squad.decoding import decode_all
    from job.squad.metrics import squad_scores

    settings, trainer, features = setup
    if shuffled:
        features = features.select(np.random.default_rng(0).permutation(len(features)))
    fake = RecordingTrainer(trainer)
    start, end = fake.predict(features).predictions
    whole = decode_all(dev_rows, features["example_index"], window_offsets(features), start, end,
                       n_best=settings.n_best_size, max_answer_length=settings.max_answer_length)
    monkeypatch.setattr(job.evaluate, "CHUNK", 5)
    assert decode_examples(arrow_rows, features, start, end, settings) == whole
    scores, answers = evaluate(fake, features, arrow_rows, settings, length_sorted=False)
    assert answers == whole and scores == squad_scores(dev_rows, whole)


def test_evaluation_during_training_takes_the_first_examples_and_their_windows(setup, arrow_rows):
    from job.observe.periodic_eval import first_examples

    _, _, features = setup
    rows, windows = first_examples(arrow_rows, features, 7)
    assert [r["id"] for r in rows] == arrow_rows[:7]["id"]
    assert windows["example_index"] == [i for i in features["example_index"] if i < 7]


def test_evaluations_during_training_reuse_one_set_of_dataloader_workers(tmp_path, tiny_model, dev_rows):
    """QA_DATALOADER_WORKERS > 0: the workers are forked once for all the evaluations of a run, not per evaluation."""
    import multiprocessing

    from job.train import build_trainer, load_model, training_arguments

    settings = load_settings({"QA_MODEL_NAME": str(tiny_model), "QA_WORK_DIR": str(tmp_path), "QA_EVAL_BATCH_SIZE": "8",
                              "QA_DATALOADER_WORKERS": "2", "QA_REPORT_TO": "none"})
    tokenizer, model = load_model(settings.model_name, settings.seed)
    features = feature_dataset("eval", tokenizer, dev_rows[:12], 128, 48)
    trainer = build_trainer(settings, model, tokenizer, None, training_arguments(settings, tmp_path / "t", "fp32"), [])
    before = set(multiprocessing.active_children())
    answers = [evaluate(trainer, features, dev_rows[:12], settings)[1] for _ in range(3)]
    workers = set(multiprocessing.active_children()) - before
    assert answers[0] == answers[1] == answers[2]
    assert len(workers) == 2, workers  # one loader's two persistent workers; they were 6 (3 x 2), all alive
