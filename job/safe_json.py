"""JSON read from outside the process, parsed with bounds: the one parser for storage objects and data files.

``json.loads`` recurses once per nesting level: a pointer, lease, marker or run record nested
100,000 deep raised ``RecursionError``, which is not a ``ValueError``, so it passed every "not what
the job writes" handler and ended the job (or ``job.channel``) with exit 1 and a traceback, and
``promote --repair`` could not even recognise the pointer as corrupt. Here anything too deep, too
big or not JSON is a ``ValueError`` (``Unparsable``): the error every caller already turns into its
documented handling (a corrupt pointer is exit 3, an unusable marker or lease is skipped or
watched, a bad data row is exit 3). Nothing the job writes is deeper than a few levels, and a
document that parsed is also walked by code that recurses (redaction, ``json.dumps``), so the
depth bound is far below the interpreter's recursion limit.

Pure: no I/O, nothing of the job imported.
"""
from __future__ import annotations

import json

MAX_DEPTH = 64  # the job's own objects nest 5 levels at most; SQuAD's nested JSON 8
MAX_BYTES = 64 << 20  # a run.json pinning 100,000 data files is about 25 MB


class Unparsable(ValueError):
    """Not JSON, or JSON beyond the bounds: treated like any malformed object."""


def loads(raw: bytes | str, *, max_depth: int = MAX_DEPTH, max_bytes: int | None = MAX_BYTES):
    """The JSON value in ``raw``; ``Unparsable`` (a ValueError) when it is not JSON, nested deeper than
    ``max_depth`` or longer than ``max_bytes`` (None: a data file, whose size is the user's business)."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise Unparsable(f"larger than {max_bytes:,} bytes")
    try:
        doc = json.loads(raw)
    except RecursionError:  # the C scanner's own guard: far deeper than max_depth
        raise Unparsable(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise Unparsable(f"not valid JSON ({str(exc).splitlines()[0][:200]})") from None
    if depth(doc, max_depth) > max_depth:
        raise Unparsable(f"nested deeper than {max_depth} levels")
    return doc


def depth(value, limit: int) -> int:
    """How deep ``value``'s lists and objects nest (a scalar is 0), counted without recursion; stops past ``limit``."""
    deepest = 0
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level > limit:
            break
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest
