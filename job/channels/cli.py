"""``python -m job.channel {show,history,promote,rollback,hold,release} --output URI --channel NAME``.

The operator's side of a channel, through the same compare-and-swap path as the nightly job:
every move is a new pointer version and a history entry. ``show`` and ``history`` print JSON on
stdout; moves print the new pointer. Storage endpoint and credentials come from the same variables
as the job (``QA_S3_ENDPOINT_URL``, ``QA_S3_REGION``, boto3's chain). Errors are one line on
stderr and an exit code from the README table; nothing moves on an error.
"""
from __future__ import annotations

import argparse
import os

from job.channels.channel import Channel, CorruptPointer, Version
from job.channels.pointer import encode, next_version, now, published_run
from job.errors import EXIT_OK, ConfigError
from job.observe.console import run_command_line
from job.observe.redaction import artifact_json

PROGRAM = "qa-finetune channel"
COMMANDS = ("show", "history", "promote", "rollback", "hold", "release")


def main(argv=None, environ=None) -> int:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="python -m job.channel", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--output", required=True, help="QA_OUTPUT_URI of the runs: a folder or s3://bucket/prefix")
    parser.add_argument("--channel", required=True)
    parser.add_argument("--run", help="promote: the run to put on the channel; rollback: an earlier holder")
    parser.add_argument("--reason", default="", help="why, recorded in the pointer and its history entry")
    parser.add_argument("--repair", action="store_true", help="promote: replace a pointer that is not valid JSON")
    parser.add_argument("--endpoint-url", default=environ.get("QA_S3_ENDPOINT_URL") or None)
    parser.add_argument("--region", default=environ.get("QA_S3_REGION") or None)
    args = parser.parse_args(argv)
    from job.observe.redaction import register_secrets

    register_secrets(environ)
    code, result = run_command_line(PROGRAM, lambda: run_command(args))
    if code != EXIT_OK:
        return code
    print(artifact_json(result, indent=1).decode())
    return EXIT_OK


def run_command(args):
    from job.store.storage import COMMAND_LINE_POLICY, open_storage

    if args.output.startswith("s3://"):
        from job.store.locations import UnsafeName, parse_s3

        try:
            parse_s3(args.output)
        except UnsafeName as exc:
            raise ConfigError(f"--output {args.output[:200]}: {exc}") from None
    root = open_storage(args.output, COMMAND_LINE_POLICY, args.endpoint_url, args.region)
    channel = Channel(root, args.channel)
    reason = " ".join(args.reason.split())[:500]
    if args.command == "show":
        return channel.require().pointer
    if args.command == "history":
        entries = channel.history()
        if not entries and channel.read() is None:
            channel.require()  # unknown channel: the same error as for the other commands
        return entries
    if args.command == "promote":
        if not args.run:
            raise ConfigError("promote needs --run RUN_ID")
        return promote(channel, root, args.run, reason, repair=args.repair)
    if args.command == "rollback":
        return rollback(channel, root, args.run, reason)
    return hold(channel, args.command == "hold", reason)


def promote(channel: Channel, root, run_id: str, reason: str, repair: bool = False) -> dict:
    run = published_run(root, run_id)
    if repair:
        return _repair(channel, run, reason)

    def build(current):
        if current and current["run_id"] == run_id:
            raise ConfigError(f"run {run_id!r} already holds channel {channel.name!r}: nothing was moved")
        return next_version(current, channel.name, run, "manual", "promote", reason or "promoted by hand",
                            seq=channel.next_seq(current))

    return channel.move(build).pointer


def rollback(channel: Channel, root, run_id: str | None, reason: str) -> dict:
    channel.require()

    def build(current):
        if current is None:
            channel.require()
        history = channel.history()
        target = run_id or current.get("rollback_to")
        if not target:
            raise ConfigError(f"channel {channel.name!r} has no earlier holder to roll back to: nothing was moved")
        if target == current["run_id"]:
            raise ConfigError(f"run {target!r} already holds channel {channel.name!r}: nothing was moved")
        # the version that last promoted the target says what a further rollback goes back to
        promoted = [e for e in history if e["run_id"] == target and e["action"] == "promote"]
        if not promoted:
            raise ConfigError(f"run {target!r} never held channel {channel.name!r}; use promote: nothing was moved")
        run = published_run(root, target)
        return next_version(current, channel.name, run, "manual", "rollback", reason or f"rolled back from {current['run_id']}",
                            seq=channel.next_seq(current), rollback_to=promoted[-1]["rollback_to"])

    return channel.move(build).pointer


def hold(channel: Channel, held: bool, reason: str) -> dict:
    channel.require()

    def build(current):
        if current is None:
            channel.require()
        if bool(current.get("held")) == held:
            raise ConfigError(f"channel {channel.name!r} is already {'held' if held else 'not held'}: nothing was moved")
        stamp = now()
        return {**current, "seq": channel.next_seq(current), "changed_at": stamp, "action": "hold" if held else "release",
                "reason": reason or ("held by hand" if held else "released by hand"),
                "held": {"at": stamp, "reason": reason} if held else None}

    return channel.move(build).pointer


def _repair(channel: Channel, run: dict, reason: str) -> dict:
    """Replace a pointer that does not parse: still a conditional write, against the broken object's ETag."""
    from job.store.storage import NotFound, PreconditionFailed

    try:
        raw, etag = channel.store.get_bytes(channel.key)  # the ETag of exactly what is judged corrupted
        channel.parse(raw, channel.where)
    except CorruptPointer:
        pass
    except NotFound:
        raise ConfigError(f"{channel.where} does not exist; promote without --repair: nothing was moved") from None
    else:
        raise ConfigError(f"{channel.where} is not corrupted; --repair only replaces a corrupted pointer: nothing was moved")
    history = channel.history()
    last = history[-1] if history else None
    pointer = next_version(last, channel.name, run, "manual", "promote", reason or "pointer repaired by hand",
                           seq=channel.next_seq(last))
    channel.check_conditional_writes()
    try:
        new_etag = channel.store.put_bytes(channel.key, encode(pointer), if_match=etag)
    except PreconditionFailed:
        raise ConfigError(f"{channel.where} changed while repairing it: nothing was moved; look again") from None
    channel.record_history(Version(pointer, encode(pointer), new_etag))
    return pointer
