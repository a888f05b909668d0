"""Every setting of the job, read once from ``QA_*`` environment variables and validated at start.

``load_settings`` is the only place in the package that reads the environment for ``QA_``
variables; the frozen ``Settings`` it returns is passed down to every stage. Credentials are not
settings: boto3 finds them in its own chain (``AWS_*`` variables, mounted files, IRSA), so nothing
here can print a secret.
"""
from __future__ import annotations

import datetime as _dt
import difflib
import re
import tempfile
from pathlib import Path
from typing import Literal, Mapping
from urllib.parse import urlsplit

from pydantic import Field, PositiveInt, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from job.errors import ConfigError
from job.observe.redaction import holds_secret, redact
from job.observe.trackers import tracker_problems
from job.store.listing import parse_selection
from job.store.locations import UnsafeName, check_channel_name, is_run_id, is_s3, join, parse_s3

ENV_PREFIX = "QA_"
_REGION = re.compile(r"[a-z]{2}(-[a-z0-9]+)+-\d+|[a-z0-9][a-z0-9-]{0,62}")
# Kubernetes injects <SERVICE>_SERVICE_HOST, <SERVICE>_PORT_80_TCP... for every Service in the
# namespace; a Service named "qa-..." must not turn into an "unknown setting" error.
_SERVICE_LINK = re.compile(r"_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?)$")
# Every duration has a ceiling a real run could use, and no more: QA_STOP_GRACE_SECONDS=1e10 once
# passed every check, then overflowed the first timed wait after training (threading refuses
# timeouts above TIMEOUT_MAX, about 9.2e9 s) and nothing was published. The ceilings keep every
# sum a wait makes of them (monotonic() + grace, a watchdog's sleep) far below that.
MAX_GRACE_SECONDS = 86_400.0  # a day: far beyond any pod's terminationGracePeriodSeconds in practice
MAX_LEASE_SECONDS = 3_600.0  # what a replacement watches a silent lease for (job/store/lease.py caps the same)
MAX_BACKOFF_SECONDS = 30.0  # the cap each doubled retry delay already has (job/store/storage.py)
MAX_STORAGE_TIMEOUT_SECONDS = 600.0  # one storage call's connect/read timeout
MAX_STORAGE_ATTEMPTS = 100  # with the 30 s cap: under an hour of retrying before exit 75
MAX_CHECKPOINT_MINUTES = 10_080.0  # a week
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.1, 100.0  # QA_DISTILL_TEMPERATURE: the loss stays finite in fp32 between


def _default_run_id() -> str:
    return "run-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


