"""After a run is published: gate it against the channel's holder and move the pointer if it passes.

The loop, bounded by ``job.channels.channel.MAX_TRIES``:

1. read the pointer and its ETag (and write the history entry of that version if a killed mover
   left it out);
2. score candidate and holder per question on the same eval examples: the holder's published
   predictions when its eval fingerprint equals this run's, else the holder's model re-scored on
   this run's eval set;
3. decide (``job.channels.gate``) and write the decision with every number to ``<run>/promotion.json``
   and the channel's run record, *before* acting;
4. unless rejected or the channel is held: check this process still holds the run lease, then
   swap the pointer with a conditional write against the ETag of step 1; on a lost race, go back
   to 1 and gate again against the new holder (its scores are computed once);
5. write the new version's history entry, log one ``promotion`` event, prune old runs.

A rerun of a complete run converges: a decision recorded for this channel as rejected stands, and
one recorded as held stands while the channel is still held; a recorded promotion that reached
the pointer (now or in the history) is done; any other is made again. Decisions are per channel:
a rerun of the same run for another channel is gated for that channel.
"""
from __future__ import annotations

import logging

from job import safe_json
from job.channels import gate
from job.channels.channel import MAX_TRIES, ChannelBusy, open_channel
from job.channels.nightly import DECISION
from job.channels.pointer import next_version, now, published_run
from job.data import load_split
from job.errors import DataError
from job.observe.redaction import artifact_json
from job.publish import pinned_data, run_record
from job.rows import SCORED, each
from job.squad.metrics import per_example_scores
from job.store.storage import NotFound, PreconditionFailed, RetryPolicy

log = logging.getLogger(__name__)


def promote(ctx) -> None:
    settings = ctx.settings
    channel = open_channel(settings)
    if _settled(ctx, channel, _earlier_decision(ctx, channel)):
        _prune(ctx, channel)
        return
    # read as a candidate only now: a settled run may have lost its model to retention since (a rerun long after)
    candidate = published_run(channel.store, settings.run_id)
    rows = _eval_rows(settings, ctx.store)
    mine = per_example_scores(each(rows, SCORED), _predictions(ctx.store, "predictions.json", settings.run_id), settings.squad_v2)
    policy = gate.GatePolicy(settings.gate_metric, settings.gate_min, settings.gate_max_drop)
    holders: dict[str, tuple[dict, str]] = {}  # holder run id -> (per-question scores, how they were obtained)
    for attempt in range(1, MAX_TRIES + 1):
        current = channel.read()
        if current is not None:
            channel.ensure_history(current)
        holder = current.pointer if current else None
        if holder is not None and holder["run_id"] == settings.run_id:
            _event(settings, "promote", "this run already holds the channel", {}, holder, recorded_earlier=True)
            break
        if holder is not None and holder["run_id"] not in holders:
            holders[holder["run_id"]] = _holder_scores(ctx, channel, holder, candidate, rows)
        scores, how = holders[holder["run_id"]] if holder else (None, None)
        verdict = gate.decide(mine, scores, policy)
        held = bool(holder and holder.get("held"))
        decision = "hold" if verdict["promote"] and held else ("promote" if verdict["promote"] else "reject")
        pointer = next_version(holder, channel.name, candidate, "nightly", "promote", verdict["message"],
                               seq=channel.next_seq(holder),
                               gate={k: verdict[k] for k in ("metric", "candidate", "holder", "mean_difference", "interval")})
        record = {"run_id": settings.run_id, "channel": channel.name, "decided_at": now(), "attempt": attempt,
                  "decision": decision, "reason": "held" if decision == "hold" else verdict["reason"],
                  "message": verdict["message"] + ("; the channel is held: not moved" if decision == "hold" else ""),
                  "gate": verdict, "seq": pointer["seq"],
                  "holder": {"run_id": holder["run_id"], "seq": holder["seq"], "scored_from": how} if holder else None,
                  "candidate": {k: candidate[k] for k in ("fingerprint", "recipe", "eval_fingerprint", "warm_starts")}}
        write_decision(ctx, channel, record)
        if decision != "promote":
            _event(settings, decision, record["message"], verdict, holder)
            break
        ctx.lease.verify()  # a process that lost its run lease must not move a channel
        try:
            version = channel.swap(pointer, current)
        except PreconditionFailed:
            log.warning("the channel moved while this run was gated; gating again", extra={
                "event": "promotion_conflict", "channel": channel.name, "attempt": attempt})
            continue
        channel.record_history(version)
        _event(settings, decision, record["message"], verdict, holder, pointer_moved=True, seq=pointer["seq"])
        break
    else:
        raise ChannelBusy(f"channel {channel.name!r} changed {MAX_TRIES} times while run {settings.run_id} was gated; "
                          "rerun the same run id to gate it again")
    _prune(ctx, channel)


