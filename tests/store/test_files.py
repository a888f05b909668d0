"""Local files: conditional creates that are whole or absent, locks and temporary files that leave nothing behind."""
import json
import random
import subprocess
import sys
import time

import pytest

from job.store.lease import KEY, Lease
from job.store.storage import LocalStorage, NotFound, PreconditionFailed
from tests.support.jobrun import ROOT

# creates history entries one after the other, as channel movers do, each with IfNoneMatch
# With a 4th argument k, it SIGKILLs itself when a file it just created is opened for writing (by
# descriptor) for the k-th time: between creating a file and writing its first byte.
CREATOR = """
import os, signal, sys
from pathlib import Path
from job.store.storage import LocalStorage
store, count, size = LocalStorage(Path(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
opened = []

def kill_at_kth_open(event, args):
    if event == "open" and isinstance(args[0], int):
        opened.append(args[0])
        if len(opened) == int(sys.argv[4]):
            os.kill(os.getpid(), signal.SIGKILL)

if len(sys.argv) > 4:
    sys.addaudithook(kill_at_kth_open)
print("ready", flush=True)
for i in range(count):
    store.put_bytes(f"history/{i}.json", bytes([65 + i % 26]) * size, if_none_match=True)
"""


def expected(i: int, size: int) -> bytes:
    return bytes([65 + i % 26]) * size


def creator(root, count: int, size: int, kill_at: int | None = None) -> subprocess.Popen:
    extra = [str(kill_at)] if kill_at else []
    proc = subprocess.Popen([sys.executable, "-c", CREATOR, str(root), str(count), str(size), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_reader_never_sees_a_created_object_empty_or_half_written(tmp_path):
    """Created by another process while read: the reader finds nothing or the whole object (it once saw 87/300 empty)."""
    store, count, size = LocalStorage(tmp_path), 150, 1 << 20
    proc = creator(tmp_path, count, size)
    try:
        for i in range(count):
            deadline = time.monotonic() + 30
            while True:
                try:
                    data, _ = store.get_bytes(f"history/{i}.json")
                    break
                except NotFound:
                    assert time.monotonic() < deadline and proc.poll() in (None, 0), f"history/{i}.json never came"
            assert data == expected(i, size), f"history/{i}.json read with {len(data)} of {size} bytes"
    finally:
        proc.kill()
        proc.wait()


def test_a_kill_at_any_moment_leaves_each_created_object_whole_or_absent(tmp_path):
    """SIGKILL between any two steps of a create: an object that exists is whole, and its name can still be taken only once."""
    rng = random.Random(15)
    size = 1 << 20
    for round_, kill_at in enumerate([1, 2, 3, None, None, None, None]):  # at a create's first write, then anywhere
        root = tmp_path / f"round-{round_}"
        proc = creator(root, 10 ** 6, size, kill_at)
        if kill_at is None:
            time.sleep(rng.uniform(0.02, 0.25))
            proc.kill()
        assert proc.wait(30) == -9
        store = LocalStorage(root)
        keys = store.list("history/")
        assert len(keys) >= (kill_at or 2) - 1, keys
        for key in keys:
            data, _ = store.get_bytes(key)
            assert data == expected(int(key.split("/")[1][:-5]), size), f"{key}: {len(data)} of {size} bytes after the kill"
        nxt = f"history/{len(keys)}.json"  # the create the kill interrupted: still free, and takes once
        store.put_bytes(nxt, b"{}", if_none_match=True)
        with pytest.raises(PreconditionFailed):
            store.put_bytes(nxt, b"{}", if_none_match=True)


def test_compare_and_swap_and_delete_leave_no_lock_files(tmp_path):
    """A run that wrote nothing lasting leaves no folder behind: lock files once kept it (and every channel folder) alive."""
    store = LocalStorage(tmp_path / "out")
    etag = store.put_bytes("run/pointer.json", b"1", if_none_match=True)
    etag = store.put_bytes("run/pointer.json", b"2", if_match=etag)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("run/pointer.json", b"3", if_match="stale")
    assert [p.name for p in (tmp_path / "out" / "run").iterdir()] == ["pointer.json"]
    store.delete("run/pointer.json")
    assert not (tmp_path / "out").exists()


def test_a_renewed_and_released_lease_leaves_no_run_folder(tmp_path):
    store = LocalStorage(tmp_path / "out" / "r")
    lease = Lease(store, "r", ttl_seconds=60, lock_dir=tmp_path / "work" / "r")
    lease.acquire()
    lease._renew()  # what the renewal thread does every third of the TTL
    assert json.loads((tmp_path / "out" / "r" / KEY).read_text())["holder"] == lease.token
    lease.release()
    assert not (tmp_path / "out" / "r").exists()
