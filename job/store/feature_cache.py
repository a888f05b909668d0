"""Tokenized features, cached locally and in the run's storage, and verified before they are used.

``job.preprocess`` builds the features; this module keys, verifies, uploads and downloads them.

A cache folder ``cache/features-<key>/`` holds ``train.parquet``, ``eval.parquet`` and, written
last, ``features.json`` listing each file's size and sha256: the same commit-marker rule as
checkpoints. A cache that does not verify (replaced, truncated, half-uploaded, unreadable) is
rebuilt, never trusted; the key covers the data, the tokenizer and every preprocessing setting.

The same rule serves other files computed once beside the features (a teacher's logits,
``job.distill``): a ``Layout`` names their files and manifest.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from job import safe_json
from job.store.files import atomic_write
from job.store.storage import NotFound, sha256_file

log = logging.getLogger(__name__)
CACHE_VERSION = "2"  # bump when the feature layout changes, so old caches are not reused
NAMES = ("train.parquet", "eval.parquet")
MANIFEST = "features.json"


@dataclass(frozen=True)
class Layout:
    """The files of one kind of verified cache folder, and its manifest (written last)."""

    names: tuple[str, ...]
    manifest: str
    what: str  # in log lines: "features", "teacher logits"


FEATURES = Layout(NAMES, MANIFEST, "features")


def cache_key(tokenizer, model_name: str, train_sha: str, eval_sha: str, settings) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [CACHE_VERSION, model_name, type(tokenizer).__name__, hashlib.sha256(vocab.encode()).hexdigest(),
             train_sha, eval_sha, settings.max_length, settings.doc_stride,
             settings.max_train_samples, settings.max_eval_samples, settings.squad_v2]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def write_manifest(local: Path, layout: Layout = FEATURES) -> None:
    """Write ``features.json`` for the files in ``local``, last: until it exists the cache does not."""
    manifest = {name: {"size": (local / name).stat().st_size, "sha256": sha256_file(local / name)} for name in layout.names}
    atomic_write(local / layout.manifest, json.dumps(manifest).encode())


def upload(store, local: Path, remote: str, layout: Layout = FEATURES) -> None:
    """Put a verified cache folder into storage, the manifest last: a cache without it does not exist."""
    for name in (*layout.names, layout.manifest):
        store.put_file(local / name, remote + name)


def _listed(raw: bytes, layout: Layout) -> dict | None:
    """The manifest's ``{name: {size, sha256}}`` for exactly the expected names, or None."""
    try:
        manifest = safe_json.loads(raw)
        if set(manifest) != set(layout.names):
            return None
        for meta in manifest.values():
            if not (isinstance(meta["size"], int) and isinstance(meta["sha256"], str) and len(meta["sha256"]) == 64):
                return None
        return manifest
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        return None


def verified(local: Path, layout: Layout = FEATURES) -> bool:
    try:
        manifest = _listed((local / layout.manifest).read_bytes(), layout)
    except OSError:
        return False
    ok = manifest is not None and all(
        (local / n).is_file() and (local / n).stat().st_size == m["size"] and sha256_file(local / n) == m["sha256"]
        for n, m in manifest.items())
    if not ok and (local / layout.manifest).exists():
        log.warning(f"local {layout.what} cache does not verify; rebuilding",
                    extra={"event": "features_cache_invalid", "where": "local", "cache": layout.what})
    return ok


def download(store, remote: str, local: Path, layout: Layout = FEATURES) -> bool:
    """Fetch a committed remote cache and verify it; False (nothing trusted) when absent or invalid."""
    if remote + layout.manifest not in set(store.list(remote)):
        return False
    try:
        manifest = _listed(store.get_bytes(remote + layout.manifest)[0], layout)
        if manifest is None:
            raise ValueError("malformed manifest")
        local.mkdir(parents=True, exist_ok=True)
        for name, meta in manifest.items():
            store.get_file(remote + name, local / name)
            if sha256_file(local / name) != meta["sha256"]:
                raise ValueError(f"{name}: sha256 mismatch")
        (local / layout.manifest).write_text(json.dumps(manifest))
        return True
    except (NotFound, ValueError) as exc:
        log.warning(f"remote {layout.what} cache does not verify; rebuilding",
                    extra={"event": "features_cache_invalid", "where": "remote", "cache": layout.what, "reason": str(exc)[:200]})
        return False


def read(local: Path):
    import datasets

    try:
        return (datasets.Dataset.from_parquet(str(local / NAMES[0])), datasets.Dataset.from_parquet(str(local / NAMES[1])))
    except Exception as exc:  # a file that verified but does not parse: rebuild rather than fail every rerun
        log.warning("feature cache unreadable; rebuilding", extra={"event": "features_cache_invalid", "where": "local",
                                                                   "reason": f"{type(exc).__name__}: {str(exc)[:200]}"})
        return None
