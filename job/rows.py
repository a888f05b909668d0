"""SQuAD rows in Arrow: written chunk by chunk as they are read, memory-mapped, read back chunk by chunk.

A split's validated rows go to one Arrow stream file in the work dir while the files are read
(``RowWriter``), and every stage uses them through ``datasets.Dataset.from_file``: a
memory-mapped table. A row costs the process nothing until it is read, and what was read is
file-backed page cache the kernel can drop again, not the process's own memory; a million
rows are as cheap to hold as a thousand. Every reader goes ``CHUNK`` rows at a time (``chunks``),
so the rows of a whole split never exist as Python objects at once.

The functions also take a plain list of row dicts (tests, a handful of rows): the same code
serves both.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

CHUNK = 1000  # rows per read: a few hundred KB of Python objects at a time
# The Hugging Face ``squad`` layout; ``answer_start`` is a character offset into ``context``.
COLUMNS = ("id", "title", "context", "question", "answers")
SCORED = ("id", "answers")  # what scoring reads of a row: never the contexts


def schema():
    import pyarrow as pa

    answers = pa.struct([("text", pa.list_(pa.string())), ("answer_start", pa.list_(pa.int64()))])
    return pa.schema([("id", pa.string()), ("title", pa.string()), ("context", pa.string()),
                      ("question", pa.string()), ("answers", answers)])


class RowWriter:
    """Append validated rows to ``path`` chunk by chunk; ``close()`` publishes the file whole.

    It is written under a temporary name and renamed at the end: a reader (another rank on the
    node, the gate re-loading the eval split) never maps half a file, and a mapping of an older
    version stays valid, since the rename leaves its inode alone.
    """

    def __init__(self, path: Path, tmp: Path | None = None):
        """``tmp``: the temporary name (the job's are named for their owner, so a killed writer's file is swept)."""
        import pyarrow as pa

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        self._tmp = Path(tmp) if tmp is not None else self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._schema = schema()
        self._sink = pa.OSFile(str(self._tmp), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self._schema)

    def write(self, rows: Sequence[dict]) -> None:
        import pyarrow as pa

        if rows:
            self._writer.write_batch(pa.RecordBatch.from_pylist(list(rows), schema=self._schema))
            self.rows += len(rows)

    def close(self) -> Path:
        self._writer.close()
        self._sink.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        for closing in (self._writer.close, self._sink.close):
            try:
                closing()
            except Exception:  # already closed, or the disk is what failed: the file goes anyway
                pass
        self._tmp.unlink(missing_ok=True)


def open_rows(path: Path):
    """The rows of ``path`` as a memory-mapped ``datasets.Dataset``."""
    import datasets

    return datasets.Dataset.from_file(str(path))


def chunk(rows, begin: int, size: int = CHUNK) -> list[dict]:
    """Rows ``begin`` to ``begin + size`` as a list of dicts, read from the table (or sliced from a list)."""
    if isinstance(rows, list):
        return rows[begin:begin + size]
    return rows.with_format("arrow")[begin:begin + size].to_pylist()


def chunks(rows, size: int = CHUNK, columns: Sequence[str] | None = None) -> Iterator[tuple[int, list[dict]]]:
    """``(begin, rows)`` for consecutive chunks; ``columns`` reads only those (no contexts when scoring)."""
    if columns is not None and not isinstance(rows, list):
        rows = rows.select_columns(list(columns))
    for begin in range(0, len(rows), size):
        yield begin, chunk(rows, begin, size)


def each(rows, columns: Sequence[str] | None = None) -> Iterator[dict]:
    """Every row, in order, read a chunk at a time."""
    for _, part in chunks(rows, CHUNK, columns):
        yield from part


def head(rows, n: int):
    """The first ``n`` rows, of the same kind (a table slice shares the mapped file)."""
    if isinstance(rows, list):
        return rows[:n]
    return rows.select(range(min(n, len(rows))))
