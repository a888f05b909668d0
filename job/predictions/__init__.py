"""Batch predictions (``python -m job.predict``): settings, chunks, scoring, output binding and the shard's run."""

# how a stopped shard resumes: said by its stop (job.predictions.run) and by the grace period's watchdog (job.predict)
RERUN = "rerun with the same settings: it resumes at the first uncommitted chunk"
