"""Answer decoding: from per-window start/end logits back to answer text, by the n-best rules.

Pure functions over logits and character offsets: no model, tokenizer or I/O, so evaluation and
the answering entry point decode identically and tests can drive them with hand-made numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offsets into the context; -1 when empty
    end: int
    score: float  # start + end logit of the best span; -inf when no span qualified
    null_score: float  # smallest CLS (no answer) score over the example's windows


def decode_answer(windows: Iterable[tuple[Sequence[float], Sequence[float], Sequence[Sequence[int]]]], context: str,
                  n_best: int = 20, max_answer_length: int = 30, version_2: bool = False,
                  null_threshold: float = 0.0, cls_index: int = 0) -> Answer:
    """Best answer over all windows of one example.

    Each window is ``(start_logits, end_logits, offsets)``; offsets are character ``[start, end]``
    for context tokens and negative for everything else (question, special, padding), so only
    context spans can be chosen. Under SQuAD v2 the answer is empty when the best null score beats
    the best span by more than ``null_threshold``.
    """
    best_score, best_span, null_score = -np.inf, None, np.inf
    for start_logits, end_logits, offsets in windows:
        start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
        offsets = np.asarray(offsets).reshape(-1, 2)
        n = min(len(start_logits), len(offsets))
        null_score = min(null_score, float(start_logits[cls_index] + end_logits[cls_index]))
        starts = np.argsort(start_logits[:n])[::-1][:n_best]
        ends = np.argsort(end_logits[:n])[::-1][:n_best]
        for s in starts:
            if offsets[s][0] < 0:
                continue
            for e in ends:
                if offsets[e][0] < 0 or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(start_logits[s] + end_logits[e])
                if score > best_score:
                    best_score, best_span = score, (int(offsets[s][0]), int(offsets[e][1]))
    if best_span is None or (version_2 and null_score - best_score > null_threshold):
        return Answer("", -1, -1, best_score, null_score)
    return Answer(context[best_span[0]:best_span[1]], best_span[0], best_span[1], best_score, null_score)


def decode_all(rows: Sequence[dict], example_index: Sequence[int], offsets: Sequence, start_logits, end_logits,
               **options) -> dict[str, str]:
    """``{id: answer text}`` for every example; windows are grouped by their example index."""
    by_example: dict[int, list[int]] = {}
    for feature, ex in enumerate(example_index):
        by_example.setdefault(int(ex), []).append(feature)
    predictions = {}
    for ex, row in enumerate(rows):
        windows = ((start_logits[f], end_logits[f], offsets[f]) for f in by_example.get(ex, []))
        predictions[row["id"]] = decode_answer(windows, row["context"], **options).text
    return predictions
