"""Extractive question answering itself, pure where it can be: stride windows and span labels
(``features``), n-best answer decoding (``decoding``), the official EM/F1 (``metrics``), and the
model-over-a-context answerer that evaluation's decoding serves (``answer``). Nothing here reads
settings, storage or logs of the job; every function takes what it needs as arguments.
"""
