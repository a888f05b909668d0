"""Settings: validated at start, every problem listed at once, naming the variable."""
import pytest

from job.errors import EXIT_CONFIG, ConfigError
from job.settings import load_settings


def problems(env):
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert info.value.exit_code == EXIT_CONFIG
    assert "\n" not in str(info.value)
    return str(info.value)


def test_defaults_follow_the_published_recipe():
    s = load_settings({})
    assert (s.model_name, s.dataset, s.max_length, s.doc_stride, s.precision) == ("distilbert-base-uncased", "squad", 384, 128, "auto")
    assert (s.learning_rate, s.batch_size, s.epochs) == (3e-5, 12, 2.0)
    assert s.run_id.startswith("run-")


def test_values_are_parsed():
    s = load_settings({"QA_EPOCHS": "1.5", "QA_SQUAD_V2": "true", "QA_MAX_TRAIN_SAMPLES": "10", "QA_RUN_ID": "nightly-1"})
    assert (s.epochs, s.squad_v2, s.max_train_samples, s.run_uri) == (1.5, True, 10, "outputs/nightly-1")


@pytest.mark.parametrize("env, needle", [
    ({"QA_EPOCHS": "two"}, "QA_EPOCHS"),
    ({"QA_BATCH_SIZE": "0"}, "QA_BATCH_SIZE"),
    ({"QA_LEARNING_RATE": "-1"}, "QA_LEARNING_RATE"),
    ({"QA_PRECISION": "fp8"}, "QA_PRECISION"),
    ({"QA_DOC_STRIDE": "384"}, "QA_DOC_STRIDE: must be smaller than QA_MAX_LENGTH"),
    ({"QA_EPOHCS": "3"}, "QA_EPOHCS: unknown setting (did you mean QA_EPOCHS?)"),
    ({"QA_TRAIN_URI": "gs://bucket/train.json"}, "QA_TRAIN_URI: unsupported URI scheme 'gs'"),
    ({"QA_OUTPUT_URI": "s3:///nobucket"}, "QA_OUTPUT_URI: an s3:// URI needs a bucket"),
    ({"QA_RUN_ID": "../escape"}, "QA_RUN_ID"),
])
def test_bad_values_name_the_variable(env, needle):
    assert needle in problems(env)


def test_every_problem_is_listed_at_once():
    msg = problems({"QA_EPOCHS": "x", "QA_BATCH_SIZE": "-3", "QA_SEED_": "1"})
    assert "QA_EPOCHS" in msg and "QA_BATCH_SIZE" in msg and "QA_SEED_" in msg


def test_empty_optional_means_unset():
    assert load_settings({"QA_TRAIN_URI": "", "QA_S3_ENDPOINT_URL": ""}).train_uri is None


def test_manifest_view_redacts_credentials_in_urls():
    s = load_settings({"QA_S3_ENDPOINT_URL": "https://key:secret@minio.local:9000"})
    assert "secret" not in str(s.public_dict()) and "minio.local:9000" in s.public_dict()["s3_endpoint_url"]


def test_kubernetes_service_links_are_not_settings():
    s = load_settings({"QA_FINETUNE_WORKER_0_SERVICE_HOST": "10.0.0.1", "QA_FINETUNE_WORKER_0_PORT_23456_TCP_ADDR": "10.0.0.1",
                       "QA_FINETUNE_WORKER_0_SERVICE_PORT": "23456", "QA_FINETUNE_WORKER_0_PORT": "tcp://10.0.0.1:23456"})
    assert s.model_name == "distilbert-base-uncased"


