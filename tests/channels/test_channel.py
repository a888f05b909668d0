"""Channel pointers in-process: compare-and-swap, history and its repair, the operator's commands, bad input.

The run folders here are written by hand (COMPLETE, metrics, run record, model config): the
pointer logic only reads those records. Storage is real: a local folder and SeaweedFS.
"""
import json
import threading
import uuid

import pytest

from job.channels.channel import Channel, ChannelBusy, ConditionalWritesUnsupported
from job.channels.cli import main, promote
from job.channels.pointer import next_version, published_run
from job.errors import EXIT_CONFIG, EXIT_DATA
from job.store.storage import LocalStorage, PreconditionFailed, RetryPolicy, open_storage
from tests.support.s3_fixtures import s3_env


def fake_run(store, run_id, f1=50.0, complete=True):
    store.put_bytes(f"{run_id}/model/config.json", b"{}")
    store.put_bytes(f"{run_id}/metrics.json", json.dumps({"f1": f1, "exact_match": f1 - 5}).encode())
    inputs = {"train_sha256": f"sha-{run_id}", "eval_sha256": "e", "settings": {}, "init": {"from": "base", "warm_starts": 0}}
    store.put_bytes(f"{run_id}/run.json", json.dumps({"fingerprint": f"fp-{run_id}", "inputs": inputs}).encode())
    if complete:
        store.put_bytes(f"{run_id}/COMPLETE", b"{}")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch):
    if request.param == "local":
        return LocalStorage(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    for k, v in bucket.env.items():
        monkeypatch.setenv(k, v)
    return open_storage(f"s3://{bucket.name}/out", RetryPolicy(attempts=2, backoff_seconds=0.1), bucket.endpoint)


def seqs_and_links(channel):
    history = channel.history()
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
    for before, after in zip(history, history[1:]):
        assert after["previous"] == before["run_id"]
    assert history[-1] == channel.read().pointer  # the last entry is the pointer, byte for byte
    return [e["run_id"] for e in history]


def test_racing_writers_exactly_one_wins(root):
    for run in ("a", "b", "c", "d", "e"):
        fake_run(root, run)
    channel = Channel(root, "production")
    promote(channel, root, "a", "first")
    start, wins, lost = threading.Barrier(4), [], []

    def contender(run_id):
        current = channel.read()
        start.wait()
        try:
            channel.swap(next_version(current.pointer, "production", published_run(root, run_id), "manual", "promote", "", seq=2),
                         current)
            wins.append(run_id)
        except PreconditionFailed:
            lost.append(run_id)

    threads = [threading.Thread(target=contender, args=(r,)) for r in ("b", "c", "d", "e")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(lost) == 3
    assert channel.read().pointer["run_id"] == wins[0] and channel.read().pointer["seq"] == 2


def test_lost_race_is_rebuilt_against_the_new_holder_and_history_stays_complete(root):
    for run in ("a", "b", "c"):
        fake_run(root, run)
    channel = Channel(root, "production")
    promote(channel, root, "a", "")
    builds = []

    def build(current):
        builds.append(current["run_id"])
        return next_version(current, "production", published_run(root, "c"), "manual", "promote", "",
                            seq=channel.next_seq(current))

    def someone_else_moves_first():
        if len(builds) == 1:
            promote(Channel(root, "production"), root, "b", "the other writer")

    version = channel.move(build, before_swap=someone_else_moves_first)
    assert builds == ["a", "b"]  # built again against the pointer as it was after the lost race
    assert version.pointer["seq"] == 3 and version.pointer["previous"] == "b"
    assert seqs_and_links(channel) == ["a", "b", "c"]


def test_a_swap_that_landed_but_whose_reply_was_lost_is_one_move(seaweed, fault_proxy, monkeypatch):
    """The storage layer's retry of a landed swap fails its condition on our own write: one move, not two."""
    bucket, proxy = f"chan-{uuid.uuid4().hex[:10]}", fault_proxy(seaweed)
    seaweed.client().create_bucket(Bucket=bucket)
    for k, v in s3_env(seaweed).items():
        monkeypatch.setenv(k, v)
    store = open_storage(f"s3://{bucket}/out", RetryPolicy(attempts=3, backoff_seconds=0.1), proxy.endpoint)
    for run in ("a", "b"):
        fake_run(store, run)
    channel = Channel(store, "production")
    promote(channel, store, "a", "")
    builds = []

    def build(current):
        builds.append(current["run_id"])
        return next_version(current, "production", published_run(store, "b"), "manual", "promote", "",
                            seq=channel.next_seq(current))

    version = channel.move(build, before_swap=lambda: len(builds) == 1 and proxy.lose_next_replies(1))
    assert proxy.resets_done == 1, "the reply was not lost: the test did not test anything"
    assert builds == ["a"] and version.pointer["seq"] == 2 and version.etag == channel.read().etag
    assert seqs_and_links(channel) == ["a", "b"]


def test_a_history_entry_left_out_by_a_killed_mover_is_written_before_the_next_move(root):
    for run in ("a", "b", "c"):
        fake_run(root, run)
    channel = Channel(root, "production")
    promote(channel, root, "a", "")
    current = channel.read()
    channel.swap(next_version(current.pointer, "production", published_run(root, "b"), "manual", "promote", "", seq=2), current)
    assert channel.history_seqs() == [1]  # killed between the pointer write and its history entry
    promote(channel, root, "c", "")
    assert seqs_and_links(channel) == ["a", "b", "c"]


@pytest.mark.parametrize("by_hand", ["restored from history", "deleted"])
def test_a_new_version_never_shadows_an_existing_history_entry(root, by_hand):
    """After a pointer restored from history (as the corrupt-pointer error advises) or deleted by hand,
    the next seq once reused an existing entry: its history entry was silently not written."""
    for run in ("a", "b", "c", "d"):
        fake_run(root, run)
    channel = Channel(root, "production")
    for run in ("a", "b", "c"):
        promote(channel, root, run, "")
    if by_hand == "deleted":
        root.delete(channel.key)
    else:
        root.put_bytes(channel.key, root.get_bytes(channel._history_key(1))[0])  # back to seq 1, byte for byte
    version = promote(channel, root, "d", "after the repair")
    assert version["seq"] == 4
    assert [(e["seq"], e["run_id"]) for e in channel.history()] == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
    assert channel.history()[-1] == channel.read().pointer


def test_cas_retries_are_bounded(tmp_path):
    root = LocalStorage(tmp_path)
    for run in ("a", "b"):
        fake_run(root, run)
    channel = Channel(root, "production")
    promote(channel, root, "a", "")

    moves = []

    def always_moved_meanwhile():
        moves.append(1)
        current = channel.read()
        channel.store.put_bytes(channel.key, json.dumps({**current.pointer, "reason": f"moved {len(moves)}"}).encode())

    with pytest.raises(ChannelBusy) as info:
        channel.move(lambda cur: next_version(cur, "production", published_run(root, "b"), "manual", "promote", "", seq=2),
                     before_swap=always_moved_meanwhile)
    assert info.value.exit_code == 75 and len(moves) == 5 and channel.read().pointer["run_id"] == "a"


class IgnoresConditions:
    """A store that accepts IfNoneMatch / IfMatch and ignores them, as some S3 look-alikes do."""

    def __init__(self, store):
        self._store, self.uri = store, store.uri

    def __getattr__(self, name):
        return getattr(self._store, name)

    def put_bytes(self, key, data, **conditions):
        return self._store.put_bytes(key, data)


def test_a_store_that_ignores_conditional_writes_is_refused(tmp_path):
    root = IgnoresConditions(LocalStorage(tmp_path))
    fake_run(root, "a")
    with pytest.raises(ConditionalWritesUnsupported) as info:
        promote(Channel(root, "production"), root, "a", "")
    assert info.value.exit_code == EXIT_CONFIG and "does not honour conditional writes" in str(info.value)
    assert not (tmp_path / "channels").exists()  # no pointer, and the probe object is gone too


def cli(capsys, out, *args):
    code = main(["--output", str(out), *args], environ={})
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_rollback_hold_release_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    for run in ("a", "b", "c"):
        fake_run(LocalStorage(out), run)
    for run in ("a", "b", "c"):
        assert cli(capsys, out, "promote", "--channel", "prod", "--run", run, "--reason", f"ship {run}")[0] == 0
    code, stdout, _ = cli(capsys, out, "rollback", "--channel", "prod", "--reason", "c answers badly")
    assert code == 0 and json.loads(stdout)["run_id"] == "b"
    assert json.loads(cli(capsys, out, "rollback", "--channel", "prod")[1])["run_id"] == "a"  # further back, not undo
    code, _, err = cli(capsys, out, "rollback", "--channel", "prod")
    assert code == EXIT_CONFIG and "no earlier holder" in err
    held = json.loads(cli(capsys, out, "hold", "--channel", "prod", "--reason", "investigating")[1])
    assert held["held"]["reason"] == "investigating" and held["run_id"] == "a"
    assert json.loads(cli(capsys, out, "release", "--channel", "prod")[1])["held"] is None
    history = json.loads(cli(capsys, out, "history", "--channel", "prod")[1])
    assert [(e["seq"], e["action"], e["run_id"]) for e in history] == [
        (1, "promote", "a"), (2, "promote", "b"), (3, "promote", "c"), (4, "rollback", "b"), (5, "rollback", "a"),
        (6, "hold", "a"), (7, "release", "a")]
    assert history[3]["previous"] == "c" and history[3]["reason"] == "c answers badly"
    assert all(e["promoted_by"] == "manual" for e in history)
    assert json.loads(cli(capsys, out, "show", "--channel", "prod")[1]) == history[-1]


def one_line(err, needle):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qa-finetune channel: error:") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("args, code, needle", [
    (("rollback", "--channel", "nope"), EXIT_CONFIG, "channel 'nope' does not exist"),
    (("show", "--channel", "nope"), EXIT_CONFIG, "channel 'nope' does not exist"),
    (("promote", "--channel", "prod", "--run", "half"), EXIT_CONFIG, "run 'half' is not complete"),
    (("promote", "--channel", "prod", "--run", "../a"), EXIT_CONFIG, "invalid run id"),
    (("promote", "--channel", "a/b", "--run", "a"), EXIT_CONFIG, "invalid channel name 'a/b'"),
    (("show", "--channel", ".."), EXIT_CONFIG, "invalid channel name '..'"),
    # prod.json's folder would be prod's pointer file: on a local disk one of them could never be written
    (("promote", "--channel", "prod.json", "--run", "a"), EXIT_CONFIG, "must not end in '.json'"),
    (("promote", "--channel", "Prod.JSON", "--run", "a"), EXIT_CONFIG, "must not end in '.json'"),
])
def test_bad_input_is_one_line_and_moves_nothing(tmp_path, capsys, args, code, needle):
    out = tmp_path / "out"
    fake_run(LocalStorage(out), "a")
    fake_run(LocalStorage(out), "half", complete=False)
    assert cli(capsys, out, "promote", "--channel", "prod", "--run", "a")[0] == 0
    before = sorted(p.relative_to(out).as_posix() for p in (out / "channels").rglob("*"))
    got, stdout, err = cli(capsys, out, *args)
    assert got == code and stdout == ""
    one_line(err, needle)
    assert sorted(p.relative_to(out).as_posix() for p in (out / "channels").rglob("*")) == before


