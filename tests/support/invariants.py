"""The soak's invariants over storage: small pure functions over snapshots of a job's output.

The checks read a ``tests.support.snapshot.Snapshot`` and nothing else: no log, no knowledge of
what the soak did, so what they accept is what any reader of the bucket can rely on. Each returns
the problems it found as strings (empty: holds). Checks of one snapshot take ``(cur, policy)``;
checks of what may never change take ``(prev, cur, policy)``: applied after every step, a change
at any step is caught at that step. The checks of processes and of what a step did are in
``tests.support.outcomes``.

Each invariant is unit-tested on hand-made snapshots that break it (tests/test_soak.py): a check
that cannot fail proves nothing.
"""
from __future__ import annotations

from typing import Callable

from tests.support.snapshot import CHECKPOINT_MARKER, HISTORY, MODEL_FILES, RECORDS, RUN_ID, Policy, Snapshot

__all__ = ["check_storage", "model_hash_problems", "needed_models", "pointer_problem", "SNAPSHOT_CHECKS", "CHANGE_CHECKS"]


# ---------------------------------------------------------------------------------------------- channels
def pointer_problem(p, channel: str) -> str:
    """The pointer's shape as the README describes it, checked independently of the job's own parser."""
    if not isinstance(p, dict):
        return "not a JSON object"
    if p.get("channel") != channel:
        return f"names channel {p.get('channel')!r}"
    if not isinstance(p.get("seq"), int) or isinstance(p.get("seq"), bool) or p["seq"] < 1:
        return f"seq {p.get('seq')!r} is not a positive integer"
    if not isinstance(p.get("run_id"), str) or not RUN_ID.fullmatch(p["run_id"]):
        return f"run_id {p.get('run_id')!r} is not a run id"
    for key in ("previous", "rollback_to"):
        if p.get(key) is not None and not (isinstance(p[key], str) and RUN_ID.fullmatch(p[key])):
            return f"{key} {p.get(key)!r} is not a run id"
    if p.get("promoted_by") not in ("nightly", "manual") or p.get("action") not in ("promote", "rollback", "hold", "release"):
        return "promoted_by or action is not one the job writes"
    if not isinstance(p.get("metrics"), dict) or not isinstance(p.get("model_uri"), str):
        return "metrics or model_uri missing"
    if p.get("held") is not None and not isinstance(p["held"], dict):
        return "held is neither null nor an object"
    return ""


def pointers_name_complete_runs(cur: Snapshot, policy: Policy) -> list[str]:
    """Every channel pointer parses and names a complete run whose model is whole and matches its manifest."""
    out = []
    for channel in cur.channels():
        pointer = cur.json(f"channels/{channel}.json")
        problem = pointer_problem(pointer, channel)
        if problem:
            out.append(f"channel {channel}: pointer {problem}")
            continue
        run = pointer["run_id"]
        if not cur.complete(run):
            out.append(f"channel {channel}: pointer seq {pointer['seq']} names run {run}, which has no COMPLETE")
        elif not cur.model_whole(run):
            missing = [n for n in MODEL_FILES if not cur.has(f"{run}/model/{n}")]
            out.append(f"channel {channel}: pointer seq {pointer['seq']} names run {run}, whose model lacks {missing}")
        else:
            out.extend(f"channel {channel}: pointer seq {pointer['seq']} names run {run}, {p}" for p in model_hash_problems(cur, run))
        if not pointer["model_uri"].endswith(f"/{run}/model"):
            out.append(f"channel {channel}: model_uri {pointer['model_uri']!r} is not run {run}'s model")
    return out