@pytest.mark.parametrize("env, needle", [
    ({"QA_OUTPUT_URI": "s3://Bad_Bucket/runs"}, "QA_OUTPUT_URI: invalid bucket name 'Bad_Bucket'"),
    ({"QA_OUTPUT_URI": "s3://ab/runs"}, "QA_OUTPUT_URI: invalid bucket name 'ab'"),
    ({"QA_OUTPUT_URI": "s3://bucket/runs#x"}, "QA_OUTPUT_URI: the key must not contain '?', '#'"),
    ({"QA_OUTPUT_URI": "s3://bucket/a?b"}, "QA_OUTPUT_URI: the key must not contain '?', '#'"),
    ({"QA_OUTPUT_URI": "s3://bucket/a/../b"}, "QA_OUTPUT_URI: the key must not contain '.' or '..' segments"),
    ({"QA_TRAIN_URI": "s3://key:secret@bucket/train.jsonl"}, "QA_TRAIN_URI: credentials in an s3:// URI are not supported"),
    ({"QA_OUTPUT_URI": "out\x00put"}, "QA_OUTPUT_URI: must not contain control characters"),
    ({"QA_S3_ENDPOINT_URL": "not a url"}, "QA_S3_ENDPOINT_URL: not a URL"),
    ({"QA_S3_ENDPOINT_URL": "ftp://host"}, "QA_S3_ENDPOINT_URL: not a URL"),
    ({"QA_S3_ENDPOINT_URL": "http://127.0.0.1:99999"}, "QA_S3_ENDPOINT_URL: not a URL"),
    ({"QA_S3_REGION": "eu west/1"}, "QA_S3_REGION: not a region name"),
    ({"QA_SEED": str(2 ** 32)}, "QA_SEED"),
    ({"QA_STOP_GRACE_SECONDS": "inf"}, "QA_STOP_GRACE_SECONDS"),
    ({"QA_LEASE_SECONDS": "nan"}, "QA_LEASE_SECONDS"),
    ({"QA_NULL_SCORE_DIFF_THRESHOLD": "-inf"}, "QA_NULL_SCORE_DIFF_THRESHOLD"),
    ({"QA_CHECKPOINT_MINUTES": "Infinity"}, "QA_CHECKPOINT_MINUTES"),
    ({"QA_RUN_ID": "nightly\n"}, "QA_RUN_ID"),
])
def test_hostile_values_are_refused(env, needle):
    assert needle in problems(env)


def test_run_folder_joins_keep_the_run_id_in_the_key():
    s = load_settings({"QA_OUTPUT_URI": "s3://bucket/a b/runs/", "QA_RUN_ID": "r1"})
    assert s.run_uri == "s3://bucket/a b/runs/r1"
    assert load_settings({"QA_OUTPUT_URI": "file:///tmp/out"}).output_uri == "/tmp/out"


def test_a_secret_in_a_bad_value_is_not_echoed():
    msg = problems({"QA_S3_ENDPOINT_URL": "http://user:hunter2pw@minio:9000/ x"})
    assert "hunter2pw" not in msg and "QA_S3_ENDPOINT_URL" in msg


@pytest.mark.parametrize("env, needle", [
    ({"QA_CHANNEL": "prod/eu"}, "QA_CHANNEL: invalid channel name 'prod/eu'"),
    ({"QA_CHANNEL": ".."}, "QA_CHANNEL: invalid channel name '..'"),
    ({"QA_CHANNEL": "a..b"}, "QA_CHANNEL: invalid channel name"),
    ({"QA_CHANNEL": "prod.json"}, "QA_CHANNEL: invalid channel name 'prod.json': it must not end in '.json'"),
    ({"QA_INIT_FROM": "channel"}, "QA_INIT_FROM: 'channel' needs QA_CHANNEL"),
    ({"QA_GATE_METRIC": "accuracy"}, "QA_GATE_METRIC"),
    ({"QA_GATE_MAX_DROP": "-1"}, "QA_GATE_MAX_DROP"),
    ({"QA_GATE_MIN": "101"}, "QA_GATE_MIN"),
    ({"QA_KEEP_RUNS": "0"}, "QA_KEEP_RUNS"),
])
def test_channel_settings_are_checked(env, needle):
    assert needle in problems(env)


