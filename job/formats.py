"""Every supported file format read as SQuAD rows, a row at a time, and the check every row must pass.

JSON Lines, Parquet (by record batch) and CSV (by chunk) are streamed: a file of any size costs
a chunk of rows in memory. Nested SQuAD JSON and JSON arrays are one JSON document each, parsed
whole (a file's worth of Python objects, freed after the file): keep big data in JSON Lines or
Parquet. ``validated`` checks each row as it passes and yields it in the one layout the job uses.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator

from job import safe_json
from job.errors import DataError

FORMATS = {".json": "squad-json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_BATCH = 1000  # Parquet record batches and CSV chunks


def read_rows(path: Path, source: str) -> list[dict]:
    """Every row of a file, as a list (a small file: tests, the demo's samples)."""
    return list(iter_file_rows(path, source))


def iter_file_rows(path: Path, source: str) -> Iterator[dict]:
    """The file's rows in order, unchecked; a parser's failure is a DataError naming the file."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{source}: unknown data format {path.suffix!r} (use .json, .jsonl, .parquet or .csv)")
    reader = {"squad-json": _read_squad_json, "jsonl": _read_jsonl, "parquet": _read_parquet, "csv": _read_csv}[kind]
    rows = reader(path, source)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except DataError:
            raise
        except Exception as exc:  # a parser's own message, kept to one line
            raise DataError(f"{source}: cannot read as {kind}: {str(exc).splitlines()[0][:200]}") from None
        yield row


def _read_jsonl(path: Path, source: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = safe_json.loads(line, max_bytes=None)
            except ValueError as exc:
                raise DataError(f"{source}: line {lineno} is {exc}") from None
            yield from_flat(row)


def _read_parquet(path: Path, source: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        for batch in f.iter_batches(batch_size=_BATCH):
            yield from (from_flat(r) for r in batch.to_pylist())


def _read_csv(path: Path, source: str) -> Iterator[dict]:
    import pandas as pd

    with pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=_BATCH) as frames:
        for frame in frames:
            yield from (from_flat(r) for r in frame.to_dict("records"))


def _read_squad_json(path: Path, source: str) -> Iterator[dict]:
    try:
        doc = safe_json.loads(path.read_text(encoding="utf-8"), max_bytes=None)
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise DataError(f"{source}: {exc}") from None
    if isinstance(doc, list):  # a JSON array of flat rows
        yield from (from_flat(r) for r in doc)
        return
    if not isinstance(doc, dict) or "data" not in doc:
        raise DataError(f"{source}: not SQuAD JSON (no top-level 'data')")
    for article in doc["data"]:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                yield {
                    "id": qa.get("id"), "title": article.get("title", ""), "context": para.get("context"),
                    "question": qa.get("question"),
                    "answers": {"text": [a.get("text") for a in answers], "answer_start": [a.get("answer_start") for a in answers]},
                }


def from_flat(row: dict) -> dict:
    """Accept the hub layout, or flat ``answer_text``/``answer_start`` columns (CSV, Parquet)."""
    if not isinstance(row, dict):
        return {"id": None}
    answers = row.get("answers")
    if isinstance(answers, str):  # CSV cell holding the JSON answers object
        try:
            answers = safe_json.loads(answers, max_bytes=None) if answers.strip() else {"text": [], "answer_start": []}
        except ValueError:
            answers = None
    if answers is None and "answer_text" in row:
        text, start = row.get("answer_text"), row.get("answer_start")
        has = text not in (None, "")
        answers = {"text": [text] if has else [], "answer_start": [_int(start)] if has else []}
    out = dict(row)
    out["answers"] = answers
    return out


def _int(value):
    """CSV cells arrive as text: "17" -> 17. Everything else is left for the check to judge."""
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
    if not _encodable(value):
        raise DataError(f"{where}: field {field!r} {_SURROGATE}")
    return value


_SURROGATE = "holds an invalid character (a lone UTF-16 surrogate)"


def _encodable(value: str) -> bool:
    """False for a lone surrogate, which no tokenizer, JSON or Arrow writer accepts."""
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def validated(rows: Iterable[dict], source: str, squad_v2: bool) -> Iterator[dict]:
    """Each row checked and in the job's layout; the first bad one raises a DataError naming ``source`` and the row.

    Without ``QA_SQUAD_V2`` every row, training and evaluation alike, needs an answer: v1.1
    scoring has no rule for a question without one, and finding that out after training would
    cost the whole run. Those rows are counted over the whole file and reported once, at its end.
    Repeated ids are the caller's to find (across files: ``job.data``).
    """
    unanswerable, count = [], 0
    for index, row in enumerate(rows):
        rid = row.get("id")
        where = f"{source}: row {str(rid)[:80]!r}" if isinstance(rid, (str, int)) and rid != "" else f"{source}: row #{index + 1}"
        _text(rid, where, "id")
        context, question = _text(row.get("context"), where, "context"), _text(row.get("question"), where, "question")
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
            count += 1
            if len(unanswerable) < 5:
                unanswerable.append(rid)
        title = str(row.get("title") or "")
        if not _encodable(title):  # unused by training, but the Arrow file must be able to hold it
            raise DataError(f"{where}: field 'title' {_SURROGATE}")
        yield {"id": rid, "title": title, "context": context, "question": question,
               "answers": {"text": list(texts), "answer_start": starts}}
    if count:
        shown = ", ".join(repr(str(r)[:60]) for r in unanswerable) + (f" and {count - 5} more" if count > 5 else "")
        raise DataError(f"{source}: {count} row(s) without an answer ({shown}); "
                        "set QA_SQUAD_V2=true for data with unanswerable questions")