def write_decision(ctx, channel, record: dict) -> None:
    """The decision, before it is acted on: in the run folder, and in the channel's record of runs."""
    ctx.store.put_bytes(DECISION, artifact_json(record, indent=1))
    summary = {k: record[k] for k in ("run_id", "channel", "decided_at", "decision", "reason", "message", "seq")}
    channel.record_run(record["run_id"], {**summary, **record["candidate"], "metric": record["gate"]["candidate"]})


def _earlier_decision(ctx, channel) -> dict | None:
    """This run's decision for *this* channel: ``promotion.json`` if it is about this channel, else the
    channel's own record of the run (``promotion.json`` holds the latest decision, maybe another channel's)."""
    earlier = _read_json(ctx.store, DECISION)
    if isinstance(earlier, dict) and earlier.get("channel") == channel.name:
        return earlier
    return channel.run_record(ctx.settings.run_id)


def _settled(ctx, channel, earlier: dict | None) -> bool:
    """Whether a decision recorded by an earlier attempt of this run, for this channel, stands (nothing left to do)."""
    if not isinstance(earlier, dict) or earlier.get("decision") not in ("promote", "reject", "hold"):
        return False
    settings = ctx.settings
    current = channel.read()
    if earlier["decision"] == "hold" and not (current and current.pointer.get("held")):
        return False  # held back only by a hold that is gone: gate it again
    if earlier["decision"] in ("reject", "hold"):
        _event(settings, earlier["decision"], f"recorded earlier: {earlier.get('message', '')}", {}, None, recorded_earlier=True)
        return True
    if current is not None and current.pointer["run_id"] == settings.run_id:
        channel.ensure_history(current)  # the pointer moved but its history entry may not have been written
    elif not (isinstance(earlier.get("seq"), int) and (channel.history_entry(earlier["seq"]) or {}).get("run_id") == settings.run_id):
        return False  # decided, but the pointer never moved: decide again
    _event(settings, "promote", "this run's promotion was carried out earlier", {}, None, recorded_earlier=True)
    return True


def _holder_scores(ctx, channel, holder: dict, candidate: dict, rows) -> tuple[dict, str]:
    settings = ctx.settings
    if holder.get("eval_fingerprint") == candidate["eval_fingerprint"]:
        try:
            published = _predictions(channel.store, f"{holder['run_id']}/predictions.json", holder["run_id"])
            return per_example_scores(each(rows, SCORED), published, settings.squad_v2), "published predictions"
        except DataError as exc:
            log.warning("holder predictions unusable; re-scoring its model", extra={"event": "holder_predictions_unusable",
                                                                                  "reason": str(exc)[:200]})
    from job.channels.holder import predictions

    rescored = predictions(settings, holder["run_id"], rows, stop=ctx.stop, local_rank=ctx.ranks.local_rank)
    return per_example_scores(each(rows, SCORED), rescored, settings.squad_v2), "re-scored on this run's eval set"


def _eval_rows(settings, store):
    """This run's eval rows (an Arrow table), loaded again from the files it pinned, and checked to be
    the ones its predictions were made on."""
    record = run_record(store)
    split = load_split("eval", settings, RetryPolicy(settings.storage_attempts, settings.storage_backoff_seconds,
                                                     settings.storage_timeout_seconds), pinned_data(record))
    scored_on = (record.get("inputs") or {}).get("eval_sha256") if isinstance(record.get("inputs"), dict) else None
    if scored_on != split.sha256:
        raise DataError(f"QA_EVAL_URI={settings.eval_uri or settings.dataset}: the eval data changed since run "
                        f"{settings.run_id} was scored, so it cannot be gated on it; it stays published, unpromoted "
                        "(promote it by hand with python -m job.channel, or let the next night gate a new run)")
    return split.rows


def _predictions(store, key: str, run_id: str) -> dict[str, str]:
    try:
        value = safe_json.loads(store.get_bytes(key)[0])
    except NotFound:
        raise DataError(f"run {run_id}: {key} is missing") from None
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"run {run_id}: {key} is not JSON") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise DataError(f"run {run_id}: {key} is not an {{id: answer}} object")
    return value


def _read_json(store, key: str):
    try:
        return safe_json.loads(store.get_bytes(key)[0])
    except (NotFound, ValueError, UnicodeDecodeError):
        return None


def _event(settings, decision: str, message: str, verdict: dict, holder: dict | None, pointer_moved: bool = False,
           **extra) -> None:
    """One ``promotion`` event per night: the decision (as in promotion.json), whether the pointer moved, the numbers."""
    numbers = {k: verdict.get(k) for k in ("metric", "candidate", "holder", "mean_difference", "interval", "reason") if k in verdict}
    log.info(message, extra={"event": "promotion", "channel": settings.channel, "run_id": settings.run_id,
                             "decision": decision, "pointer_moved": pointer_moved,
                             "holder_run_id": holder["run_id"] if holder else None, **numbers, **extra})


def _prune(ctx, channel) -> None:
    from job.channels.retention import prune

    prune(ctx, channel)