def test_channel_settings_defaults_and_values():
    s = load_settings({"QA_CHANNEL": "production", "QA_INIT_FROM": "channel", "QA_GATE_MAX_DROP": "0.5"})
    assert (s.channel, s.init_from, s.gate_max_drop, s.gate_metric, s.skip_unchanged, s.keep_runs) == (
        "production", "channel", 0.5, "f1", True, 7)
    assert load_settings({"QA_CHANNEL": ""}).channel is None  # unset: no promotion


@pytest.mark.parametrize("env, cuda, expected", [
    ({}, False, (500, 30.0)),  # CPU: a step is a second or more
    ({}, True, (0, 10.0)),  # CUDA: 500 steps are seconds; time only (job/store/checkpoints.py says why)
    ({"QA_CHECKPOINT_STEPS": "200"}, True, (200, 10.0)),  # what is set is kept
    ({"QA_CHECKPOINT_MINUTES": "0", "QA_CHECKPOINT_STEPS": "0"}, True, (0, 0.0)),
    ({"QA_CHECKPOINT_MINUTES": "2.5"}, False, (500, 2.5)),
])
def test_checkpoint_cadence_auto_is_per_device(env, cuda, expected):
    from job.store.checkpoints import cadence

    assert cadence(load_settings(env), cuda) == expected


@pytest.mark.parametrize("env, needle", [
    ({"QA_CHECKPOINT_STEPS": "1.5"}, "QA_CHECKPOINT_STEPS: must be auto or a whole number of steps"),
    ({"QA_CHECKPOINT_STEPS": "-1"}, "QA_CHECKPOINT_STEPS"),
    ({"QA_CHECKPOINT_MINUTES": "often"}, "QA_CHECKPOINT_MINUTES: must be auto or a number of minutes"),
    ({"QA_CHECKPOINT_MINUTES": "inf"}, "QA_CHECKPOINT_MINUTES"),
    ({"QA_DEVICE": "gpu"}, "QA_DEVICE"),
])
def test_bad_device_and_cadence_name_the_variable(env, needle):
    assert needle in problems(env)

@pytest.mark.parametrize("env, needle", [
    ({"QA_TRAIN_URI": "d/", "QA_TRAIN_SELECT": "latest:3"}, "QA_TRAIN_SELECT: must be all, newest:N or days:D"),
    ({"QA_TRAIN_URI": "d/", "QA_TRAIN_SELECT": "newest:0"}, "QA_TRAIN_SELECT: must be all, newest:N or days:D"),
    ({"QA_TRAIN_SELECT": "newest:3"}, "QA_TRAIN_SELECT: selects files of a folder or s3:// prefix"),
    ({"QA_TRAIN_URI": "s3://bucket/train.jsonl", "QA_TRAIN_SELECT": "days:7"}, "QA_TRAIN_SELECT: selects files of a folder"),
])
def test_train_selection_is_checked_at_start(env, needle):
    assert needle in problems(env)


def test_train_selection_has_one_spelling_and_is_in_the_fingerprint():
    from job.store.fingerprint import digest, training_inputs

    s = load_settings({"QA_TRAIN_URI": "s3://bucket/drops/", "QA_TRAIN_SELECT": "NEWEST:7:key"})
    assert s.train_select == "newest:7"
    plain = load_settings({"QA_TRAIN_URI": "s3://bucket/drops/"})
    assert digest(training_inputs(s, "t", "e")) != digest(training_inputs(plain, "t", "e"))


# Every duration the job waits on: a field ending in _seconds or _minutes, plus the retry count
# that multiplies the backoff. A duration field added later without a ceiling fails here.
_DURATIONS = sorted(f for f in __import__("job.settings").settings.Settings.model_fields
                    if f.endswith(("_seconds", "_minutes"))) + ["storage_attempts"]


def test_the_duration_table_covers_the_known_durations():
    assert {"stop_grace_seconds", "lease_seconds", "storage_backoff_seconds", "storage_timeout_seconds",
            "checkpoint_minutes", "storage_attempts"} <= set(_DURATIONS)


