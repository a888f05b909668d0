"""A channel pointer version: its schema, how one is built from a published run, and how one is checked.

The pointer names a run and repeats what a server or an operator needs without opening the run
folder (model location, metrics, fingerprints, warm starts), plus how the channel got there
(``seq``, ``previous``, ``rollback_to``, ``action``, ``reason``, ``held``). ``problem`` is the one
check applied to every pointer and history entry read from storage.
"""
from __future__ import annotations

import time

from job import safe_json
from job.errors import ConfigError
from job.observe.redaction import artifact_json
from job.store.fingerprint import eval_fingerprint, recipe
from job.store.locations import is_run_id, join
from job.store.storage import NotFound, Storage

SCHEMA = 1
_TEXT_FIELDS = ("model_uri", "fingerprint", "recipe", "data_fingerprint", "eval_fingerprint", "promoted_at",
                "changed_at", "action", "reason")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def encode(pointer: dict) -> bytes:
    return artifact_json(pointer, indent=1, sort_keys=True)


def published_run(root: Storage, run_id: str) -> dict:
    """What a pointer says about a published run, read from its folder; ConfigError unless complete.

    ``root`` is the storage of ``QA_OUTPUT_URI``. The run's own records are the source: its
    ``COMPLETE`` marker, ``metrics.json``, ``run.json`` (fingerprints, what it started from) and
    its model's ``config.json``.
    """
    if not is_run_id(run_id):
        raise ConfigError(f"invalid run id {str(run_id)[:80]!r}")
    where = f"{root.uri}/{run_id}"
    try:
        root.get_bytes(f"{run_id}/COMPLETE")
    except NotFound:
        raise ConfigError(f"run {run_id!r} is not complete ({where}/COMPLETE is missing); only complete runs can be "
                          "promoted: nothing was moved") from None
    name = "model/config.json"
    try:
        root.size(f"{run_id}/{name}")
        name = "metrics.json"
        metrics = safe_json.loads(root.get_bytes(f"{run_id}/{name}")[0])
        name = "run.json"
        record = safe_json.loads(root.get_bytes(f"{run_id}/{name}")[0])
    except NotFound:
        raise ConfigError(f"run {run_id!r} has no {name} (its model is deleted by retention once it is old and no "
                          "longer in the channel's recent history): nothing was moved") from None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"run {run_id!r}: metrics.json or run.json is not JSON: nothing was moved") from None
    inputs = record.get("inputs") if isinstance(record, dict) else None
    if not isinstance(metrics, dict) or not isinstance(inputs, dict) or not isinstance(record.get("fingerprint"), str):
        raise ConfigError(f"run {run_id!r}: metrics.json or run.json is not what this job writes: nothing was moved")
    init = inputs.get("init") if isinstance(inputs.get("init"), dict) else {}
    warm = init.get("warm_starts", 0)
    return {
        "run_id": run_id, "model_uri": join(root.uri, run_id, "model"),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "fingerprint": record["fingerprint"],
        "recipe": record.get("recipe") or recipe(inputs),
        "eval_fingerprint": record.get("eval_fingerprint") or eval_fingerprint(inputs),
        "data_fingerprint": str(inputs.get("train_sha256")),
        "warm_starts": warm if _count(warm) else 0,
    }


def next_version(current: dict | None, name: str, run: dict, by: str, action: str, reason: str, *, seq: int,
                 **extra) -> dict:
    """The pointer that puts ``run`` (``published_run``) on the channel after ``current``, as version ``seq``.

    ``seq`` comes from ``Channel.next_seq``: past every history entry, not just past ``current``.
    """
    stamp = now()
    return {
        "schema": SCHEMA, "channel": name, "seq": seq, **run,
        "previous": current["run_id"] if current else None,
        "rollback_to": current["run_id"] if current else None,
        "promoted_at": stamp, "promoted_by": by, "changed_at": stamp, "action": action, "reason": reason,
        "held": current.get("held") if current else None, **extra,
    }


def problem(p, name: str) -> str:
    """What is wrong with a pointer object, or '' when it has the shape this job writes."""
    if not isinstance(p, dict):
        return "not a JSON object"
    if p.get("schema") != SCHEMA:
        return f"schema {str(p.get('schema'))[:20]!r}, expected {SCHEMA}"
    if p.get("channel") != name:
        return f"names channel {str(p.get('channel'))[:70]!r}"
    if not _count(p.get("seq")) or p["seq"] < 1:
        return "seq must be a positive integer"
    if not is_run_id(p.get("run_id")):
        return "run_id is not a run id"
    for field in ("previous", "rollback_to"):
        if p.get(field) is not None and not is_run_id(p[field]):
            return f"{field} is not a run id"
    if not _count(p.get("warm_starts")):
        return "warm_starts must be a non-negative integer"
    if not isinstance(p.get("metrics"), dict):
        return "metrics must be an object"
    for field in _TEXT_FIELDS:
        if not isinstance(p.get(field), str):
            return f"{field} must be a string"
    if p.get("promoted_by") not in ("nightly", "manual"):
        return "promoted_by must be 'nightly' or 'manual'"
    if p.get("held") is not None and not isinstance(p["held"], dict):
        return "held must be an object or null"
    return ""


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
