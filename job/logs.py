"""One JSON object per line on stdout, so ``kubectl logs`` and log pipelines can follow the run."""
from __future__ import annotations

import json
import logging
import sys
import time

from job.redaction import redact, redact_text

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, rank: int | None = None):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.rank is not None:
            entry["rank"] = self.rank
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info and record.levelno >= logging.ERROR:
            entry["exception"] = self.formatException(record.exc_info).splitlines()[-1]
        # every line, ours and the libraries', passes here: the one place secrets are removed
        return redact_text(json.dumps(redact(entry), default=str))


def setup_logging(level: int = logging.INFO, rank: int | None = None) -> None:
    """JSON lines on stdout; under torchrun each line carries the process's rank."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(rank))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party libraries speak through the same JSON handler, but only when it matters.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "filelock", "fsspec", "datasets", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        if not sys.stderr.isatty():
            transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
        transformers.utils.logging.set_verbosity_warning()
    except ImportError:
        pass
