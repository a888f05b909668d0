"""Before anything is tokenized, with a channel set: is there anything new to learn tonight, and from what?

Skip-if-unchanged: tonight's recipe (the training and eval data's sha256, the base model, every
training setting, the job's version: ``job.store.fingerprint.recipe``) is compared with the holder's and
with every earlier complete run gated for the channel. A match ends the night at once: the
decision goes to ``<run>/promotion.json`` and an ``unchanged`` event, and nothing is trained.

Warm start (``QA_INIT_FROM=channel``): the weights start from the current holder's model, with a
fresh optimizer and schedule (not a checkpoint resume). The pointer counts the warm starts in a
row that led to its model; once that reaches ``QA_WARM_START_LIMIT`` the night starts from the base
model again, so small drifts cannot pile up forever. What a run starts from is decided on its
first attempt and kept in its ``run.json``: a retried pod resumes its checkpoints from the same
starting point even if the pointer moved meanwhile.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from job.channels.channel import Channel, open_channel
from job.channels.pointer import now
from job.errors import ConfigError
from job.observe.redaction import artifact_json
from job.publish import run_record
from job.store.fingerprint import BASE_INIT, recipe, training_inputs
from job.store.storage import NotFound

log = logging.getLogger(__name__)
DECISION = "promotion.json"  # the night's decision, in the run folder (also written by job.channels.promotion)


@dataclass(frozen=True)
class Night:
    init: dict  # what the weights start from; part of the run's fingerprint
    unchanged: bool = False


def plan(ctx, train_split, eval_split, base_model: str | None = None, teacher: str | None = None) -> Night:
    """``base_model``: ``QA_MODEL_NAME`` by content (``job.store.models.model_identity``), part of the recipe;
    ``teacher`` too (the distillation teacher by content, or None)."""
    settings = ctx.settings
    if not settings.channel:
        return Night(dict(BASE_INIT))
    channel = open_channel(settings)
    current = channel.read()
    holder = current.pointer if current else None
    recorded = _recorded_init(ctx.store)
    if recorded is not None:
        init, why = recorded, "kept from this run's first attempt"
    else:
        init, why = choose_init(settings, holder)
    log.info("weights start from", extra={"event": "init", "reason": why, **init})
    if recorded is None and settings.skip_unchanged:
        tonight = recipe(training_inputs(settings, train_split.sha256, eval_split.sha256, init, base_model, teacher))
        same = same_recipe(channel, holder, tonight, settings.run_id)
        if same is not None:
            same, decided = same
            message = f"the data, settings and code equal those of run {same}: nothing new to learn"
            if decided == "hold":
                message += (f" while the channel is held (run {same} was held, not rejected: once the channel is "
                            "released, the next night with this data trains and is gated again)")
            record = {"run_id": settings.run_id, "channel": settings.channel, "decided_at": now(), "decision": "unchanged",
                      "reason": "unchanged", "same_as": same, "same_as_decision": decided, "recipe": tonight,
                      "message": message, "train_sha256": train_split.sha256, "eval_sha256": eval_split.sha256}
            if ctx.ranks.is_writer:
                ctx.store.put_bytes(DECISION, artifact_json(record, indent=1))
            log.info(message, extra={"event": "unchanged", "channel": settings.channel, "same_as": same,
                                     "same_as_decision": decided, "recipe": tonight})
            return Night(init, unchanged=True)
    if init.get("from") == "channel" and ctx.ranks.is_writer:
        channel.record_start(settings.run_id, init["run_id"])  # its model is kept until this run is gated
    return Night(init)


def choose_init(settings, holder: dict | None) -> tuple[dict, str]:
    """``(init, why)``: the base model, or the holder's weights under QA_INIT_FROM=channel."""
    if settings.init_from != "channel":
        return dict(BASE_INIT), "QA_INIT_FROM=base"
    if holder is None:
        return dict(BASE_INIT), "the channel has no holder yet"
    if holder["warm_starts"] >= settings.warm_start_limit:
        return dict(BASE_INIT), (f"the holder is {holder['warm_starts']} warm starts from the base "
                                 f"(QA_WARM_START_LIMIT={settings.warm_start_limit})")
    return {"from": "channel", "channel": settings.channel, "run_id": holder["run_id"], "fingerprint": holder["fingerprint"],
            "warm_starts": holder["warm_starts"] + 1}, "QA_INIT_FROM=channel"


def same_recipe(channel: Channel, holder: dict | None, tonight: str, run_id: str) -> tuple[str, str] | None:
    """``(run id, its decision)`` of the holder, or of an earlier complete run of the channel, with tonight's recipe.

    A run that was only held back by a hold on the channel was never judged: once the hold is
    gone it no longer counts as tried, and the night trains and is gated.
    """
    if holder is not None and holder.get("recipe") == tonight and holder["run_id"] != run_id:
        return holder["run_id"], "holder"
    held = bool(holder and holder.get("held"))
    for record in reversed(channel.gated_runs()):
        if record.get("recipe") == tonight and record["run_id"] != run_id and (held or record.get("decision") != "hold"):
            try:
                channel.store.get_bytes(f"{record['run_id']}/COMPLETE")
                return record["run_id"], str(record.get("decision"))
            except NotFound:
                continue  # deleted by hand: it no longer counts
    return None


def init_model(settings, night: Night, local_rank: int = 0, store=None) -> str:
    """What ``load_model`` loads: ``QA_MODEL_NAME``, or a local copy of the model a warm start starts from.

    A warm-started run with a committed checkpoint (a retry) loads the model files of that
    checkpoint: training resumes from its weights anyway, and the holder it started from may
    have been pruned since. Each process of a node downloads its own copy: they share the work
    dir and nothing else.
    """
    if night.init.get("from") != "channel":
        return settings.model_name
    from job.channels.holder import fetch_run_model
    from job.store.checkpoints import fetch_model_files

    dest = Path(settings.work_dir) / settings.run_id / (f"init-model-{local_rank}" if local_rank else "init-model")
    shutil.rmtree(dest, ignore_errors=True)
    if store is not None and fetch_model_files(store, dest):
        return str(dest)
    start = night.init["run_id"]
    try:
        return str(fetch_run_model(settings, start, dest))
    except ConfigError as exc:
        raise ConfigError(f"QA_INIT_FROM=channel: run {settings.run_id} starts from run {start}'s model, which is gone "
                          f"({exc}), and it has no committed checkpoint to resume from; rerun with a new QA_RUN_ID, "
                          "which starts from the channel's holder now") from None


def _recorded_init(store) -> dict | None:
    """The ``init`` an earlier attempt of this run recorded in its run.json, if any."""
    record = run_record(store)
    init = record["inputs"].get("init") if isinstance(record.get("inputs"), dict) else None
    return init if isinstance(init, dict) and init.get("from") in ("base", "channel") else None
