"""Fetch the training and evaluation data and turn any supported shape into validated SQuAD rows.

A row is ``{"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}``,
the layout of the Hugging Face ``squad`` datasets. Files may be nested SQuAD JSON (v1.1/v2.0),
JSON Lines, Parquet or CSV, on local disk or in ``s3://``; without a file the hub dataset is used.
A folder, or an ``s3://`` prefix ending in ``/``, is every supported file under it in key order,
read as one split (data that grows night by night). Every problem is a ``DataError`` naming the
file and the row id.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from job.errors import DataError, StorageUnavailable
from job.settings import Settings
from job.store.locations import UnsafeName, confine, join, local_path
from job.store.storage import NotFound, RetryPolicy, open_storage, sha256_file, split_s3

log = logging.getLogger(__name__)
FORMATS = {".json": "squad-json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Split:
    name: str  # "train" or "eval"
    source: str  # URI or hub id, for messages and the manifest
    sha256: str  # of the file, of every file under a prefix, or of the hub dataset's fingerprint
    rows: list[dict]
    files: tuple = ()  # under a prefix: (key, sha256) of each file read, in order


def load_splits(settings: Settings, policy: RetryPolicy) -> tuple[Split, Split]:
    return load_split("train", settings, policy), load_split("eval", settings, policy)


def load_split(name: str, settings: Settings, policy: RetryPolicy) -> Split:
    """The ``train`` or ``eval`` split as the settings name it: a file, a folder / prefix, or the hub."""
    uri = settings.train_uri if name == "train" else settings.eval_uri
    hub_split = settings.train_split if name == "train" else settings.eval_split
    limit = settings.max_train_samples if name == "train" else settings.max_eval_samples
    files: tuple = ()
    if uri and is_prefix(uri):
        rows, digest, files = _prefix_rows(uri, Path(settings.work_dir) / "data" / name, settings, policy)
    elif uri:
        path = fetch(uri, Path(settings.work_dir) / "data" / name, settings, policy)
        rows, digest = validate_rows(read_rows(path, uri), source=uri, squad_v2=settings.squad_v2), sha256_file(path)
    else:
        source = f"{settings.dataset}[{hub_split}]"
        rows, digest = validate_rows(_hub_rows(settings, hub_split), source=source, squad_v2=settings.squad_v2), None
    if limit:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"{uri or settings.dataset}: no {name} examples left after filtering (QA_MAX_{name.upper()}_SAMPLES, format)")
    if digest is None:
        digest = _fingerprint(rows)
    log.info("data loaded", extra={"event": "data", "split": name, "source": uri or settings.dataset, "examples": len(rows),
                                   **({"files": len(files)} if files else {})})
    return Split(name, uri or settings.dataset, digest, rows, files)


def is_prefix(uri: str) -> bool:
    """An ``s3://`` URI ending in '/', or a local folder: read every supported file under it."""
    if uri.startswith("s3://"):
        return uri.endswith("/")
    return uri.endswith("/") or local_path(uri).is_dir()


