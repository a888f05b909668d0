"""Models as files: a published model fetched back, and what a base model is, by content.

``--model`` (``job.answer``) and the channel holder (``job.channels.holder``) name a model folder
or a run folder (its ``model/`` is used). Only the model's own top-level files are downloaded,
never checkpoints or caches, and each name read from storage is confined to the download folder.

``model_identity`` says what ``QA_MODEL_NAME`` is by content, for the run's fingerprint: a folder
replaced in place, or a hub id whose weights were updated, is another base model.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from job.errors import ConfigError, StorageUnavailable
from job.store.locations import UnsafeName, confine, local_path
from job.store.storage import COMMAND_LINE_POLICY, open_storage, sha256_file

# what loading a model reads from its folder: config, weights, tokenizer (not a model card or images)
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")


def model_identity(name: str, setting: str = "QA_MODEL_NAME") -> str:
    """``QA_MODEL_NAME`` by content: the sha256 of a folder's model files, or the commit a hub id resolves to.

    A hub id resolves to its current commit when the hub is reachable, and to the one in the local
    cache offline (``HF_HUB_OFFLINE``), as loading the model does. ``setting`` names it in errors.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        h = hashlib.sha256()
        for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES):
            h.update(f"{file.name}\0{sha256_file(file)}\n".encode())
        return f"sha256:{h.hexdigest()}"
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # hub ids are "name" or "org/name"
        raise ConfigError(f"{setting}={name}: no such model directory")
    try:
        from huggingface_hub import hf_hub_download

        config = Path(hf_hub_download(name, "config.json"))  # <cache>/snapshots/<commit>/config.json
    except Exception as exc:  # noqa: BLE001  the hub's errors, sorted as loading the model sorts them
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        if "offline" in first.lower() or "connect" in first.lower() or isinstance(exc, ConnectionError):
            raise StorageUnavailable(f"{setting}={name}: hub unreachable ({first})") from None
        raise ConfigError(f"{setting}={name}: cannot resolve it on the hub ({first})") from None
    return f"{name}@{config.parent.name}"


def fetch_model(uri: str, dest: Path, endpoint_url: str | None = None, region: str | None = None, what: str = "",
                runtime: str | None = None) -> Path:
    """A local folder for a model given as a model or run folder, local or ``s3://bucket/prefix``.

    ``what`` names the model in errors (default ``--model <uri>``, as ``job.answer`` is given it).
    ``runtime`` (``job.serving``): from ``s3://`` only what that runtime loads: the weights of the
    other runtimes (``*.safetensors``, ``*.onnx``) stay in storage (a DistilBERT's three are 0.6 GB).
    """
    what = what or f"--model {uri}"
    if not uri.startswith("s3://"):
        path = local_path(uri)
        if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
            path = path / "model"  # a run folder
        if not (path / "config.json").is_file():
            raise ConfigError(f"{what}: no model there (no config.json)")
        return path
    store = open_storage(uri, COMMAND_LINE_POLICY, endpoint_url, region)
    keys = store.list("")
    if "config.json" not in keys and "model/config.json" in keys:
        keys = [k[len("model/"):] for k in keys if k.startswith("model/")]
        store = open_storage(uri.rstrip("/") + "/model", COMMAND_LINE_POLICY, endpoint_url, region)
    top_level = [k for k in keys if "/" not in k]  # a model's own files; never checkpoints or caches
    if "config.json" not in top_level:
        raise ConfigError(f"{what}: no model there (no config.json)")
    if runtime is not None:
        top_level = [k for k in top_level if not _other_runtimes_file(k, runtime)]
    for key in top_level:
        try:
            local = confine(dest, key)
        except UnsafeName as exc:
            raise ConfigError(f"{what}: refusing an unsafe object name ({exc})") from None
        store.get_file(key, local)
    return dest


def _other_runtimes_file(name: str, runtime: str) -> bool:
    """A weights file that ``runtime`` does not load: the torch weights for an ONNX runtime, any other graph."""
    from job.serving import ONNX_FILES, TORCH

    if name.endswith((".safetensors", ".bin")) and name != "training_args.bin":
        return runtime != TORCH
    return name.endswith(".onnx") and name != ONNX_FILES.get(runtime)