def test_corrupted_pointer_is_a_data_error_and_can_be_repaired(tmp_path, capsys):
    from tests.support.jobrun import run_job

    out = tmp_path / "out"
    for run in ("a", "b"):
        fake_run(LocalStorage(out), run)
    assert cli(capsys, out, "promote", "--channel", "prod", "--run", "a")[0] == 0
    (out / "channels" / "prod.json").write_text('{"schema": 1, "channel": "prod", "run_id": "../../etc"')
    for args in (("show",), ("promote", "--run", "b"), ("rollback",)):
        code, _, err = cli(capsys, out, *args, "--channel", "prod")
        assert code == EXIT_DATA
        one_line(err, "channels/prod.json is not JSON; nothing was moved")
    (out / "channels" / "prod.json").write_text(json.dumps({"schema": 1, "channel": "prod", "seq": 2, "run_id": "../../etc"}))
    result = run_job({}, module="job.channel", args=("show", "--output", str(out), "--channel", "prod"))
    assert result.returncode == EXIT_DATA and "run_id is not a run id" in result.stderr
    one_line(result.stderr, "is not a valid channel pointer")
    code, stdout, _ = cli(capsys, out, "promote", "--channel", "prod", "--run", "b", "--repair", "--reason", "fix")
    assert code == 0 and json.loads(stdout)["seq"] == 2 and json.loads(stdout)["previous"] == "a"
    assert [e["run_id"] for e in json.loads(cli(capsys, out, "history", "--channel", "prod")[1])] == ["a", "b"]


