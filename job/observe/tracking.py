"""TensorBoard event files that live with the run (which trackers run at all: ``job.observe.trackers``).

TensorBoard writes into ``<work>/<run_id>/tensorboard/``. Every checkpoint carries a snapshot of
those event files (``tensorboard.tar``, hashed in the commit marker like every other file), and
once the checkpoint is committed ``<run>/logs/`` is made to hold exactly that snapshot. A resumed
run starts from the snapshot of the checkpoint it resumes, so the events written after it by a
killed attempt are gone and the curves go on with no step written twice; ``logs/`` never holds
events that a resume would write again. The snapshot is one archive, not loose event files, so a
``tensorboard --logdir`` on the whole run folder does not show every checkpoint as another run.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
from pathlib import Path

from transformers.integrations import TensorBoardCallback

from job.errors import StorageDenied, StorageUnavailable
from job.store.files import writing
from job.store.locations import UnsafeName, check_name, confine

log = logging.getLogger(__name__)
ARCHIVE = "tensorboard.tar"  # inside each checkpoint folder
LOGS = "logs/"  # under the run folder: what `tensorboard --logdir` is pointed at
def logging_dir(settings) -> Path:
    return Path(settings.work_dir) / settings.run_id / "tensorboard"


class RunTensorBoard(TensorBoardCallback):
    """The Trainer's TensorBoard integration, writing into the run's folder and snapshotted into each checkpoint.

    Must come before ``CheckpointCallback``: the snapshot is in the folder before it is handed to the uploader.
    """

    def __init__(self, directory: Path):
        super().__init__()
        self.logging_dir = str(directory)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # the arguments and model config as text: once per run, not per attempt
            return super().on_train_begin(args, state, control, **kwargs)
        if state.is_world_process_zero and self.tb_writer is None:
            self._init_summary_writer(args)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_runtime" in logs:  # the closing totals repeat the last step's epoch: one point per step
            logs = {k: v for k, v in logs.items() if k != "epoch"}
        return super().on_log(args, state, control, logs=logs, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.tb_writer is not None:
            self.tb_writer.flush()
        snapshot(Path(self.logging_dir), Path(args.output_dir) / f"checkpoint-{state.global_step}")


def snapshot(directory: Path, checkpoint: Path) -> None:
    """Archive the event files as they are now (everything logged up to this checkpoint's step)."""
    with writing(checkpoint / ARCHIVE) as part, tarfile.open(part, "w") as tar:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            tar.add(path, arcname=path.relative_to(directory).as_posix(), recursive=False)


def read_archive(archive: Path) -> dict[str, bytes]:
    """``{relative name: content}`` of a snapshot; names are checked before anything is written with them."""
    files = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                raise UnsafeName(f"{archive.name}: {member.name[:80]!r} is not a plain file")
            check_name(member.name)
            files[member.name] = tar.extractfile(member).read()
    return files


def restore_events(checkpoint: Path | None, directory: Path) -> None:
    """Start the run's event folder from the resumed checkpoint's snapshot, or empty on a fresh start.

    Whatever a killed attempt wrote after that checkpoint is dropped with the rest of the folder:
    the resumed run logs those steps again, once.
    """
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    archive = checkpoint / ARCHIVE if checkpoint is not None else None
    if archive is None:
        return
    if not archive.is_file():
        log.warning("the resumed checkpoint has no TensorBoard events; curves start at its step",
                    extra={"event": "tensorboard_missing", "checkpoint": checkpoint.name})
        return
    files = read_archive(archive)
    for name, data in files.items():
        path = confine(directory, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    log.info("TensorBoard events restored", extra={"event": "tensorboard_restored", "checkpoint": checkpoint.name,
                                                    "files": len(files)})


class LogsMirror:
    """Run after a checkpoint is committed: ``<run>/logs/`` becomes exactly that checkpoint's event files.

    Best effort: the checkpoint counts whether or not its logs went up, and the next one retries.
    """

    def __init__(self, store):
        self.store = store
        self._sent: dict[str, str] = {}  # name -> sha256 of what is in storage already

    def __call__(self, step: int, folder: Path) -> None:
        archive = folder / ARCHIVE
        if not archive.is_file():
            return
        try:
            files = read_archive(archive)
            self.mirror(files)
        except (StorageUnavailable, StorageDenied, OSError, tarfile.TarError, UnsafeName) as exc:
            log.warning("TensorBoard logs not uploaded; the next checkpoint tries again",
                        extra={"event": "logs_upload_failed", "step": step, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})

    def mirror(self, files: dict[str, bytes]) -> None:
        for name, data in sorted(files.items()):
            digest = hashlib.sha256(data).hexdigest()
            if self._sent.get(name) != digest:
                self.store.put_bytes(LOGS + name, data)
                self._sent[name] = digest
        mirror_deletions(self.store, LOGS, set(files))
        self._sent = {k: v for k, v in self._sent.items() if k in files}


def mirror_deletions(store, prefix: str, keep: set[str]) -> None:
    """Delete what storage holds under ``prefix`` beyond ``keep`` (events of an attempt no checkpoint kept)."""
    for key in store.list(prefix):
        if key[len(prefix):] not in keep:
            store.delete(key)


def stage_events(directory: Path, dest: Path) -> None:
    """Copy the run's event files into the staged results (published as ``logs/``)."""
    if directory.is_dir() and any(p.is_file() for p in directory.rglob("*")):
        shutil.copytree(directory, dest, dirs_exist_ok=True)

