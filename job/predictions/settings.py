"""``python -m job.predict``'s settings: ``QA_PREDICT_*`` for what only predictions have, the job's own names for the rest.

A variable that means the same thing as the training job's has the same name, bounds and
default: storage (``QA_S3_ENDPOINT_URL``, ``QA_S3_REGION``, ``QA_STORAGE_*``), scratch
(``QA_WORK_DIR``), the hub dataset (``QA_DATASET``, ``QA_DATASET_CONFIG``), windows and decoding
(``QA_MAX_LENGTH``, ``QA_DOC_STRIDE``, ``QA_N_BEST_SIZE``, ``QA_MAX_ANSWER_LENGTH``,
``QA_NULL_SCORE_DIFF_THRESHOLD``, ``QA_SQUAD_V2``), ``QA_EVAL_BATCH_SIZE``, ``QA_DEVICE``,
``QA_LOG_FORMAT``, ``QA_STOP_GRACE_SECONDS`` and ``QA_LEASE_SECONDS``; one ConfigMap can hold
them for both commands. What the job does not have is ``QA_PREDICT_*``. A training setting that
predictions do not use (``QA_EPOCHS``) is refused by name, as a typo is: it would do nothing.

The windowing and decoding variables default to what the model was evaluated with (its
``serving.json``), so they are ``None`` here until ``decoding`` resolves them. The shard comes
from ``JOB_COMPLETION_INDEX``, which a Kubernetes Indexed Job sets in each pod: read here, with
everything else, once.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

from pydantic import Field, PositiveInt, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from job.errors import ConfigError
from job.observe.redaction import redact
from job.settings import ENV_PREFIX, Settings, env_name, load_environment
from job.settings import known_variables as training_variables

SHARD_INDEX = "JOB_COMPLETION_INDEX"  # set by Kubernetes in every pod of an Indexed Job
MAX_SHARDS = 10_000
# the job's defaults, where neither a setting nor the model's serving.json says otherwise
_JOB_DEFAULTS = {name: Settings.model_fields[name].default
                 for name in ("max_length", "doc_stride", "n_best_size", "max_answer_length", "null_score_diff_threshold")}


class PredictSettings(BaseSettings):
    """Each field is the variable ``QA_<FIELD>`` in upper case; ``shard`` is ``JOB_COMPLETION_INDEX``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", allow_inf_nan=False)

    # what to predict with, on what, into where
    predict_model: str = Field(description="model or run folder, local or s3://; with a channel: the QA_OUTPUT_URI holding it")
    predict_channel: str | None = Field(None, description="predict with the model this channel's pointer names")
    predict_input_uri: str | None = Field(None, description="file, folder or s3:// object / prefix ending in '/'; unset = QA_DATASET")
    predict_split: str = Field("validation", description="hub split, with QA_DATASET")
    predict_output_uri: str = Field(description="local folder or s3://bucket/prefix for the predictions")
    predict_runtime: Literal["torch", "onnx", "onnx-int8"] = "torch"
    predict_chunk_rows: int = Field(1000, ge=1, le=100_000, description="rows per committed chunk (its windows are in memory)")
    predict_shards: int = Field(1, ge=1, le=MAX_SHARDS, description="completions of the Indexed Job")
    shard: int = Field(0, ge=0, description="this pod's shard: JOB_COMPLETION_INDEX, not a QA_ variable")

    # the same names, bounds and defaults as the job's (tests/predictions/test_settings.py compares them)
    work_dir: str = str(Path(tempfile.gettempdir()) / "qa-finetune")
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    dataset: str | None = None  # no default here: predicting on SQuAD's dev set unasked would be a surprise
    dataset_config: str | None = None
    squad_v2: bool | None = None
    max_length: int | None = Field(None, ge=32, le=8192)
    doc_stride: int | None = Field(None, ge=1)
    n_best_size: int | None = Field(None, ge=1, le=1000)
    max_answer_length: int | None = Field(None, ge=1, le=1024)
    null_score_diff_threshold: float | None = None
    eval_batch_size: PositiveInt = 64
    device: Literal["auto", "cuda", "cpu"] = "auto"
    log_format: Literal["auto", "json", "text"] = "auto"
    # the job's own fields, bounds included: a bound tightened there holds here too
    stop_grace_seconds: float = Settings.model_fields["stop_grace_seconds"]
    lease_seconds: float = Settings.model_fields["lease_seconds"]
    storage_attempts: int = Settings.model_fields["storage_attempts"]
    storage_backoff_seconds: float = Settings.model_fields["storage_backoff_seconds"]
    storage_timeout_seconds: float = Settings.model_fields["storage_timeout_seconds"]

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings,)  # the environment comes in through load_predict_settings, checked

    # the job's own checks, for the same kinds of values
    @field_validator("predict_model", "predict_input_uri", "predict_output_uri")
    @classmethod
    def _uri(cls, v):
        return Settings._known_scheme(v)

    @field_validator("predict_channel")
    @classmethod
    def _channel(cls, v):
        return Settings._channel_is_a_name(v)

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, v):
        return Settings._endpoint_is_a_url(v)

    @field_validator("s3_region")
    @classmethod
    def _region(cls, v):
        return Settings._region_is_a_name(v)

    @property
    def shard_name(self) -> str:
        """The shard's folder under the output: ``00001-of-00004``."""
        return f"{self.shard:05d}-of-{self.predict_shards:05d}"

    def public_dict(self) -> dict:
        return redact(self.model_dump())


