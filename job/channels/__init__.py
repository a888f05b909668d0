"""Nightly promotion: the channel pointer and its history (``channel``, ``pointer``), the night's plan
(``nightly``: skip-if-unchanged, warm start), the quality gate (``gate``, pure), the promotion by
compare-and-swap (``promotion``), the holder's model (``holder``), retention (``retention``) and
the operator's command line (``cli``, run as ``python -m job.channel``).
"""
