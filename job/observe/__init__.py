"""What people and trackers see: log lines (``logs`` JSON, ``textlog`` text, ``records``), the
one-line error (``console``), redaction of secrets (``redaction``), which trackers run
(``trackers``) and TensorBoard's event files (``tracking``), EM/F1 during training
(``periodic_eval``), the curves image, the model card and the closing summary (``curves``,
``model_card``, ``summary``).
"""
