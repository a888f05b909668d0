"""The work dir's temporary files: named for the process that owns them.

Every temporary file or folder the job makes is named ``.<name>.<owner>.<pid>-<n>.tmp``
(``temp_path``), ``<owner>`` a token of the process that made it (its forked workers share it).
Two processes never write one temporary name, whatever path they write to: runs sharing a work
dir once downloaded under one ``.<name>.part``, and one of them crashed.
"""
from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path

_OWNER = uuid.uuid4().hex[:16]  # this process's; a forked worker inherits it
_count = itertools.count()


def owner() -> str:
    return _OWNER


def temp_path(path: Path) -> Path:
    """A temporary name beside ``path``, this process's own: ``.<name>.<owner>.<pid>-<n>.tmp``."""
    return path.with_name(f".{path.name}.{_OWNER}.{os.getpid()}-{next(_count)}.tmp")
