"""After a night: old runs of the channel give back their bulky files, and keep their records.

``QA_KEEP_RUNS`` newest runs gated for the channel are kept whole. Older ones lose their
checkpoints and feature caches, and their model too unless it is protected: the current holder's,
and that of every run named (as holder, previous holder or rollback target) by the last
``QA_KEEP_RUNS`` history entries, so a rollback always finds its model. Their small records stay
(``metrics.json``, ``predictions.json``, ``manifest.json``, ``run.json``, ``promotion.json``,
``COMPLETE``). Runs that never reached a decision (still running, crashed) are never touched.

The plan is written to ``<run>/retention.json`` and logged (``retention`` event) before anything
is deleted. Inside each folder the marker that makes it count goes first (a checkpoint's
``COMMIT.json``, a cache's ``features.json``, a model's ``config.json``), so a deletion cut short
never leaves something that looks whole. What was pruned is noted in the channel's run record, so
later nights do not list those folders again.
"""
from __future__ import annotations

import json
import logging

from job.channels.pointer import now

log = logging.getLogger(__name__)
BULKY = ("checkpoints/", "cache/")
MODEL = "model/"
FIRST = ("COMMIT.json", "features.json", "config.json")  # markers deleted before the files they vouch for


def prune(ctx, channel) -> None:
    keep = ctx.settings.keep_runs
    records = channel.gated_runs()
    older = [r for r in records[:-keep] if MODEL not in r.get("pruned", [])]
    if not older:
        return
    protected = _protected(channel, keep)
    plan = []
    for record in older:
        parts = [p for p in (*BULKY, MODEL) if p not in record.get("pruned", []) and (p != MODEL or record["run_id"] not in protected)]
        if parts:
            plan.append({"run_id": record["run_id"], "delete": parts})
    if not plan:
        return
    decision = {"decided_at": now(), "keep_runs": keep, "kept": [r["run_id"] for r in records[-keep:]],
                "protected_models": sorted(protected), "prune": plan}
    ctx.store.put_bytes("retention.json", json.dumps(decision, indent=1).encode())
    log.info("pruning old runs of the channel", extra={"event": "retention", "channel": channel.name, **decision})
    ctx.lease.verify()
    by_id = {r["run_id"]: r for r in older}
    for item in plan:
        run_id = item["run_id"]
        if MODEL in item["delete"] and run_id in _protected(channel, keep):
            item["delete"].remove(MODEL)  # promoted or rolled back to meanwhile
        for part in item["delete"]:
            keys = channel.store.list(f"{run_id}/{part}")
            for key in sorted(keys, key=lambda k: (k.rsplit("/", 1)[-1] not in FIRST, k)):
                channel.store.delete(key)
        done = sorted(set(by_id[run_id].get("pruned", [])) | set(item["delete"]))
        channel.record_run(run_id, {**by_id[run_id], "pruned": done})


def _protected(channel, keep: int) -> set[str]:
    current = channel.read()
    names = {current.pointer["run_id"]} if current else set()
    for seq in channel.history_seqs()[-keep:]:
        entry = channel.history_entry(seq) or {}
        names |= {entry.get(k) for k in ("run_id", "previous", "rollback_to") if entry.get(k)}
    return names
