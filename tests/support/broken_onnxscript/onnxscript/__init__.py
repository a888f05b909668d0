"""A broken onnxscript, put first on a job's PYTHONPATH by tests/test_export.py: the exporter cannot load.

What an image without the package (or with one that does not match torch) looks like to the job.
"""
raise ImportError("onnxscript is broken here on purpose (tests/support/broken_onnxscript)")
