"""Property-based: hostile settings values and data rows never get past the contract.

The contract: the job exits 0, 2 or 3 only; a failure is one line naming the culprit; nothing is
written to the output; no traceback; no secret in anything printed. In-process properties run
many examples against the validators; the end-to-end ones run the real job on a few.
"""
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from job.data import validate_rows
from job.errors import ConfigError, DataError
from job.observe.redaction import register_secrets
from job.settings import known_variables, load_settings
from tests.support.jobrun import DATA, job_env, run_job

PASSWORD = "pw-Sekrit-8731"
SECRET = "s3cr3t-Hypothesis-Otter"
SECRET_URL = f"https://user:{PASSWORD}@minio.example:9000/x"

special = st.sampled_from([
    "", " ", "0", "-1", "1e999", "-1e999", "inf", "-inf", "nan", "NaN", "true", "false", "None", "null",
    str(2 ** 64), str(-2 ** 64), "3.5", "0x10", "../../etc", "/etc/passwd", "~", "C:\\Windows", "s3://", "s3://b",
    "s3://bucket/a#b", "s3://bucket/a?b", "s3://UPPER/x", "file://", "ftp://host/x", SECRET_URL, SECRET,
    "\n", "\t", "a\nb", "\x1b[31mred", "é", "日本語", "\u202e", "🙂" * 20, "x" * 5000,
])
text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
number = st.one_of(st.integers(-2 ** 70, 2 ** 70).map(str), st.floats().map(repr))
value = st.one_of(special, text, number)
NAMES = sorted(known_variables())


def one_line_naming_a_variable(message: str, env: dict) -> None:
    assert "\n" not in message and "\r" not in message
    assert message.startswith("invalid settings: QA_")
    assert any(f"{name}: " in message for name in env) or "QA_TRAIN_URI" in message
    assert PASSWORD not in message and SECRET not in message


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(NAMES), value, max_size=6))
def test_any_settings_values_load_or_fail_in_one_line_naming_the_variable(env):
    register_secrets({"AWS_SECRET_ACCESS_KEY": SECRET})
    try:
        load_settings(env)
    except ConfigError as exc:
        one_line_naming_a_variable(str(exc), env)


# ----------------------------------------------------------------- rows
def base_row():
    return {"id": "r1", "title": "T", "context": "Paris is the capital of France.", "question": "What is the capital?",
            "answers": {"text": ["Paris"], "answer_start": [0]}}


field_value = st.one_of(value, st.none(), st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2),
                        st.dictionaries(text, st.integers(), max_size=2), st.just("\ud800"))
mutation = st.one_of(
    st.tuples(st.sampled_from(["id", "title", "context", "question", "answers"]), field_value),
    st.tuples(st.just("answer_start"), field_value),
    st.tuples(st.just("answer_text"), field_value),
)


def mutate(row, change):
    field, new = change
    if field.startswith("answer_") and not isinstance(row.get("answers"), dict):
        return row  # an earlier change already replaced the whole answers field
    if field == "answer_start":
        row["answers"]["answer_start"] = [new]
    elif field == "answer_text":
        row["answers"]["text"] = [new]
    else:
        row[field] = new
    return row


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(mutation, min_size=1, max_size=3), st.booleans())
def test_any_row_validates_or_fails_in_one_line_naming_the_row(changes, squad_v2):
    row = base_row()
    for change in changes:
        mutate(row, change)
    try:
        out = validate_rows([row], "train.jsonl", squad_v2=squad_v2)
    except DataError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("train.jsonl: ") and "row" in str(exc)
        return
    # accepted: then the answer really is where it says, in text every writer can encode
    (kept,) = out
    kept["context"].encode("utf-8")
    for answer, start in zip(kept["answers"]["text"], kept["answers"]["answer_start"]):
        assert kept["context"][start:start + len(answer)] == answer and answer


# ----------------------------------------------------------------- the real job
E2E = settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
ENV_SAFE = value.filter(lambda v: "\x00" not in v and v.encode("utf-8", "strict") is not None and not (
    set(v) & {chr(c) for c in range(0xD800, 0xE000)}))


def assert_contract(result, out: Path, ok_codes=(0, 2, 3)):
    assert result.returncode in ok_codes, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert all(line.startswith("{") for line in result.stdout.splitlines())
    everything = result.stdout + result.stderr
    assert PASSWORD not in everything and SECRET not in everything
    if result.returncode:
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (out / "test-run").exists(), "a failed start writes nothing to the output"


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@E2E
@given(st.dictionaries(st.sampled_from(["QA_EPOCHS", "QA_LEARNING_RATE", "QA_BATCH_SIZE", "QA_SEED", "QA_MAX_LENGTH",
                                        "QA_DOC_STRIDE", "QA_STOP_GRACE_SECONDS", "QA_LEASE_SECONDS", "QA_RUN_ID",
                                        "QA_S3_ENDPOINT_URL", "QA_PRECISION", "QA_N_BEST_SIZE", "QA_WARMUP_RATIO"]),
                       ENV_SAFE, min_size=1, max_size=3))
def test_the_job_keeps_the_contract_for_any_settings(model, env):
    tmp = Path(tempfile.mkdtemp(prefix="prop-settings-"))
    try:
        full = job_env(tmp, model, QA_MAX_STEPS="1", QA_MAX_TRAIN_SAMPLES="4", QA_MAX_EVAL_SAMPLES="4",
                       QA_CHECKPOINT_STEPS="0", AWS_SECRET_ACCESS_KEY=SECRET)
        full.update(env)
        assert_contract(run_job(full, timeout=240), tmp / "out")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@E2E
@given(st.lists(mutation, min_size=1, max_size=2))
def test_the_job_keeps_the_contract_for_any_row(model, changes):
    tmp = Path(tempfile.mkdtemp(prefix="prop-rows-"))
    try:
        rows = [json.loads(line) for line in (DATA / "squad_v1_train_64.jsonl").read_text().splitlines()[:4]]
        for change in changes:
            mutate(rows[1], change)
        path = tmp / "train.jsonl"
        # what a hostile file holds: NaN/Infinity tokens, escaped lone surrogates, any type
        path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
        env = job_env(tmp, model, QA_TRAIN_URI=path, QA_MAX_STEPS="1", QA_MAX_EVAL_SAMPLES="4", QA_CHECKPOINT_STEPS="0",
                      AWS_SECRET_ACCESS_KEY=SECRET)
        result = run_job(env, timeout=240)
        assert_contract(result, tmp / "out", ok_codes=(0, 3))
        if result.returncode == 3:
            assert "train.jsonl: " in result.stderr and ("row" in result.stderr or "line" in result.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