def _prefix_rows(uri: str, dest_dir: Path, settings: Settings, policy: RetryPolicy) -> tuple[list[dict], str, tuple]:
    """Every supported file under a folder or prefix, in key order, as one validated split.

    Files of other kinds (``_SUCCESS`` markers, ``.crc`` files, hidden temporary files) are
    skipped and logged. Ids must be unique across files: a duplicate names both files. The digest
    covers each file's key and sha256, so a file added, removed, renamed or changed is new data.
    """
    if uri.startswith("s3://"):
        store = open_storage(uri, policy, settings.s3_endpoint_url, settings.s3_region)
        keys = store.list("")
    else:
        root = local_path(uri)
        if not root.is_dir():
            raise DataError(f"{uri}: data folder not found")
        keys = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    use = [k for k in keys if FORMATS.get(Path(k).suffix.lower()) and not any(part.startswith(".") for part in k.split("/"))]
    skipped = [k for k in keys if k not in set(use)]
    if skipped:
        log.info("files skipped under a data prefix", extra={"event": "data_files_skipped", "source": uri,
                                                              "count": len(skipped), "files": skipped[:20]})
    if not use:
        raise DataError(f"{uri}: no data files under this prefix (supported: .json, .jsonl, .ndjson, .parquet, .csv"
                        f"{'; skipped ' + ', '.join(skipped[:3]) if skipped else ''})")
    rows, first_seen, digest, files = [], {}, hashlib.sha256(), []
    for key in use:
        source = join(uri, key)
        if uri.startswith("s3://"):
            try:
                path = confine(dest_dir / "prefix", key)
            except UnsafeName as exc:
                raise DataError(f"{source}: unusable key ({exc})") from None
            try:
                store.get_file(key, path)
            except NotFound:
                raise DataError(f"{source}: data object vanished while reading the prefix") from None
        else:
            path = root / key
        sha = sha256_file(path)
        for row in validate_rows(read_rows(path, source), source=source, squad_v2=settings.squad_v2):
            if row["id"] in first_seen:
                raise DataError(f"{source}: row {str(row['id'])[:80]!r}: duplicate id, also in {first_seen[row['id']]}")
            first_seen[row["id"]] = source
            rows.append(row)
        digest.update(f"{key}\0{sha}\n".encode())
        files.append((key, sha))
    return rows, digest.hexdigest(), tuple(files)


def fetch(uri: str, dest_dir: Path, settings: Settings, policy: RetryPolicy) -> Path:
    """Return a local path for ``uri``, downloading ``s3://`` objects into ``dest_dir``."""
    if not uri.startswith("s3://"):
        path = local_path(uri)
        if not path.is_file():
            raise DataError(f"{uri}: data file not found")
        return path
    bucket, key = split_s3(uri)
    store = open_storage(f"s3://{bucket}", policy, settings.s3_endpoint_url, settings.s3_region)
    local = dest_dir / Path(key).name
    try:
        store.get_file(key, local)
    except NotFound:
        raise DataError(f"{uri}: data object not found (a prefix of several files must end with '/')") from None
    return local


def read_rows(path: Path, source: str) -> list[dict]:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{source}: unknown data format {path.suffix!r} (use .json, .jsonl, .parquet or .csv)")
    try:
        if kind == "squad-json":
            return _read_squad_json(path, source)
        if kind == "jsonl":
            return _read_jsonl(path, source)
        if kind == "parquet":
            import pyarrow.parquet as pq

            return [_from_flat(r) for r in pq.read_table(path).to_pylist()]
        import pandas as pd

        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        return [_from_flat(r) for r in frame.to_dict("records")]
    except DataError:
        raise
    except Exception as exc:  # a parser's own message, kept to one line
        raise DataError(f"{source}: cannot read as {kind}: {str(exc).splitlines()[0][:200]}") from None


