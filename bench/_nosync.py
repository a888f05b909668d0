"""The job with checkpoint saves but no sync to storage: the uploader drops every checkpoint.

Only for checkpoint_cost.py's "sync off" variant, so that "on" and "off" differ by the sync alone
(background hashing, upload, commit and pruning), not by the Trainer's local saves.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import job.store.checkpoints  # noqa: E402

job.store.checkpoints.Uploader.submit = lambda self, step, folder: None

from job.__main__ import main  # noqa: E402

sys.exit(main())