class Settings(BaseSettings):
    """The job's configuration. Each field is the variable ``QA_<FIELD>`` in upper case."""

    # allow_inf_nan=False: "inf" seconds of grace or a NaN threshold would pass every bound check
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", allow_inf_nan=False)

    # identity and places
    run_id: str = Field(default_factory=_default_run_id, description="identity of the run")
    output_uri: str = Field("outputs", description="local directory or s3://bucket/prefix")
    work_dir: str = Field(
        str(Path(tempfile.gettempdir()) / "qa-finetune"),
        description="local scratch for features, checkpoints and the model before upload",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint; unset = AWS")
    s3_region: str | None = Field(None, description="region for the S3 client")

    # model and data
    model_name: str = "distilbert-base-uncased"
    dataset: str = "squad"
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    train_uri: str | None = None
    eval_uri: str | None = None
    squad_v2: bool = False
    train_select: str = Field("all", description="which files of a training prefix: all, newest:N or days:D [:key|:modified]")
    max_train_samples: PositiveInt | None = None
    max_eval_samples: PositiveInt | None = None

    # distillation (README "Distillation"): a teacher's start/end distributions beside the gold spans
    teacher_model: str | None = Field(None, description="teacher QA model: hub id, folder, run folder or s3://.../model; unset = none")
    teacher_channel: str | None = Field(None, description="teacher = the model this channel's pointer names on QA_OUTPUT_URI")
    distill_alpha: float = Field(0.5, ge=0, le=1, description="weight of the gold spans; 1 - alpha weighs the teacher's")
    # 0.1 to 100: 1e-46 was accepted, the teacher's logits over it overflowed fp32, and the student's
    # weights went NaN; below 0.1 the softened distribution is the teacher's argmax in all but name
    distill_temperature: float = Field(2.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE,
                                       description="softmax temperature of the teacher's part")

    # windows and decoding
    max_length: int = Field(384, ge=32, le=8192)
    doc_stride: int = Field(128, ge=1)
    n_best_size: int = Field(20, ge=1, le=1000)
    max_answer_length: int = Field(30, ge=1, le=1024)
    null_score_diff_threshold: float = 0.0

    # training (defaults: the published DistilBERT / BERT SQuAD recipe)
    epochs: float = Field(2.0, gt=0, le=1000)
    max_steps: int = Field(-1, ge=-1, description="stop after this many steps; -1 = use epochs")
    learning_rate: float = Field(3e-5, gt=0, lt=1)
    batch_size: PositiveInt = 12
    eval_batch_size: PositiveInt = 64
    grad_accum_steps: PositiveInt = 1
    weight_decay: float = Field(0.01, ge=0, lt=1)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(42, ge=0, le=2**32 - 1)  # numpy's seed range: a larger one fails deep in set_seed
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="cuda: a GPU is required (exit 2 without one); auto: CUDA when usable")
    group_by_length: bool = True
    logging_steps: PositiveInt = 50

    # watching a run: trackers, evaluation during training, log format
    report_to: str = Field("tensorboard", description="comma list of the Trainer's integrations, or none")
    eval_steps: int = Field(0, ge=0, description="EM/F1 every N steps (and before the first); 0 = only at the end")
    eval_samples_during_training: int = Field(1000, ge=0, description="eval examples used during training; 0 = all")
    log_format: Literal["auto", "json", "text"] = "auto"

    # speed: the GPU recipe and parallel preprocessing (job/runtime/recipe.py). "auto" is the measured
    # choice for the device (bench/RESULTS.md). A switch that cannot apply here (no CUDA, a GPU
    # before Ampere, a model without SDPA, no compiler) falls back with one log line, never an error.
    tf32: bool = Field(True, description="TF32 matmuls on Ampere and later GPUs")
    fused_adamw: bool = Field(True, description="one fused kernel for the AdamW update (CUDA and CPU have it)")
    attention: Literal["sdpa", "eager"] = Field("sdpa", description="attention kernel; sdpa falls back to eager where the model lacks it")
    compile: Literal["auto", "true", "false"] = Field("auto", description="torch.compile; auto = on CUDA")
    pin_memory: bool = Field(True, description="page-locked batches for faster host-to-GPU copies (CUDA only)")
    dataloader_workers: int | Literal["auto"] = Field("auto", description="DataLoader processes; auto = up to 4 on CUDA, 0 on CPU")
    preprocess_workers: PositiveInt | None = Field(None, le=64, description="tokenizing processes; unset = usable CPUs, at most 8")

    # checkpoints, preemption and the run lease
    # "auto": every 500 steps or 30 minutes on CPU, every 10 minutes on CUDA (job/store/checkpoints.py)
    checkpoint_steps: int | Literal["auto"] = Field("auto", description="0 = no step-based checkpoints")
    checkpoint_minutes: float | Literal["auto"] = Field("auto", description="0 = no time-based checkpoints")
    checkpoints_to_keep: PositiveInt = 2
    stop_grace_seconds: float = Field(120.0, gt=0, le=MAX_GRACE_SECONDS)
    lease_seconds: float = Field(60.0, ge=5, le=MAX_LEASE_SECONDS)

    # storage retries: bounded, so an outage ends in exit 75 instead of hanging forever
    storage_attempts: int = Field(6, ge=1, le=MAX_STORAGE_ATTEMPTS)
    storage_backoff_seconds: float = Field(1.0, ge=0, le=MAX_BACKOFF_SECONDS)
    storage_timeout_seconds: float = Field(20.0, gt=0, le=MAX_STORAGE_TIMEOUT_SECONDS)

    # nightly retraining (README "Nightly retraining and channels"): where a published model is
    # promoted, the quality gate in front of it, skipping nights with nothing new, warm starts and
    # how many old runs keep their bulky files. Unset QA_CHANNEL: no promotion, as before.
    channel: str | None = Field(None, description="channel pointer to promote to: <output>/channels/<channel>.json")
    gate_metric: Literal["f1", "exact_match"] = "f1"
    gate_min: float = Field(0.0, ge=0, le=100, description="absolute floor for the candidate's metric, in points")
    gate_max_drop: float = Field(1.0, ge=0, le=100, description="tolerated drop against the holder, in points")
    skip_unchanged: bool = True
    init_from: Literal["base", "channel"] = "base"
    warm_start_limit: int = Field(5, ge=0, le=1000, description="warm starts in a row before a fresh start from the base")
    keep_runs: PositiveInt = 7

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # load_settings hands the environment in as keyword arguments, after checking for
        # unknown QA_ names; reading os.environ again here would bypass that check.
        return (init_settings,)

    @field_validator("dataloader_workers", mode="before")
    @classmethod
    def _auto_or_count(cls, v):
        if v == "auto":
            return v
        try:
            n = int(v)
        except (TypeError, ValueError):
            n = -1
        if not 0 <= n <= 64:
            raise ValueError("must be auto or a number of processes from 0 to 64")
        return n

    @field_validator("checkpoint_steps", "checkpoint_minutes", mode="before")
    @classmethod
    def _auto_or_cadence(cls, v, info):
        if v == "auto":
            return v
        try:
            n = float(v)
        except (TypeError, ValueError):
            n = -1.0
        steps = info.field_name == "checkpoint_steps"
        most = float("inf") if steps else MAX_CHECKPOINT_MINUTES
        if not (0 <= n <= most and n < float("inf")) or (steps and n != int(n)):
            kind = "a whole number of steps, 0 or more" if steps else f"a number of minutes from 0 to {most:g}"
            raise ValueError(f"must be auto or {kind} (0 = off)")
        return int(n) if info.field_name == "checkpoint_steps" else n

    @field_validator("run_id")
    @classmethod
    def _run_id_is_a_key(cls, v: str) -> str:
        if not is_run_id(v):
            raise ValueError("must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("train_uri", "eval_uri", "output_uri", "teacher_model")
    @classmethod
    def _known_scheme(cls, v: str | None) -> str | None:
        """A local path (``file://`` is accepted and dropped) or ``s3://bucket/key``, parsed by job.store.locations."""
        if v is None:
            return v
        if not v.strip():
            raise ValueError("must not be empty")
        if v.startswith("file://"):
            v = v[len("file://"):]
            if not v:
                raise ValueError("file:// needs a path")
        elif "://" in v and not is_s3(v):
            raise ValueError(f"unsupported URI scheme {v.split('://')[0][:20]!r}: use a local path or s3://bucket/key")
        elif is_s3(v):
            try:
                parse_s3(v)
            except UnsafeName as exc:
                raise ValueError(str(exc)) from None
        if any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("must not contain control characters")
        return v

    @field_validator("train_select")
    @classmethod
    def _selection(cls, v: str) -> str:
        return str(parse_selection(v))  # one spelling per choice: "NEWEST:7:key" is "newest:7"

    @field_validator("channel", "teacher_channel")
    @classmethod
    def _channel_is_a_name(cls, v: str | None) -> str | None:
        return check_channel_name(v) if v is not None else v

    @field_validator("report_to")
    @classmethod
    def _tracker_list(cls, v: str) -> str:
        """Normalised to "a,b" (lower case, no blanks, no repeats); "none" alone or nothing."""
        names = list(dict.fromkeys(n.strip().lower() for n in v.split(",") if n.strip()))
        if "none" in names and len(names) > 1:
            raise ValueError("'none' cannot be combined with tracker names")
        return ",".join(n for n in names if n != "none") or "none"

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_is_a_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018  raises on a port that is not a number
        except ValueError:
            raise ValueError("not a URL: use http(s)://host[:port]") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in v):
            raise ValueError("not a URL: use http(s)://host[:port]")
        return v

    @field_validator("s3_region")
    @classmethod
    def _region_is_a_name(cls, v: str | None) -> str | None:
        if v is not None and not _REGION.fullmatch(v):
            raise ValueError("not a region name (e.g. us-east-1)")
        return v

    @property
    def trackers(self) -> tuple[str, ...]:
        return () if self.report_to == "none" else tuple(self.report_to.split(","))

    @property
    def distilling(self) -> bool:
        return bool(self.teacher_model or self.teacher_channel)

    @property
    def run_uri(self) -> str:
        return join(self.output_uri, self.run_id)

    def public_dict(self) -> dict:
        """The resolved settings with anything secret-looking redacted, for manifests and logs."""
        return redact(self.model_dump())


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def known_variables() -> set[str]:
    return {env_name(f) for f in Settings.model_fields}


