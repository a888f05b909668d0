import json
import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.s3_fixtures"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def train_rows():
    return [json.loads(line) for line in (DATA / "squad_v1_train_64.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from tests.support.tiny import MINILM

    return AutoTokenizer.from_pretrained(str(MINILM))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tests.support.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
