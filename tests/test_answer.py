"""The answering entry point: models from disk or s3://, bounded memory, and one-line errors."""
import json

import pytest

from job.answer import QuestionAnswerer, fetch_model
from job.squad.answer import WINDOWS_PER_BATCH
from tests.support.jobrun import job_env, run_job

CONTEXT = "The Denver Broncos defeated the Carolina Panthers to win Super Bowl 50 in Santa Clara."


@pytest.fixture(scope="module")
def published(seaweed, tmp_path_factory, tiny_model):
    """A run published to S3 with its checkpoints still there."""
    from tests.support.s3_fixtures import s3_env

    bucket = "answer-" + tmp_path_factory.mktemp("x").name[-6:].lower().replace("_", "-")
    seaweed.client().create_bucket(Bucket=bucket)
    env = job_env(tmp_path_factory.mktemp("answer"), tiny_model, QA_OUTPUT_URI=f"s3://{bucket}/runs", QA_MAX_STEPS="2",
                  QA_CHECKPOINT_STEPS="1", **s3_env(seaweed))
    result = run_job(env)
    assert result.returncode == 0, result.stderr
    return f"s3://{bucket}/runs/test-run", s3_env(seaweed)


def answer(env, *args):
    result = run_job(env, module="job.answer", args=args)
    return result, (json.loads(result.stdout) if result.returncode == 0 else None)


def test_a_run_folder_answers_with_its_model_and_downloads_no_checkpoint(published, tmp_path, monkeypatch):
    run, env = published
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    folder = fetch_model(run, tmp_path / "model", env["QA_S3_ENDPOINT_URL"])
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert "config.json" in names and "model.safetensors" in names
    assert not [n for n in names if "/" in n or n.startswith(("optimizer", "rng_state", "trainer_state"))], names
    result, body = answer(env, "--model", run, "--question", "Who won?", "--context", CONTEXT, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert CONTEXT[body["start"]:body["end"]] == body["answer"]


@pytest.mark.parametrize("args, code, needle", [
    (("--model", "/nonexistent/model"), 2, "--model /nonexistent/model: no model there"),
    (("--context", "   "), 2, "--question and --context must not be empty"),
    (("--context", "@/nonexistent/context.txt"), 2, "--context @/nonexistent/context.txt: cannot read"),
    (("--device", "cuda"), 2, "--device cuda: no usable GPU: this torch is a CPU build"),  # these machines have no GPU
])
def test_bad_input_is_one_line(published, tiny_model, args, code, needle):
    options = {"--model": str(tiny_model), "--question": "Who won?", "--context": CONTEXT}
    options.update(dict(zip(args[::2], args[1::2])))
    result, _ = answer({}, *[x for kv in options.items() for x in kv])
    assert result.returncode == code and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_storage_errors_are_one_line(published):
    run, env = published
    wrong, _ = answer({**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"}, "--model", run, "--question", "q", "--context", CONTEXT)
    assert wrong.returncode == 2 and "check credentials" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    assert "wrong-secret-value" not in wrong.stdout + wrong.stderr
    missing, _ = answer(env, "--model", run + "-nope", "--question", "q", "--context", CONTEXT)
    assert missing.returncode == 2 and "no model there" in missing.stderr, missing.stderr


def test_no_span_at_all_is_still_json(tiny_model):
    result, body = answer({}, "--model", str(tiny_model), "--question", "Who?", "--context", "\u200b")
    assert result.returncode == 0, result.stderr
    assert body["answer"] == "" and body["score"] is None and "Infinity" not in result.stdout


def test_long_contexts_go_through_the_model_in_bounded_batches_and_long_questions_are_cut(tiny_model):
    answerer = QuestionAnswerer(tiny_model, max_length=128, doc_stride=32)
    sizes = []
    forward = answerer.model.forward
    answerer.model.forward = lambda **batch: sizes.append(len(batch["input_ids"])) or forward(**batch)
    context = " ".join([CONTEXT] * 400)  # about 8,000 tokens: hundreds of windows
    result = answerer(" ".join(["who"] * 300) + "?", context)
    assert sum(sizes) > 3 * WINDOWS_PER_BATCH and max(sizes) <= WINDOWS_PER_BATCH
    # an untrained model may rank only question tokens in its n-best: then the answer is empty, not an error
    assert context[result["start"]:result["end"]] == result["answer"] if result["answer"] else result["start"] == -1


def test_an_s3_model_is_fetched_once_and_again_only_when_it_changed(published, tmp_path, monkeypatch, caplog):
    """What a distillation teacher given as s3:// goes through: a retry finds the verified copy instead of
    downloading again; an object rewritten in storage is another model, fetched afresh."""
    import logging

    from job.store import storage
    from job.store.models import fetch_model_cached

    run, env = published
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    gets = []
    real = storage.S3Storage.get_file
    monkeypatch.setattr(storage.S3Storage, "get_file", lambda self, key, local: (gets.append(key), real(self, key, local)))
    caplog.set_level(logging.INFO, logger="job.store.models")
    first = fetch_model_cached(run, tmp_path / "models", env["QA_S3_ENDPOINT_URL"])
    fetched = len(gets)
    assert fetched and (first / "config.json").is_file()
    assert fetch_model_cached(run, tmp_path / "models", env["QA_S3_ENDPOINT_URL"]) == first and len(gets) == fetched
    (first / "config.json").write_text("{}")  # a copy that no longer verifies is not used
    assert fetch_model_cached(run, tmp_path / "models", env["QA_S3_ENDPOINT_URL"]) == first and len(gets) == 2 * fetched
    bucket, prefix = run[len("s3://"):].split("/", 1)
    import boto3

    client = boto3.client("s3", endpoint_url=env["QA_S3_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    client.put_object(Bucket=bucket, Key=f"{prefix}/model/README.md", Body=b"rewritten in place")
    again = fetch_model_cached(run, tmp_path / "models", env["QA_S3_ENDPOINT_URL"])
    assert again != first and (again / "README.md").read_bytes() == b"rewritten in place"
    assert [r.cache for r in caplog.records if getattr(r, "event", None) == "model_fetched"] == ["miss", "local", "miss", "miss"]


def test_a_model_whose_json_is_nested_too_deep_is_one_line(tiny_model, tmp_path):
    """transformers parses a model's JSON with json.loads: a tokenizer_config.json nested 100,000 deep ended
    job.answer with RecursionError (exit 1, a traceback)."""
    import shutil

    model = tmp_path / "deep"
    shutil.copytree(tiny_model, model)
    (model / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    result, _ = answer({}, "--model", str(model), "--question", "Who won?", "--context", CONTEXT)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"--model {model}: cannot load (tokenizer_config.json: nested deeper than" in result.stderr