def load_settings(environ: Mapping[str, str]) -> Settings:
    """Build the settings from an environment mapping; raise one ConfigError listing every problem."""
    problems: list[str] = []
    known = known_variables()
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known and not _SERVICE_LINK.search(name.upper()):
            guess = difflib.get_close_matches(name.upper(), known, n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            problems.append(f"{name}: unknown setting{hint}")
    values = {
        k[len(ENV_PREFIX):].lower(): v
        for k, v in environ.items()
        if k.upper().startswith(ENV_PREFIX) and k.upper() in known
    }
    settings = None
    try:
        # init kwargs, not the environment, so tests and callers can pass any mapping
        settings = Settings(**{k: _blank_to_none(k, v) for k, v in values.items()})
    except ValidationError as exc:
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            raw = values.get(field)
            # the value helps find a typo; a secret in it must not be echoed (redact is the one filter)
            shown = f" (got {redact(raw)!r})" if raw is not None and len(str(raw)) < 80 else ""
            problems.append(f"{env_name(field)}: {_message(err)}{shown}")
    if settings is not None:
        problems.extend(_cross_checks(settings))
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))
    return settings


def _blank_to_none(field: str, value: str):
    # An empty variable in a manifest means "unset" for optional fields.
    if value == "" and Settings.model_fields[field].default is None:
        return None
    return value


