"""Temporary files are named for their owner; a SIGKILLed owner's are swept, a live one's never (real processes)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

from job.store import scratch

ROOT = Path(__file__).resolve().parents[2]
# A process that holds the work dir and is caught with one of everything half-done: rows being written, the
# teacher's logits being scored, a download (boto3's own suffix on the temporary name), a half-staged folder.
CHILD = """
import sys, time
from pathlib import Path
from job.rows import RowWriter
from job.store import scratch
from job.store.files import writing, writing_folder
work, run = Path(sys.argv[1]), Path(sys.argv[1]) / sys.argv[2]
scratch.hold(work)
rows = RowWriter(run / "rows" / "train.arrow", scratch.temp_path(run / "rows" / "train.arrow"))
(run / "teacher").mkdir()
scoring = writing(run / "teacher" / "logits.npy")  # held open: a dropped context manager would clean up
logits = scoring.__enter__()
logits.write_bytes(b"\\0" * 4096)
part = scratch.temp_path(run / "data" / "train.jsonl")
part.parent.mkdir(parents=True)
Path(str(part) + ".9fA3b1c2").write_bytes(b"{}")
staging = writing_folder(run / "publish")
staged = staging.__enter__()
(staged / "model").mkdir()
(staged / "model" / "model.safetensors").write_bytes(b"w" * 100)
print("ready", flush=True)
time.sleep(120)
"""


def start(work, run):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(work), run], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout.readline().strip() == "ready"
    return child


def temporary(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if ".tmp" in p.name)


def test_a_killed_owners_temporary_files_go_and_a_live_ones_stay(tmp_path):
    work = tmp_path / "work"
    dead, live = start(work, "dead-run"), start(work, "live-run")
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        left = temporary(work / "dead-run")
        assert len(left) == 4, left  # rows, logits, the download, the staged folder
        ours = scratch.temp_path(work / "ours.json")  # this process's, unheld here: not the sweep's business either
        ours.write_bytes(b"{}")
        gone = scratch.sweep(work)
        assert sorted(path for path, _ in gone) == [f"dead-run/{p}" for p in left] and sum(n for _, n in gone) >= 4196
        assert temporary(work / "dead-run") == [] and len(temporary(work / "live-run")) == 4 and ours.exists()
        assert len(list((work / scratch.OWNERS).iterdir())) == 1  # the dead owner's record went with its files
    finally:
        for child in (dead, live):
            child.kill()
            child.wait()
    assert len(temporary(work / "live-run")) == 4  # killed now: the next sweep takes them
    scratch.sweep(work)
    assert temporary(work) == [ours.relative_to(work).as_posix()]
    assert list((work / scratch.OWNERS).iterdir()) == []  # no record of a dead owner stays behind either


def test_an_owner_on_another_kernel_is_never_taken_for_dead(tmp_path):
    """A free lock on a network volume proves nothing when the lock was another node's: its files stay."""
    work = tmp_path / "work"
    (work / scratch.OWNERS).mkdir(parents=True)
    (work / scratch.OWNERS / ("f" * 16)).write_text("another-boot-id")
    theirs = work / "run" / f".rows.arrow.{'f' * 16}.7-0.tmp"
    orphan = work / "run" / f".rows.arrow.{'e' * 16}.7-0.tmp"  # no owner record at all: nobody alive owns it
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"x")
    orphan.write_bytes(b"x")
    assert [p for p, _ in scratch.sweep(work)] == [orphan.relative_to(work).as_posix()]
    assert theirs.exists() and not orphan.exists()
