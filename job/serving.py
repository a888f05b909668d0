"""What serves a published model: one seam for every runtime, and the record that says what to load.

A ``Scorer`` turns a batch of windows into start and end logits. ``open_scorer(model_dir,
runtime)`` gives one for ``torch`` (the transformers weights, fp32), ``onnx`` (``model.onnx`` in
ONNX Runtime) or ``onnx-int8`` (``model_int8.onnx``, dynamically quantized); answering,
batch predictions and the export check at publish time all score through it, so they decode the
same logits the same way (``job.squad.decoding``).

``serving.json`` is written beside the model at publish time (``job.export``): which runtimes are
published and their files with sha256, how each scored on the run's eval set, and the windowing
and decoding options the model was evaluated with (for SQuAD v2 the chosen no-answer threshold).
``read_serving`` reads it back, checked: nothing read from storage is trusted as a name or a number.
A model without one (an older run, a hub model) reads as torch only, with no recorded options.

Imports only the exit-code errors: the heavy libraries (torch, transformers, onnxruntime) load
when a scorer is opened.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from job.errors import ConfigError

SERVING = "serving.json"
SCHEMA = 1
TORCH, ONNX, ONNX_INT8 = "torch", "onnx", "onnx-int8"
RUNTIMES = (TORCH, ONNX, ONNX_INT8)
ONNX_FILES = {ONNX: "model.onnx", ONNX_INT8: "model_int8.onnx"}  # top level: fetch_model takes only those
OUTPUT_NAMES = ("start_logits", "end_logits")
# the options a model was evaluated with, and their types in serving.json
DECODING = {"max_length": int, "doc_stride": int, "n_best_size": int, "max_answer_length": int, "version_2": bool,
            "null_score_diff_threshold": float}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Scorer(Protocol):
    """Start and end logits of a batch of windows: ``{name: int64 array (batch, length)}`` -> two float32 arrays.

    ``tokenizer`` makes the windows; the batch holds the tokenizer's ``model_input_names``, padded
    to one length (a scorer uses the inputs its model takes and ignores the others).
    """

    runtime: str
    tokenizer: object

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]: ...


class TorchScorer:
    """The transformers model in fp32 whatever dtype it was saved in, as evaluation scores it."""

    runtime = TORCH

    def __init__(self, model_dir: Path, device: str = "cpu"):
        import torch
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForQuestionAnswering.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.device = torch.device(device)
        self.model.to(self.device)
        self.input_names = model_inputs(self.model, self.tokenizer)

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.model(**{k: torch.as_tensor(np.asarray(batch[k], dtype=np.int64)).to(self.device)
                                for k in self.input_names})
        return (out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy())


class OnnxScorer:
    """An exported graph in ONNX Runtime on the CPU; ``threads`` bounds its intra-op threads (None: its default)."""

    def __init__(self, model_dir: Path, runtime: str, path: Path, threads: int | None = None):
        import onnxruntime
        from transformers import AutoTokenizer

        self.runtime = runtime
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        feed = {k: np.ascontiguousarray(batch[k], dtype=np.int64) for k in self.input_names}
        start, end = self.session.run(list(OUTPUT_NAMES), feed)
        return start.astype(np.float32, copy=False), end.astype(np.float32, copy=False)


def open_scorer(model_dir: str | Path, runtime: str = TORCH, *, device: str = "cpu", threads: int | None = None) -> Scorer:
    """A scorer for the model in ``model_dir`` (a local folder) on ``runtime``; ConfigError (exit 2) naming
    what is missing: an unknown runtime, an export this model was not published with (and why, when
    ``serving.json`` says), or a graph file whose sha256 is not the recorded one."""
    model_dir = Path(model_dir)
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if runtime == TORCH:
        return TorchScorer(model_dir, device)
    if device != "cpu":
        raise ConfigError(f"runtime {runtime}: runs on the CPU only (ONNX Runtime's CPU build); use torch for {device}")
    serving = read_serving(model_dir)
    entry = serving["runtimes"].get(runtime)
    if entry is None:
        why = serving.get("not_published", {}).get(runtime)
        raise ConfigError(f"runtime {runtime}: {model_dir} was not published with it"
                          + (f" ({why})" if why else f" (no {ONNX_FILES[runtime]} in its {SERVING})"))
    (record,) = entry["files"]
    path = model_dir / record["name"]
    if not path.is_file():
        raise ConfigError(f"runtime {runtime}: {path} is missing")
    if sha256_of(path) != record["sha256"]:
        raise ConfigError(f"runtime {runtime}: {path} does not match the sha256 in {SERVING}")
    return OnnxScorer(model_dir, runtime, path, threads)


def model_inputs(model, tokenizer) -> list[str]:
    """The tokenizer's inputs the model's ``forward`` names: a BERT tokenizer gives DistilBERT segment ids it
    never reads (its ``**kwargs`` swallow them), and an exported graph must not take them."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return [n for n in tokenizer.model_input_names if n in params]


def read_serving(model_dir: str | Path) -> dict:
    """``serving.json`` of a local model folder, checked; a folder without one reads as torch only:
    ``{"schema": 1, "runtimes": {"torch": {"files": []}}, "decoding": {}}`` (no recorded options)."""
    path = Path(model_dir) / SERVING
    if not path.is_file():
        return {"schema": SCHEMA, "runtimes": {TORCH: {"files": []}}, "decoding": {}}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not readable JSON ({str(exc)[:120]})") from None
    problem = serving_problem(record)
    if problem:
        raise ConfigError(f"{path}: not what this job writes ({problem})")
    return record


def serving_problem(record) -> str:
    """What is wrong with a serving record, or '' when it has the shape ``job.export`` writes."""
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        return "not a schema-1 object"
    runtimes = record.get("runtimes")
    if not isinstance(runtimes, dict) or not runtimes or any(r not in RUNTIMES for r in runtimes):
        return f"runtimes must name some of {', '.join(RUNTIMES)}"
    for name, entry in runtimes.items():
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, list) or (name != TORCH and len(files) != 1):
            return f"runtimes.{name}.files must be a list (one file for an export)"
        for f in files:
            if not (isinstance(f, dict) and isinstance(f.get("name"), str) and re.fullmatch(r"[\w.-]+", f["name"])
                    and not f["name"].startswith(".") and isinstance(f.get("sha256"), str)
                    and _SHA256.fullmatch(f["sha256"])):
                return f"runtimes.{name}.files: each needs a plain file name and a sha256"
    decoding = record.get("decoding")
    if not isinstance(decoding, dict):
        return "decoding must be an object"
    for key, value in decoding.items():
        kind = DECODING.get(key)
        if kind is None:
            return f"decoding.{key} is unknown"
        ok = (isinstance(value, bool) if kind is bool else isinstance(value, int) and not isinstance(value, bool)
              if kind is int else isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        if not ok:
            return f"decoding.{key} must be {kind.__name__}"
    if not isinstance(record.get("not_published", {}), dict):
        return "not_published must be an object"
    return ""


def decoding_options(serving: dict) -> dict:
    """``decode_answer``'s keyword arguments from a serving record's options (only those it records)."""
    names = {"n_best_size": "n_best", "max_answer_length": "max_answer_length", "version_2": "version_2",
             "null_score_diff_threshold": "null_threshold"}
    return {names[k]: v for k, v in serving.get("decoding", {}).items() if k in names}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    """``{"name", "sha256", "bytes"}`` of a file of the model folder, as serving.json lists it."""
    return {"name": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size}