def _read_jsonl(path: Path, source: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(_from_flat(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{source}: line {lineno} is not valid JSON ({exc.msg})") from None
    return rows


def _read_squad_json(path: Path, source: str) -> list[dict]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(doc, list):  # a JSON array of flat rows
        return [_from_flat(r) for r in doc]
    if not isinstance(doc, dict) or "data" not in doc:
        raise DataError(f"{source}: not SQuAD JSON (no top-level 'data')")
    rows = []
    for article in doc["data"]:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                rows.append({
                    "id": qa.get("id"), "title": article.get("title", ""), "context": para.get("context"),
                    "question": qa.get("question"),
                    "answers": {"text": [a.get("text") for a in answers], "answer_start": [a.get("answer_start") for a in answers]},
                })
    return rows


def _from_flat(row: dict) -> dict:
    """Accept the hub layout, or flat ``answer_text``/``answer_start`` columns (CSV, Parquet)."""
    if not isinstance(row, dict):
        return {"id": None}
    answers = row.get("answers")
    if isinstance(answers, str):  # CSV cell holding the JSON answers object
        try:
            answers = json.loads(answers) if answers.strip() else {"text": [], "answer_start": []}
        except json.JSONDecodeError:
            answers = None
    if answers is None and "answer_text" in row:
        text, start = row.get("answer_text"), row.get("answer_start")
        has = text not in (None, "")
        answers = {"text": [text] if has else [], "answer_start": [_int(start)] if has else []}
    out = dict(row)
    out["answers"] = answers
    return out


def _int(value):
    """CSV cells arrive as text: "17" -> 17. Everything else is left for validate_rows to judge."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _start(value) -> int | None:
    """An answer_start as a non-negative int: ints, digit strings and integral floats (Parquet) only."""
    value = _int(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


def _text(value, where: str, field: str) -> str:
    if value is None or isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: missing or empty field {field!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string (got {type(value).__name__})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no tokenizer or JSON writer accepts it
        raise DataError(f"{where}: field {field!r} holds an invalid character (a lone UTF-16 surrogate)") from None
    return value


def validate_rows(rows: Iterable[dict], source: str, squad_v2: bool) -> list[dict]:
    """Check every row; the first bad one raises a DataError naming the source and row id.

    Without ``QA_SQUAD_V2`` every row, training and evaluation alike, needs an answer: v1.1
    scoring has no rule for a question without one, and finding that out after training would
    cost the whole run.
    """
    out, seen, unanswerable = [], set(), []
    for index, row in enumerate(rows):
        rid = row.get("id")
        where = f"{source}: row {str(rid)[:80]!r}" if isinstance(rid, (str, int)) and rid != "" else f"{source}: row #{index + 1}"
        _text(rid, where, "id")
        context, question = _text(row.get("context"), where, "context"), _text(row.get("question"), where, "question")
        if rid in seen:
            raise DataError(f"{where}: duplicate id")
        seen.add(rid)
        answers = row.get("answers")
        if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) or not isinstance(answers.get("answer_start"), list):
            raise DataError(f"{where}: missing field 'answers' ({{'text': [...], 'answer_start': [...]}})")
        texts, starts = answers["text"], [_start(s) for s in answers["answer_start"]]
        if len(texts) != len(starts):
            raise DataError(f"{where}: answers.text and answers.answer_start differ in length")
        for text, start, raw in zip(texts, starts, answers["answer_start"]):
            if not isinstance(text, str) or not text:
                raise DataError(f"{where}: an answer text must be a non-empty string (no answer: empty lists, with QA_SQUAD_V2=true)")
            _text(text, where, "answers.text")
            if start is None:
                raise DataError(f"{where}: answer_start must be a non-negative integer (got {str(raw)[:40]!r})")
            if context[start:start + len(text)] != text:
                raise DataError(f"{where}: answer_start {start} does not match the context for answer {text[:40]!r}")
        if not texts and not squad_v2:
            unanswerable.append(rid)
        out.append({
            "id": rid, "title": str(row.get("title") or ""), "context": context, "question": question,
            "answers": {"text": list(texts), "answer_start": starts},
        })
    if unanswerable:
        shown = ", ".join(repr(str(r)[:60]) for r in unanswerable[:5]) + (f" and {len(unanswerable) - 5} more" if len(unanswerable) > 5 else "")
        raise DataError(f"{source}: {len(unanswerable)} row(s) without an answer ({shown}); "
                        "set QA_SQUAD_V2=true for data with unanswerable questions")
    return out


def _hub_rows(settings: Settings, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(settings.dataset, settings.dataset_config, split=split)
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise StorageUnavailable(f"QA_DATASET={settings.dataset}: hub unreachable ({str(exc).splitlines()[0][:160]})") from None
    except Exception as exc:
        raise DataError(f"QA_DATASET={settings.dataset} split {split!r}: {str(exc).splitlines()[0][:200]}") from None
    return [_from_flat(r) for r in ds]


def _fingerprint(rows: list[dict]) -> str:
    import hashlib

    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()