def model_hash_problems(cur: Snapshot, run: str) -> list[str]:
    """The model files a run's ``manifest.json`` lists (``serving_files``: per runtime, name and sha256) are
    there, byte for byte; the torch weights are always listed."""
    manifest = cur.json(f"{run}/manifest.json")
    listed = manifest.get("serving_files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not listed.get("torch"):
        return ["whose manifest.json lists no model files with their sha256"]
    out = []
    for runtime, files in sorted(listed.items()):
        for f in files if isinstance(files, list) else [None]:
            name = f.get("name") if isinstance(f, dict) else None
            obj = cur.objects.get(f"{run}/{name}") if isinstance(name, str) else None
            if obj is None:
                out.append(f"whose manifest lists a {runtime} file {name!r} that is not there")
            elif obj.sha256 != f.get("sha256"):
                out.append(f"whose {name} does not match the sha256 its manifest records")
    return out


def history_sequential(cur: Snapshot, policy: Policy) -> list[str]:
    """History entries are 1..N without gaps, parse, are named by their seq, chain one to the next, and the
    pointer is entry N (byte for byte) or N+1 (its entry not written yet: a mover killed in between)."""
    out = []
    for channel in cur.channels():
        entries = cur.history(channel)
        pointer = cur.json(f"channels/{channel}.json")
        for seq, entry in sorted(entries.items()):
            problem = pointer_problem(entry, channel)
            if problem:
                out.append(f"channel {channel}: history entry {seq} {problem}")
            elif entry["seq"] != seq:
                out.append(f"channel {channel}: history/{seq}.json holds seq {entry['seq']}")
        if sorted(entries) != list(range(1, len(entries) + 1)):
            out.append(f"channel {channel}: history seqs {sorted(entries)} are not 1..{len(entries)}")
        for seq in sorted(entries)[1:]:
            before, entry = entries.get(seq - 1), entries[seq]
            if isinstance(before, dict) and isinstance(entry, dict) and not pointer_problem(entry, channel):
                problem = _chain_problem(before, entry)
                if problem:
                    out.append(f"channel {channel}: history entry {seq} ({entry['action']}) {problem}")
        if isinstance(pointer, dict) and isinstance(pointer.get("seq"), int) and entries:
            top = max(entries)
            if pointer["seq"] == top:
                if cur.objects[f"channels/{channel}.json"].sha256 != cur.objects[f"channels/{channel}/history/{top}.json"].sha256:
                    out.append(f"channel {channel}: the pointer (seq {top}) differs from history entry {top}")
            elif pointer["seq"] != top + 1:
                out.append(f"channel {channel}: pointer seq {pointer['seq']} but the history ends at {top}")
            elif isinstance(entries[top], dict) and not pointer_problem(pointer, channel):
                problem = _chain_problem(entries[top], pointer)
                if problem:
                    out.append(f"channel {channel}: the pointer (seq {pointer['seq']}, {pointer['action']}) {problem}")
        elif isinstance(pointer, dict) and pointer.get("seq") not in (1, None) and not entries:
            out.append(f"channel {channel}: pointer seq {pointer['seq']} but no history")
    return out


def _chain_problem(before: dict, entry: dict) -> str:
    """How version ``entry`` follows ``before``: a move names the holder it replaced; a hold or release keeps it."""
    if entry["action"] in ("hold", "release"):
        if entry["run_id"] != before["run_id"]:
            return f"changed the holder from {before['run_id']} to {entry['run_id']}"
        if bool(entry.get("held")) != (entry["action"] == "hold"):
            return f"says held={entry.get('held')!r}"
        return ""
    if entry.get("previous") != before["run_id"]:
        return f"names previous {entry.get('previous')!r}, but the holder before it was {before['run_id']}"
    if entry["action"] == "promote" and entry.get("rollback_to") != before["run_id"]:
        return f"names rollback_to {entry.get('rollback_to')!r} instead of {before['run_id']}"
    if bool(entry.get("held")) != bool(before.get("held")):
        return "changed whether the channel is held"
    return ""


def history_never_rewritten(prev: Snapshot | None, cur: Snapshot, policy: Policy) -> list[str]:
    """A history entry, once written, stays byte for byte (never changed, never deleted)."""
    if prev is None:
        return []
    out = []
    for key, obj in prev.objects.items():
        if HISTORY.fullmatch(key):
            now = cur.objects.get(key)
            if now is None:
                out.append(f"{key} was deleted")
            elif now.sha256 != obj.sha256:
                out.append(f"{key} was rewritten")
    return out


def promotions_passed_gate(cur: Snapshot, policy: Policy) -> list[str]:
    """Every nightly promotion in a channel's history carries gate numbers that pass the channel's rule."""
    out = []
    for channel in cur.channels():
        if channel not in policy.gates:
            continue
        metric, floor, max_drop = policy.gates[channel]
        versions = dict(cur.history(channel))
        pointer = cur.json(f"channels/{channel}.json")
        if isinstance(pointer, dict) and isinstance(pointer.get("seq"), int):
            versions.setdefault(pointer["seq"], pointer)
        for seq, entry in sorted(versions.items()):
            if not isinstance(entry, dict) or entry.get("promoted_by") != "nightly" or entry.get("action") != "promote":
                continue
            if entry["seq"] != seq:
                continue  # reported by history_sequential
            gate = entry.get("gate")
            if not isinstance(gate, dict) or gate.get("metric") != metric or not isinstance(gate.get("candidate"), (int, float)):
                out.append(f"channel {channel}: nightly promotion seq {seq} (run {entry.get('run_id')}) records no {metric} gate")
                continue
            if gate["candidate"] < floor:
                out.append(f"channel {channel}: seq {seq} promoted run {entry['run_id']} with {metric} {gate['candidate']} "
                           f"below the floor {floor}")
            holder, interval = gate.get("holder"), gate.get("interval")
            if entry.get("previous") is None:
                continue  # the first model: the floor alone decides
            if holder is None or not (isinstance(interval, list) and len(interval) == 2):
                out.append(f"channel {channel}: seq {seq} promoted run {entry['run_id']} over {entry.get('previous')} "
                           "without comparing them")
            elif interval[0] < -max_drop:
                out.append(f"channel {channel}: seq {seq} promoted run {entry['run_id']} with interval {interval}, "
                           f"whose low end is below -{max_drop}")
            own = (entry.get("metrics") or {}).get(metric)
            if isinstance(own, (int, float)) and abs(own - gate["candidate"]) > 1e-3:
                out.append(f"channel {channel}: seq {seq} gated run {entry['run_id']} at {metric} {gate['candidate']}, "
                           f"but its metrics say {own}")
    return out


# ---------------------------------------------------------------------------------------------- models
def needed_models(snap: Snapshot, keep_runs: int) -> dict[str, str]:
    """``{run: why}`` for every run whose model some channel needs (README "Retention"): the holder of
    every channel, every run named by a channel's last ``keep_runs`` history entries (holder, previous,
    rollback target), and what an incomplete run starts from or learns from (a warm start's start
    record, a distilled run's pinned teacher run)."""
    out: dict[str, str] = {}
    for channel in snap.channels():
        pointer = snap.json(f"channels/{channel}.json")
        if isinstance(pointer, dict) and isinstance(pointer.get("run_id"), str):
            out.setdefault(pointer["run_id"], f"{channel}'s holder")
            if isinstance(pointer.get("rollback_to"), str):
                out.setdefault(pointer["rollback_to"], f"{channel}'s rollback target")
        entries = snap.history(channel)
        for seq in sorted(entries)[-keep_runs:]:
            entry = entries[seq]
            if isinstance(entry, dict):
                for key in ("run_id", "previous", "rollback_to"):
                    if isinstance(entry.get(key), str):
                        out.setdefault(entry[key], f"named by {channel}'s history entry {seq} ({key})")
        for key in snap.under(f"channels/{channel}/starts/"):
            run = key.removesuffix(".json")
            record = snap.json(f"channels/{channel}/starts/{key}")
            if _in_flight(snap, run) and isinstance(record, dict) and isinstance(record.get("from_run"), str):
                out.setdefault(record["from_run"], f"start model of {run}, not complete yet")
    for run in snap.runs():
        record = snap.json(f"{run}/run.json")
        if _in_flight(snap, run) and isinstance(record, dict) and isinstance(record.get("teacher_run"), str):
            out.setdefault(record["teacher_run"], f"teacher pinned by {run}, not complete yet")
    return out


def _in_flight(snap: Snapshot, run: str) -> bool:
    return not snap.complete(run) or snap.has(f"{run}/lease.json")


def needed_models_kept(prev: Snapshot | None, cur: Snapshot, policy: Policy) -> list[str]:
    """No model a channel serves, may roll back to, or a run in flight starts or learns from is deleted."""
    if prev is None:
        return []
    return [f"run {run}'s model was deleted, yet it is the {why}"
            for run, why in sorted(needed_models(cur, policy.keep_runs).items())
            if prev.complete(run) and prev.model_whole(run) and not cur.model_whole(run)]


def published_runs_unchanged(prev: Snapshot | None, cur: Snapshot, policy: Policy) -> list[str]:
    """A complete run's published files never change (the model's sha256 stays as first recorded); retention
    may delete its model and bulky folders, never its records."""
    if prev is None:
        return []
    out = []
    for run in sorted(prev.runs()):
        if not prev.complete(run):
            continue
        if not cur.complete(run):
            out.append(f"run {run} lost its COMPLETE marker")
            continue
        for name in ("COMPLETE", *RECORDS):
            key = f"{run}/{name}"
            if prev.has(key) and not cur.has(key):
                out.append(f"run {run}: {name} was deleted")
        for key, obj in prev.under(f"{run}/").items():
            if key.startswith(("model/", "COMPLETE", "metrics.json", "predictions.json", "manifest.json", "run.json")):
                now = cur.objects.get(f"{run}/{key}")
                if now is not None and now.sha256 != obj.sha256:
                    out.append(f"run {run}: {key} changed after the run was complete")
    return out


# ---------------------------------------------------------------------------------------------- run folders
def run_folders_sound(cur: Snapshot, policy: Policy) -> list[str]:
    """Every run folder is complete (its records there, its model whole or pruned whole-marker-first), or
    resumable (a run record that parses; every committed checkpoint intact), or merely claimed."""
    out = []
    for run in sorted(cur.runs()):
        files = cur.under(f"{run}/")
        if cur.complete(run):
            missing = [n for n in RECORDS if n not in files]
            if missing:
                out.append(f"run {run} is complete without {missing}")
            model = [k for k in files if k.startswith("model/")]
            if model and "model/config.json" in files and "model/model.safetensors" not in files:
                out.append(f"run {run}: model/config.json is there without model.safetensors (looks whole, is not)")
        record = cur.json(f"{run}/run.json")
        if "run.json" in files and not (isinstance(record, dict) and isinstance(record.get("fingerprint"), str)
                                        and record.get("run_id") == run):
            out.append(f"run {run}: run.json is not a run record of this run")
        steps = sorted(int(m.group(1)) for k in files if (m := CHECKPOINT_MARKER.fullmatch(k)))
        if steps and "run.json" not in files:
            out.append(f"run {run} has committed checkpoints {steps} but no run.json")
        for step in steps:
            out.extend(_checkpoint_problems(cur, run, step))
        lease = cur.json(f"{run}/lease.json")
        if "lease.json" in files and not (isinstance(lease, dict) and isinstance(lease.get("holder"), str)):
            out.append(f"run {run}: lease.json is not a lease")
    return out


def _checkpoint_problems(cur: Snapshot, run: str, step: int) -> list[str]:
    base = f"{run}/checkpoints/checkpoint-{step}/"
    marker = cur.json(base + "COMMIT.json")
    if not isinstance(marker, dict) or marker.get("step") != step or not isinstance(marker.get("files"), dict):
        return [f"run {run}: checkpoint-{step}/COMMIT.json is not a commit marker of step {step}"]
    out = []
    for name, meta in marker["files"].items():
        obj = cur.objects.get(base + name)
        if obj is None:
            out.append(f"run {run}: committed checkpoint-{step} lacks {name}")
        elif not isinstance(meta, dict) or obj.size != meta.get("size") or obj.sha256 != meta.get("sha256"):
            out.append(f"run {run}: committed checkpoint-{step}/{name} does not match its marker")
    if "trainer_state.json" not in marker["files"]:
        out.append(f"run {run}: committed checkpoint-{step} lists no trainer_state.json")
    return out


def checkpoint_progress_kept(prev: Snapshot | None, cur: Snapshot, policy: Policy) -> list[str]:
    """An incomplete run never loses its newest committed checkpoint without a newer one (progress kept)."""
    if prev is None:
        return []
    out = []
    for run in sorted(prev.runs()):
        before = [int(m.group(1)) for k in prev.under(f"{run}/") if (m := CHECKPOINT_MARKER.fullmatch(k))]
        if not before or cur.complete(run) or prev.complete(run):
            continue
        after = [int(m.group(1)) for k in cur.under(f"{run}/") if (m := CHECKPOINT_MARKER.fullmatch(k))]
        if max(after, default=-1) < max(before):
            out.append(f"run {run}: newest committed checkpoint went from {max(before)} to {max(after, default=None)}")
    return out


def no_secret_in_objects(cur: Snapshot, policy: Policy) -> list[str]:
    return [f"{key} contains the value of {', '.join(obj.secrets)}" for key, obj in sorted(cur.objects.items()) if obj.secrets]


SNAPSHOT_CHECKS: dict[str, Callable] = {
    "pointers_name_complete_runs": pointers_name_complete_runs,
    "history_sequential": history_sequential,
    "promotions_passed_gate": promotions_passed_gate,
    "run_folders_sound": run_folders_sound,
    "no_secret_in_objects": no_secret_in_objects,
}
CHANGE_CHECKS: dict[str, Callable] = {
    "history_never_rewritten": history_never_rewritten,
    "needed_models_kept": needed_models_kept,
    "published_runs_unchanged": published_runs_unchanged,
    "checkpoint_progress_kept": checkpoint_progress_kept,
}


def check_storage(prev: Snapshot | None, cur: Snapshot, policy: Policy) -> list[tuple[str, str]]:
    """``[(invariant, problem)]`` over one step: every snapshot check on ``cur``, every change check on the pair."""
    found = [(name, p) for name, check in SNAPSHOT_CHECKS.items() for p in check(cur, policy)]
    return found + [(name, p) for name, check in CHANGE_CHECKS.items() for p in check(prev, cur, policy)]
