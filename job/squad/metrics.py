"""SQuAD exact match and F1 by the official v1.1 / v2.0 evaluation rules, offline.

Normalisation: lower-case, drop ASCII punctuation, drop the words a/an/the, collapse whitespace.
Scores are the maximum over the gold answers, averaged over questions, times 100.
"""
from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, empty_matches_empty: bool = False) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        # v2.0 scores an empty prediction for an empty gold as a match; v1.1 has no special case
        return float(empty_matches_empty and pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _scored(rows, predictions: dict[str, str], version_2: bool):
    """``(id, exact, f1, has_answer)`` for each question the official rules count, scores 0-1."""
    for row in rows:
        rid = row["id"]
        # answerable means "has gold answers", before normalisation: the official v2.0 script
        # (make_qid_to_has_ans) counts a question whose answers all normalise to nothing, like
        # ["the", "."], as HasAns, although it scores it against "" as it does a NoAns question
        has_answer = bool(row["answers"]["text"])
        if version_2:
            golds = [t for t in row["answers"]["text"] if normalize_answer(t)] or [""]
            if rid not in predictions:
                continue  # v2.0 skips questions without a prediction
        else:
            golds = row["answers"]["text"]
        pred = predictions.get(rid)
        if pred is None:
            yield rid, 0.0, 0.0, has_answer  # v1.1 counts a missing prediction as wrong
        else:
            yield (rid, max(exact(pred, g) for g in golds),
                   max(f1(pred, g, empty_matches_empty=version_2) for g in golds), has_answer)


def squad_scores(rows, predictions: dict[str, str], version_2: bool = False) -> dict:
    """Official scores for ``rows`` (SQuAD rows with ``answers``) and ``{id: text}`` predictions."""
    totals = ScoreTotals(version_2)
    totals.add(rows, predictions)
    return totals.scores()


class ScoreTotals:
    """``squad_scores`` a part at a time: rows and their predictions added in order give the very same numbers
    (the same sums in the same order) without every prediction held at once (``job.predict``'s merge)."""

    def __init__(self, version_2: bool = False):
        self.version_2 = version_2
        self.em_total = self.f1_total = 0.0
        self.counted = 0
        self.buckets = {"HasAns": [0.0, 0.0, 0], "NoAns": [0.0, 0.0, 0]}

    def add(self, rows, predictions: dict[str, str]) -> None:
        for _, em, f, has_answer in _scored(rows, predictions, self.version_2):
            self.em_total, self.f1_total, self.counted = self.em_total + em, self.f1_total + f, self.counted + 1
            if self.version_2:
                b = self.buckets["HasAns" if has_answer else "NoAns"]
                b[0], b[1], b[2] = b[0] + em, b[1] + f, b[2] + 1

    def scores(self) -> dict:
        counted = self.counted
        scores = {"exact_match": 100.0 * self.em_total / max(counted, 1), "f1": 100.0 * self.f1_total / max(counted, 1),
                  "total": counted}
        if self.version_2:
            for name, (e, f, n) in self.buckets.items():
                scores.update({f"{name}_exact": 100.0 * e / n if n else 0.0, f"{name}_f1": 100.0 * f / n if n else 0.0,
                               f"{name}_total": n})
        return scores


def per_example_scores(rows, predictions: dict[str, str], version_2: bool = False) -> dict[str, dict[str, float]]:
    """``{id: {"exact_match", "f1"}}`` (0-100) for each question ``squad_scores`` counts, by the same rules.

    The mean of each column equals the ``squad_scores`` value (v2.0 leaves out questions without a
    prediction; v1.1 counts them as 0). The quality gate pairs these per question.
    """
    return {rid: {"exact_match": 100.0 * em, "f1": 100.0 * f} for rid, em, f, _ in _scored(rows, predictions, version_2)}


def best_thresholds(rows, best_spans: dict[str, str], null_differences: dict[str, float]) -> dict:
    """SQuAD v2's best no-answer thresholds, as the official v2.0 script's ``find_best_thresh`` finds them.

    ``best_spans`` is each question's best-span answer (what it says when it must answer) and
    ``null_differences`` its null score minus that span's score (the script's ``na_prob``: a
    question is answered "" when it exceeds the threshold). The search starts with every question
    answered "" (each unanswerable one right), then takes the questions in increasing
    ``null_differences`` order (a stable sort: ties keep this order, as the script's ``sorted`` over
    its dict keeps the file's), answering each: an answerable one adds its score, an unanswerable
    one loses 1 if its best span is not empty; the best running total and the null difference at
    which it was reached are the result (0.0 when answering nothing is best). Returns
    ``best_exact``, ``best_exact_thresh``, ``best_f1``, ``best_f1_thresh`` (scores in points over
    the questions with a prediction, as the script's).
    """
    rows = [{"id": row["id"], "answers": row["answers"]} for row in rows]  # read once: rows may be a generator
    scored = list(_scored(rows, best_spans, version_2=True))
    has_answer = {row["id"]: bool(row["answers"]["text"]) for row in rows}
    no_answer = sum(1 for v in has_answer.values() if not v)
    order = sorted(null_differences, key=lambda rid: null_differences[rid])
    out = {}
    for column, name in ((1, "exact"), (2, "f1")):
        raw = {item[0]: item[column] for item in scored}
        current = best = float(no_answer)
        threshold = 0.0
        for rid in order:
            if rid not in raw:
                continue
            current += raw[rid] if has_answer[rid] else (-1.0 if best_spans[rid] else 0.0)
            if current > best:
                best, threshold = current, null_differences[rid]
        out[f"best_{name}"] = 100.0 * best / max(len(raw), 1)
        out[f"best_{name}_thresh"] = threshold
    return out
