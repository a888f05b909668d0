"""After a night: old runs of the channel give back their bulky files, and keep their records.

``QA_KEEP_RUNS`` newest runs gated for the channel are kept whole. Older ones lose their
checkpoints and feature caches, and their model too unless it is protected. A model is protected
when *any* channel on this output needs it: its holder, every run named (as holder, previous
holder or rollback target) by its last ``QA_KEEP_RUNS`` history entries, so a rollback always
finds its model, the starting model of each of its warm-started runs not yet complete, and the
teacher run each distilled run not yet complete pinned from it, so a retry finds them. A run promoted by hand from one channel to another is thus kept for both. If a
channel's pointer or history cannot be read, no model is deleted that night.

Their small records stay (``metrics.json``, ``predictions.json``, ``manifest.json``, ``run.json``,
``promotion.json``, ``COMPLETE``). A run without ``COMPLETE`` or with a ``lease.json`` (running,
crashed, or restarted in flight under an old run record) is never touched.

The plan is written to ``<run>/retention.json`` and logged (``retention`` event) before anything
is deleted, and what protects each run is checked again right before its files go. Inside each
folder the marker that makes it count goes first (a checkpoint's ``COMMIT.json``, a cache's
``features.json``, a model's ``config.json``), so a deletion cut short never leaves something that
looks whole. What was pruned is noted in the channel's run record, so later nights do not list
those folders again.
"""
from __future__ import annotations

import logging

from job.channels.channel import Channel, CorruptPointer, channel_names
from job.channels.pointer import now
from job.observe.redaction import artifact_json
from job.store.lease import KEY as LEASE
from job.store.storage import NotFound

log = logging.getLogger(__name__)
BULKY = ("checkpoints/", "cache/")
MODEL = "model/"
FIRST = ("COMMIT.json", "features.json", "config.json")  # markers deleted before the files they vouch for


def prune(ctx, channel) -> None:
    keep = ctx.settings.keep_runs
    channel.forget_start(ctx.settings.run_id)  # complete and gated: its own model is what counts now
    records = channel.gated_runs()
    older = [r for r in records[:-keep] if MODEL not in r.get("pruned", [])]
    if not older:
        return
    protected = protected_models(channel.store, keep)
    plan, untouched = [], []
    for record in older:
        if in_flight(channel.store, record["run_id"]):
            untouched.append(record["run_id"])
            continue
        keep_model = protected is None or record["run_id"] in protected
        parts = [p for p in (*BULKY, MODEL) if p not in record.get("pruned", []) and (p != MODEL or not keep_model)]
        if parts:
            plan.append({"run_id": record["run_id"], "delete": parts})
    if not plan:
        return
    decision = {"decided_at": now(), "keep_runs": keep, "kept": [r["run_id"] for r in records[-keep:]],
                "protected_models": sorted(protected) if protected is not None else "all (a channel could not be read)",
                "in_flight": untouched, "prune": plan}
    ctx.store.put_bytes("retention.json", artifact_json(decision, indent=1))
    log.info("pruning old runs of the channel", extra={"event": "retention", "channel": channel.name, **decision})
    ctx.lease.verify()
    by_id = {r["run_id"]: r for r in older}
    for item in plan:
        run_id = item["run_id"]
        if in_flight(channel.store, run_id):
            continue  # restarted meanwhile
        now_protected = protected_models(channel.store, keep) if MODEL in item["delete"] else set()
        if MODEL in item["delete"] and (now_protected is None or run_id in now_protected):
            item["delete"].remove(MODEL)  # promoted, rolled back to or started from meanwhile
        for part in item["delete"]:
            keys = channel.store.list(f"{run_id}/{part}")
            for key in sorted(keys, key=lambda k: (k.rsplit("/", 1)[-1] not in FIRST, k)):
                channel.store.delete(key)
        done = sorted(set(by_id[run_id].get("pruned", [])) | set(item["delete"]))
        channel.record_run(run_id, {**by_id[run_id], "pruned": done})


def protected_models(store, keep: int) -> set[str] | None:
    """Runs whose model some channel on this output holds, could roll back to, or is starting from; None if unknown."""
    names: set[str] = set()
    for name in channel_names(store):
        channel = Channel(store, name)
        try:
            current = channel.read()
            if current is not None:
                names.add(current.pointer["run_id"])
            for seq in channel.history_seqs()[-keep:]:
                entry = channel.history_entry(seq) or {}
                names |= {entry[k] for k in ("run_id", "previous", "rollback_to") if entry.get(k)}
        except CorruptPointer as exc:
            log.warning("a channel on this output cannot be read: no model is deleted tonight",
                        extra={"event": "retention_models_kept", "channel": name, "reason": str(exc)[:200]})
            return None
        # a warm-started run's start model and a distilled run's pinned teacher, while that run is in flight
        needed = [*channel.starts().items(), *channel.students().items()]  # one run may be both
        names |= {model for run_id, model in needed if in_flight(store, run_id)}
    return names


def in_flight(store, run_id: str) -> bool:
    """No ``COMPLETE`` yet, or a lease: a process may be working on the run, whatever its old records say."""
    try:
        store.size(f"{run_id}/COMPLETE")
    except NotFound:
        return True
    try:
        store.size(f"{run_id}/{LEASE}")
    except NotFound:
        return False
    return True
