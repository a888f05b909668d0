"""Answer decoding: from per-window start/end logits back to answer text, by the n-best rules.

Pure functions over logits and character offsets: no model, tokenizer or I/O, so evaluation and
the answering entry point decode identically and tests can drive them with hand-made numbers.

Non-finite logits (a diverged run, an fp16 overflow) are handled by one rule, not by whatever
``argsort`` and ``min`` happen to do with them:

- NaN means "no evidence": it counts as -inf, so it never takes an n-best slot from a number,
  never becomes the answer and never becomes the null score (left alone, ``argsort`` ranks NaN
  *first* and it crowded real candidates out of the n-best).
- +inf and -inf are ordinary, extreme scores: +inf beats every number, -inf never qualifies (a span
  must beat -inf strictly). A span or null score of ``+inf + -inf`` is NaN and counts as -inf.
- An example whose every candidate is non-finite gets the empty answer, as one with no window does.

Finite logits decode exactly as before (same n-best, same tie-breaking); ``count_nonfinite`` lets
the caller report how many windows needed the rule.
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
        start_logits, end_logits = _no_nan(start_logits), _no_nan(end_logits)
        offsets = np.asarray(offsets).reshape(-1, 2)
        n = min(len(start_logits), len(offsets))
        null_score = min(null_score, _sum(start_logits[cls_index], end_logits[cls_index]))
        starts = np.argsort(start_logits[:n])[::-1][:n_best]
        ends = np.argsort(end_logits[:n])[::-1][:n_best]
        for s in starts:
            if offsets[s][0] < 0:
                continue
            for e in ends:
                if offsets[e][0] < 0 or e < s or e - s + 1 > max_answer_length:
                    continue
                score = _sum(start_logits[s], end_logits[e])
                if score > best_score:
                    best_score, best_span = score, (int(offsets[s][0]), int(offsets[e][1]))
    if best_span is None or (version_2 and null_score - best_score > null_threshold):
        return Answer("", -1, -1, best_score, null_score)
    return Answer(context[best_span[0]:best_span[1]], best_span[0], best_span[1], best_score, null_score)


def _no_nan(logits) -> np.ndarray:
    """The logits with NaN replaced by -inf; finite arrays pass through untouched (no copy)."""
    logits = np.asarray(logits)
    nan = np.isnan(logits)
    return np.where(nan, -np.inf, logits) if nan.any() else logits


def _sum(a, b) -> float:
    total = float(a + b)
    return -np.inf if total != total else total  # +inf + -inf is NaN: no evidence, as NaN itself


def count_nonfinite(start_logits, end_logits, lengths: Sequence[int]) -> int:
    """Windows with a NaN or infinite logit among their first ``lengths[i]`` positions (the rest is padding)."""
    count = 0
    for start, end, n in zip(start_logits, end_logits, lengths):
        if not (np.isfinite(start[:n]).all() and np.isfinite(end[:n]).all()):
            count += 1
    return count


def decode_all(rows: Sequence[dict], example_index: Sequence[int], offsets: Sequence, start_logits, end_logits,
               **options) -> dict[str, str]:
    """``{id: answer text}`` for every example; windows are grouped by their example index."""
    return {rid: answer.text for rid, answer in decode_answers(rows, example_index, offsets, start_logits, end_logits,
                                                               **options).items()}


def decode_answers(rows: Sequence[dict], example_index: Sequence[int], offsets: Sequence, start_logits, end_logits,
                   **options) -> dict[str, Answer]:
    """``{id: Answer}`` for every example; windows are grouped by their example index.

    With ``version_2=False`` (whatever the data) each answer is the best span, which SQuAD v2's
    threshold search needs: ``no_answer_text`` then gives the text any threshold would answer.
    """
    by_example: dict[int, list[int]] = {}
    for feature, ex in enumerate(example_index):
        by_example.setdefault(int(ex), []).append(feature)
    answers = {}
    for ex, row in enumerate(rows):
        windows = ((start_logits[f], end_logits[f], offsets[f]) for f in by_example.get(ex, []))
        answers[row["id"]] = decode_answer(windows, row["context"], **options)
    return answers


def null_difference(answer: Answer) -> float:
    """SQuAD v2's no-answer score of a best-span answer: null score minus the best span's (the official
    script's ``na_prob``; higher means "rather no answer"). No span at all is +inf; NaN counts as +inf."""
    diff = answer.null_score - answer.score
    return np.inf if diff != diff else float(diff)


def no_answer_text(answer: Answer, null_threshold: float) -> str:
    """The v2 answer of a best-span answer at ``null_threshold``: empty when the null difference exceeds it,
    exactly the rule ``decode_answer(version_2=True)`` applies."""
    return "" if answer.start < 0 or answer.null_score - answer.score > null_threshold else answer.text
