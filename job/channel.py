"""``python -m job.channel COMMAND --output URI --channel NAME``: the operator's command line for channels.

The documented entry point stays here; the commands live in ``job.channels.cli`` and the channel
store in ``job.channels``.
"""
from __future__ import annotations

import sys

from job.channels.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