@pytest.mark.parametrize("field", _DURATIONS)
def test_every_duration_is_bounded_and_named(field):
    # QA_STOP_GRACE_SECONDS=1e10 was accepted, and every run then died with OverflowError after training
    for huge in ("1e10", "1e300", "9223372037"):
        msg = problems({f"QA_{field.upper()}": huge})
        assert f"QA_{field.upper()}:" in msg, msg


def test_the_longest_grace_allowed_waits_without_overflow():
    """What the grace feeds (the upload wait, the stop deadline) takes the largest value settings accept."""
    import threading

    from job.runtime.preemption import StopRequest
    from job.settings import MAX_GRACE_SECONDS, MAX_LEASE_SECONDS
    from job.store.uploader import Uploader

    s = load_settings({"QA_STOP_GRACE_SECONDS": str(MAX_GRACE_SECONDS), "QA_LEASE_SECONDS": str(MAX_LEASE_SECONDS),
                       "QA_CHECKPOINT_MINUTES": "10080", "QA_STORAGE_ATTEMPTS": "100"})
    release = threading.Event()
    uploader = Uploader(lambda step, folder: release.wait(5), 0.0)
    uploader.submit(1, __import__("pathlib").Path("/nonexistent-checkpoint"))
    threading.Timer(0.2, release.set).start()
    assert uploader.close(s.stop_grace_seconds)  # Event.wait(1e10) raised OverflowError here
    stop = StopRequest(s.stop_grace_seconds, on_deadline=lambda _: None)
    stop.request("test")
    assert 0 < stop.time_left() <= MAX_GRACE_SECONDS and stop.wait(0)


@pytest.mark.parametrize("grace, expected", [
    (None, "150"), ("5", "35"), ("86400", "86430"),
    # the workers refuse these with exit 2; the launcher must not die on them first (inf: OverflowError)
    ("inf", "150"), ("1e400", "150"), ("nan", "150"), ("x", "150"), ("1e10", "150"), ("-3", "150"),
])
def test_the_launcher_gives_torchrun_the_grace_without_crashing(grace, expected):
    from job import launch
    from job.settings import MAX_GRACE_SECONDS

    assert launch.shutdown_timeout(grace) == expected
    assert launch._MAX_GRACE == MAX_GRACE_SECONDS  # one ceiling, stated twice (launch sits beside settings)


@pytest.mark.parametrize("value", ["1e-46", "0.05", "0", "101", "1e300"])
def test_a_distillation_temperature_that_breaks_the_loss_is_refused(value):
    # 1e-46 was accepted: NaN weights, a logged loss of 0.0, exit 0, and a fresh channel promoted the model
    assert "QA_DISTILL_TEMPERATURE:" in problems({"QA_TEACHER_MODEL": "t", "QA_DISTILL_TEMPERATURE": value})


def test_the_trainer_does_not_hide_a_non_finite_loss():
    from job.train import training_arguments
    from job.runtime.recipe import Recipe

    s = load_settings({"QA_DEVICE": "cpu", "QA_REPORT_TO": "none"})
    args = training_arguments(s, "/tmp/unused-trainer-dir", "fp32", Recipe(False, False, False, False, 0, None))
    assert args.logging_nan_inf_filter is False  # its default logged a diverged run's loss as 0.0


@pytest.mark.parametrize("field", ["QA_RUN_ID", "QA_OUTPUT_URI", "QA_WORK_DIR", "QA_CHANNEL", "QA_TEACHER_CHANNEL"])
def test_a_credential_in_a_name_that_becomes_an_object_key_is_refused(field):
    """Artifacts mask a credential; an object's own key cannot be masked, so such a name is refused at start."""
    from job.observe.redaction import register_secrets

    register_secrets({"NAME_TEST_TOKEN": "nameTok7361x"})
    value = {"QA_OUTPUT_URI": "s3://bucket/nameTok7361x/runs", "QA_WORK_DIR": "/scratch/nameTok7361x"}.get(field, "nightly-nameTok7361x")
    msg = problems({field: value})
    assert f"{field}: holds a credential" in msg and "nameTok7361x" not in msg
