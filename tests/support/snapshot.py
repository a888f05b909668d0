"""What the soak's invariants read: a snapshot of a job's output, object by object.

A ``Snapshot`` is what storage holds under ``QA_OUTPUT_URI`` after a step of the soak (every
object's size and sha256, the bodies of the small ones, which secrets each contains), with the
few readings every invariant shares (runs, channels, history entries as the job names them).
``Policy`` is what the checks must know of the nights' settings. ``tests.support.invariants``
checks snapshots; ``tests.support.outcomes`` checks processes.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Mapping

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
HISTORY = re.compile(r"channels/([^/]+)/history/(.+)\.json")
POINTER = re.compile(r"channels/([^/]+)\.json")
CHECKPOINT_MARKER = re.compile(r"checkpoints/checkpoint-([0-9]+)/COMMIT\.json")
SEQ = re.compile(r"[1-9][0-9]*\.json")
RECORDS = ("metrics.json", "predictions.json", "manifest.json", "run.json")  # a complete run keeps them always
MODEL_FILES = ("config.json", "model.safetensors")  # what makes a model folder usable
SMALL = 256 * 1024  # bodies of objects up to this size are kept in a snapshot


@dataclass(frozen=True)
class Obj:
    size: int
    sha256: str
    body: bytes | None = None  # small objects only
    secrets: tuple[str, ...] = ()  # names of the secrets its bytes contain


def make_obj(data: bytes, secrets: Mapping[str, str] = {}) -> Obj:
    """An object as a snapshot holds it: ``secrets`` maps a name to a secret value to look for."""
    found = tuple(sorted(name for name, value in secrets.items() if value and value.encode() in data))
    return Obj(len(data), hashlib.sha256(data).hexdigest(), data if len(data) <= SMALL else None, found)


@dataclass(frozen=True)
class Snapshot:
    step: int
    objects: Mapping[str, Obj]  # key relative to the output URI -> object

    def json(self, key: str):
        """The parsed body, or None when missing, too big to keep or not JSON."""
        obj = self.objects.get(key)
        if obj is None or obj.body is None:
            return None
        try:
            return json.loads(obj.body)
        except (ValueError, UnicodeDecodeError):
            return None

    def has(self, key: str) -> bool:
        return key in self.objects

    def under(self, prefix: str) -> dict[str, Obj]:
        return {k[len(prefix):]: v for k, v in self.objects.items() if k.startswith(prefix)}

    def runs(self) -> set[str]:
        return {k.split("/", 1)[0] for k in self.objects if "/" in k and not k.startswith("channels/")}

    def complete(self, run: str) -> bool:
        return self.has(f"{run}/COMPLETE")

    def model_whole(self, run: str) -> bool:
        return all(self.has(f"{run}/model/{name}") for name in MODEL_FILES)

    def channels(self) -> list[str]:
        return sorted(m.group(1) for k in self.objects if (m := POINTER.fullmatch(k)))

    def history(self, channel: str) -> dict[int, object]:
        """``{seq: parsed entry or None}`` for every history object whose name is a number."""
        out = {}
        for key in self.under(f"channels/{channel}/history/"):
            if SEQ.fullmatch(key):  # what the job writes; any other name there is not a version (README)
                out[int(key[:-5])] = self.json(f"channels/{channel}/history/{key}")
        return out


@dataclass(frozen=True)
class Policy:
    keep_runs: int  # QA_KEEP_RUNS of every night
    gates: Mapping[str, tuple[str, float, float]] = field(default_factory=dict)  # channel -> (metric, floor, max drop)
