"""Durable state in object storage: the storage interface (``storage``: a local folder or S3), safe
names (``locations``), checkpoints committed by a marker (``checkpoints``, ``uploader``), the run
lease (``lease``), the verified feature cache (``feature_cache``), published models fetched back
(``models``) and what a run folder is bound to (``fingerprint``).
"""