def known_variables() -> set[str]:
    return {env_name(f) for f in PredictSettings.model_fields if f != "shard"}


def load_predict_settings(environ: Mapping[str, str]) -> PredictSettings:
    """The settings from an environment mapping; one ConfigError naming every bad variable (exit 2)."""
    training = training_variables()

    def hint(name: str) -> str | None:
        if name in training:
            return " (a setting of the training job, python -m job; job.predict does not use it)"
        return None

    problems, settings = [], None
    try:
        settings = load_environment(PredictSettings, environ, known_variables(), _cross_checks, hint)
    except ConfigError as exc:
        problems.append(str(exc).removeprefix("invalid settings: "))
    raw = environ.get(SHARD_INDEX, "0")
    shard = int(raw) if raw.strip().isdigit() else None
    if shard is None:
        problems.append(f"{SHARD_INDEX}: not a shard number (got {raw[:20]!r})")
    elif settings is not None and shard >= settings.predict_shards:
        problems.append(f"{SHARD_INDEX}: {shard} is not below QA_PREDICT_SHARDS={settings.predict_shards} "
                        "(the Indexed Job's completions and QA_PREDICT_SHARDS must be the same number)")
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))
    return settings.model_copy(update={"shard": shard})


def _cross_checks(s: PredictSettings) -> list[str]:
    problems = []
    if not s.predict_input_uri and not s.dataset:
        problems.append("QA_PREDICT_INPUT_URI: set it (or QA_DATASET for a hub dataset): what to predict on")
    if s.predict_runtime != "torch" and s.device == "cuda":
        problems.append(f"QA_DEVICE: cuda runs the torch runtime only, not QA_PREDICT_RUNTIME={s.predict_runtime}")
    if s.lease_seconds < 3 * s.storage_timeout_seconds / 2:
        problems.append("QA_LEASE_SECONDS: must be at least 1.5 x QA_STORAGE_TIMEOUT_SECONDS")
    problems.extend(window_problems(s.max_length, s.doc_stride))
    return problems


def window_problems(max_length: int | None, doc_stride: int | None, source: str = "") -> list[str]:
    """The job's window rules, on what is known: checked at start, and again with the model's serving.json."""
    if max_length is None or doc_stride is None:
        return []
    if doc_stride >= max_length:
        return [f"QA_DOC_STRIDE: must be smaller than QA_MAX_LENGTH ({doc_stride} >= {max_length}{source})"]
    if max_length - doc_stride < 16:
        return [f"QA_DOC_STRIDE: leaves fewer than 16 new tokens per window ({doc_stride} of {max_length}{source}); lower it"]
    return []


@dataclass(frozen=True)
class Decoding:
    """The windows and the decoding predictions are made with, resolved once (the model's first)."""

    max_length: int
    doc_stride: int
    n_best_size: int
    max_answer_length: int
    version_2: bool
    null_score_diff_threshold: float


def decoding(settings: PredictSettings, recorded: dict) -> Decoding:
    """A setting where one is given, else what the model was evaluated with (``serving.json``'s ``decoding``),
    else the job's default; ConfigError when the combination breaks the window rules."""
    chosen = {}
    for name, default in (*_JOB_DEFAULTS.items(), ("squad_v2", False)):
        key = "version_2" if name == "squad_v2" else name
        given = getattr(settings, name)
        chosen[key] = given if given is not None else recorded.get(key, default)
    problems = window_problems(chosen["max_length"], chosen["doc_stride"], ", with the model's serving.json")
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))
    return Decoding(**chosen)