def _message(err: dict) -> str:
    msg = err.get("msg", "invalid")
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def _cross_checks(s: Settings) -> list[str]:
    problems = []
    if s.doc_stride >= s.max_length:
        problems.append(
            f"QA_DOC_STRIDE: must be smaller than QA_MAX_LENGTH ({s.doc_stride} >= {s.max_length})"
        )
    if s.max_length - s.doc_stride < 16:
        # a window must advance by at least a few tokens, or long contexts explode into windows
        if s.doc_stride < s.max_length:
            problems.append("QA_DOC_STRIDE: leaves fewer than 16 new tokens per window; lower it")
    if not s.train_uri and not s.dataset:
        problems.append("QA_TRAIN_URI: set it or QA_DATASET")
    if s.train_select != "all" and not (s.train_uri and (s.train_uri.endswith("/") or not is_s3(s.train_uri))):
        problems.append("QA_TRAIN_SELECT: selects files of a folder or s3:// prefix ending in '/'; set QA_TRAIN_URI to one")
    if s.teacher_model and s.teacher_channel:
        problems.append("QA_TEACHER_CHANNEL: names the teacher as QA_TEACHER_MODEL does; set one of them")
    if s.init_from == "channel" and not s.channel:
        problems.append("QA_INIT_FROM: 'channel' needs QA_CHANNEL (the channel whose holder to start from)")
    if s.lease_seconds < 3 * s.storage_timeout_seconds / 2:
        problems.append("QA_LEASE_SECONDS: must be at least 1.5 x QA_STORAGE_TIMEOUT_SECONDS")
    if s.trackers:
        problems.extend(f"QA_REPORT_TO: {p}" for p in tracker_problems(s.trackers))
    # artifacts mask a credential wherever it appears (job.observe.redaction), but these become object
    # keys in storage (or, the work dir, paths inside checkpoints), which no mask can reach
    for field in ("run_id", "output_uri", "work_dir", "channel", "teacher_channel"):
        value = getattr(s, field)
        if value and holds_secret(value):
            problems.append(f"{env_name(field)}: holds a credential (the value of a secret variable of this process, or "
                            "user:password@); it would be part of every object name the run writes")
    return problems
