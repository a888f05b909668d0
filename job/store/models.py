"""Models as files: a published model fetched back, and what a base model is, by content.

``--model`` (``job.answer``) and the channel holder (``job.channels.holder``) name a model folder
or a run folder (its ``model/`` is used). Only the model's own top-level files are downloaded,
never checkpoints or caches, and each name read from storage is confined to the download folder.

``model_identity`` says what ``QA_MODEL_NAME`` is by content, for the run's fingerprint: a folder
replaced in place, or a hub id whose weights were updated, is another base model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from job import safe_json
from job.errors import ConfigError, StorageUnavailable
from job.store.files import atomic_write
from job.store.locations import UnsafeName, confine, local_path
from job.store.storage import COMMAND_LINE_POLICY, open_storage, sha256_file

log = logging.getLogger(__name__)
FETCHED = ".fetched.json"  # a cached model's files with sizes and sha256, written last

# what loading a model reads from its folder: config, weights, tokenizer (not a model card or images)
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")


def check_json_files(folder: str | Path, what: str) -> None:
    """ConfigError naming ``what`` when a local model folder's JSON files (config, tokenizer) cannot be read
    within ``job.safe_json``'s bounds: transformers parses them with ``json.loads``, which a config nested
    100,000 deep ends with RecursionError (exit 1, a traceback). Not a folder (a hub id): nothing to check."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return
    for file in sorted(p for p in path.iterdir() if p.suffix == ".json" and p.is_file() and not p.name.startswith(".")):
        try:
            doc = safe_json.loads(file.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{what}: cannot load ({file.name}: {exc})") from None
        if file.name == "config.json" and not isinstance(doc, dict):
            raise ConfigError(f"{what}: cannot load (config.json: not a JSON object)")


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
        check_json_files(path, what)
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
    check_json_files(dest, what)
    return dest


def fetch_model_cached(uri: str, root: Path, endpoint_url: str | None = None, region: str | None = None,
                       what: str = "", runtime: str | None = None) -> Path:
    """``fetch_model`` of an ``s3://`` model into ``root/<key>/``, downloaded only when no verified copy is there.

    The key is the model's listing: each top-level file's name, size and ETag, so an object rewritten in
    storage is another key (downloaded again), and the same model found by a retry is not. A copy counts
    only with its manifest (written last) and every file's sha256 matching it, as the feature cache.
    """
    what = what or f"--model {uri}"
    store = open_storage(uri, COMMAND_LINE_POLICY, endpoint_url, region)
    listing = store.list_info("")
    if not any(o["key"] == "config.json" for o in listing) and any(o["key"] == "model/config.json" for o in listing):
        uri = uri.rstrip("/") + "/model"  # a run folder
        listing = [{**o, "key": o["key"][len("model/"):]} for o in listing if o["key"].startswith("model/")]
    top_level = [(o["key"], o["size"], o["etag"]) for o in listing
                 if "/" not in o["key"] and not (runtime and _other_runtimes_file(o["key"], runtime))]
    key = hashlib.sha256(json.dumps([uri, top_level]).encode()).hexdigest()[:24]
    dest = root / key
    if _fetched(dest):
        log.info("model found fetched", extra={"event": "model_fetched", "uri": uri, "cache": "local", "key": key})
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    fetch_model(uri, dest, endpoint_url, region, what, runtime)
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(dest.iterdir()) if p.is_file()}
    atomic_write(dest / FETCHED, json.dumps(files).encode())
    log.info("model fetched", extra={"event": "model_fetched", "uri": uri, "cache": "miss", "key": key, "files": len(files)})
    return dest


def _fetched(dest: Path) -> bool:
    try:
        files = safe_json.loads((dest / FETCHED).read_text())
        return bool(files) and all((dest / name).is_file() and (dest / name).stat().st_size == meta["size"]
                                   and sha256_file(dest / name) == meta["sha256"] for name, meta in files.items())
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False


def _other_runtimes_file(name: str, runtime: str) -> bool:
    """A weights file that ``runtime`` does not load: the torch weights for an ONNX runtime, any other graph."""
    from job.serving import ONNX_FILES, TORCH

    if name.endswith((".safetensors", ".bin")) and name != "training_args.bin":
        return runtime != TORCH
    return name.endswith(".onnx") and name != ONNX_FILES.get(runtime)