def test_a_pointer_nested_100000_deep_is_corrupt_and_can_be_repaired(tmp_path, capsys):
    """It was exit 1 with RecursionError for every command, and --repair could not tell it was corrupt."""
    out = tmp_path / "out"
    for run in ("a", "b"):
        fake_run(LocalStorage(out), run)
    assert cli(capsys, out, "promote", "--channel", "prod", "--run", "a")[0] == 0
    (out / "channels" / "prod.json").write_bytes(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    for args in (("show",), ("promote", "--run", "b"), ("rollback",), ("hold",)):
        code, _, err = cli(capsys, out, *args, "--channel", "prod")
        assert code == EXIT_DATA, err
        one_line(err, "channels/prod.json is not JSON; nothing was moved")
    code, stdout, _ = cli(capsys, out, "promote", "--channel", "prod", "--run", "b", "--repair")
    assert code == 0 and json.loads(stdout)["run_id"] == "b" and json.loads(stdout)["previous"] == "a"
    assert cli(capsys, out, "show", "--channel", "prod")[0] == 0


def test_stray_files_in_the_history_folder_are_ignored_with_a_warning(tmp_path, capsys, caplog):
    """A file named ².json in history/ made every command of the channel exit 1 (int('²') after isdigit())."""
    import logging

    from job.channels.retention import protected_models

    out = tmp_path / "out"
    for run in ("a", "b"):
        fake_run(LocalStorage(out), run)
    assert cli(capsys, out, "promote", "--channel", "prod", "--run", "a")[0] == 0
    history = out / "channels" / "prod" / "history"
    stray = ["².json", "notes.txt", "007.json", "1.json.tmp", "sub/3.json", "-1.json", "١.json"]
    for name in stray:
        (history / name).parent.mkdir(parents=True, exist_ok=True)
        (history / name).write_text('{"not": "an entry"}')
    with caplog.at_level(logging.WARNING, logger="job.channels.channel"):
        for args in (("promote", "--run", "b"), ("rollback",), ("hold",), ("release",), ("show",), ("history",)):
            code, _, err = cli(capsys, out, *args, "--channel", "prod")
            assert code == 0, err
    said = [r for r in caplog.records if getattr(r, "event", None) == "channel_history_ignored"]
    assert said and sorted(said[0].files) == sorted(stray) and said[0].count == len(stray)
    assert [e["seq"] for e in json.loads(cli(capsys, out, "history", "--channel", "prod")[1])] == [1, 2, 3, 4, 5]
    assert protected_models(LocalStorage(out), 7) == {"a", "b"}  # retention reads the same folder

