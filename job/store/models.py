"""A published model's own files, from a local folder or ``s3://``, for answering or a warm start.

``--model`` (``job.answer``) and the channel holder (``job.channels.holder``) name a model folder
or a run folder (its ``model/`` is used). Only the model's own top-level files are downloaded,
never checkpoints or caches, and each name read from storage is confined to the download folder.
"""
from __future__ import annotations

from pathlib import Path

from job.errors import ConfigError
from job.store.locations import UnsafeName, confine, local_path
from job.store.storage import COMMAND_LINE_POLICY, open_storage


def fetch_model(uri: str, dest: Path, endpoint_url: str | None = None, region: str | None = None) -> Path:
    """A local folder for a model given as a model or run folder, local or ``s3://bucket/prefix``."""
    if not uri.startswith("s3://"):
        path = local_path(uri)
        if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
            path = path / "model"  # a run folder
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {uri}: no model there (no config.json)")
        return path
    store = open_storage(uri, COMMAND_LINE_POLICY, endpoint_url, region)
    keys = store.list("")
    if "config.json" not in keys and "model/config.json" in keys:
        keys = [k[len("model/"):] for k in keys if k.startswith("model/")]
        store = open_storage(uri.rstrip("/") + "/model", COMMAND_LINE_POLICY, endpoint_url, region)
    top_level = [k for k in keys if "/" not in k]  # a model's own files; never checkpoints or caches
    if "config.json" not in top_level:
        raise ConfigError(f"--model {uri}: no model there (no config.json)")
    for key in top_level:
        try:
            local = confine(dest, key)
        except UnsafeName as exc:
            raise ConfigError(f"--model {uri}: refusing an unsafe object name ({exc})") from None
        store.get_file(key, local)
    return dest
