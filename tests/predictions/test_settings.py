"""job.predict's settings: the job's names mean the job's things, every problem at once, the shard from Kubernetes."""
import pytest

from job.errors import EXIT_CONFIG, ConfigError
from job.predictions.settings import PredictSettings, decoding, known_variables, load_predict_settings
from job.settings import Settings

BASE = {"QA_PREDICT_MODEL": "/models/m", "QA_PREDICT_INPUT_URI": "/data/q.jsonl", "QA_PREDICT_OUTPUT_URI": "s3://bucket-1/preds"}


def problems(env) -> str:
    with pytest.raises(ConfigError) as info:
        load_predict_settings(env)
    assert info.value.exit_code == EXIT_CONFIG and "\n" not in str(info.value)
    return str(info.value)


def test_a_shared_name_has_the_jobs_type_bounds_and_default():
    shared = set(PredictSettings.model_fields) & set(Settings.model_fields)
    assert {"max_length", "doc_stride", "eval_batch_size", "lease_seconds", "storage_attempts", "s3_endpoint_url"} <= shared
    for name in shared:
        mine, jobs = PredictSettings.model_fields[name], Settings.model_fields[name]
        assert mine.metadata == jobs.metadata, name
        # the windowing and decoding ones default to the model's serving.json, so they may be unset here
        assert mine.default in (jobs.default, None) or name in ("work_dir", "dataset"), name
    assert all(name.startswith("QA_PREDICT_") or name in {f"QA_{n.upper()}" for n in shared} for name in known_variables())


def test_the_shard_is_the_indexed_jobs_completion_index():
    s = load_predict_settings({**BASE, "QA_PREDICT_SHARDS": "4", "JOB_COMPLETION_INDEX": "3"})
    assert (s.shard, s.predict_shards, s.shard_name) == (3, 4, "00003-of-00004")
    assert load_predict_settings(BASE).shard == 0


def test_every_problem_is_named_at_once():
    msg = problems({**BASE, "QA_EPOCHS": "2", "QA_PREDICT_CHUNKROWS": "5", "QA_PREDICT_SHARDS": "0",
                    "QA_PREDICT_RUNTIME": "tensorrt", "JOB_COMPLETION_INDEX": "x"})
    assert "QA_EPOCHS: unknown setting (a setting of the training job" in msg
    assert "QA_PREDICT_CHUNKROWS: unknown setting (did you mean QA_PREDICT_CHUNK_ROWS?)" in msg
    assert "QA_PREDICT_SHARDS:" in msg and "QA_PREDICT_RUNTIME:" in msg and "JOB_COMPLETION_INDEX: not a shard number" in msg


@pytest.mark.parametrize("env, needle", [
    ({"JOB_COMPLETION_INDEX": "2", "QA_PREDICT_SHARDS": "2"}, "JOB_COMPLETION_INDEX: 2 is not below QA_PREDICT_SHARDS=2"),
    ({"QA_PREDICT_INPUT_URI": ""}, "QA_PREDICT_INPUT_URI: set it (or QA_DATASET"),
    ({"QA_PREDICT_OUTPUT_URI": "gs://b/p"}, "QA_PREDICT_OUTPUT_URI: unsupported URI scheme 'gs'"),
    ({"QA_PREDICT_MODEL": "s3://Bad_Bucket/m"}, "QA_PREDICT_MODEL: invalid bucket name"),
    ({"QA_PREDICT_CHANNEL": "../prod"}, "QA_PREDICT_CHANNEL"),
    ({"QA_MAX_LENGTH": "128", "QA_DOC_STRIDE": "128"}, "QA_DOC_STRIDE: must be smaller than QA_MAX_LENGTH"),
    ({"QA_PREDICT_RUNTIME": "onnx-int8", "QA_DEVICE": "cuda"}, "QA_DEVICE: cuda runs the torch runtime only"),
    ({"QA_SHARD": "1"}, "QA_SHARD: unknown setting"),
])
def test_bad_values_name_the_variable(env, needle):
    assert needle in problems({**BASE, **env})


def test_decoding_is_the_setting_else_the_models_serving_json_else_the_jobs_default():
    recorded = {"max_length": 256, "doc_stride": 64, "version_2": True, "null_score_diff_threshold": -1.5}
    d = decoding(load_predict_settings({**BASE, "QA_DOC_STRIDE": "100"}), recorded)
    assert (d.max_length, d.doc_stride, d.n_best_size, d.max_answer_length) == (256, 100, 20, 30)
    assert (d.version_2, d.null_score_diff_threshold) == (True, -1.5)
    d = decoding(load_predict_settings({**BASE, "QA_SQUAD_V2": "false", "QA_NULL_SCORE_DIFF_THRESHOLD": "0"}), recorded)
    assert (d.version_2, d.null_score_diff_threshold) == (False, 0.0)
    assert decoding(load_predict_settings(BASE), {}).max_length == 384
    with pytest.raises(ConfigError, match="QA_DOC_STRIDE: must be smaller than QA_MAX_LENGTH .*serving.json"):
        decoding(load_predict_settings({**BASE, "QA_DOC_STRIDE": "300"}), recorded)


def test_a_runtime_the_model_was_not_published_with_is_a_configuration_error(tmp_path):
    from job.predictions.scoring import open_scorer

    (tmp_path / "config.json").write_text("{}")  # a model without serving.json: torch only
    settings = load_predict_settings({**BASE, "QA_PREDICT_RUNTIME": "onnx-int8"})
    with pytest.raises(ConfigError, match="runtime onnx-int8: .* was not published with it"):
        open_scorer(settings, tmp_path)
