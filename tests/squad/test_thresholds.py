"""SQuAD v2's best no-answer thresholds equal the official v2.0 evaluation script's, on real v2 rows.

``official_best_thresholds`` below re-derives, from the public script's description, what
``evaluate-v2.0.py`` does with a ``--na-prob-file``: ``make_qid_to_has_ans`` and ``get_raw_scores``
over the nested dataset (gold answers that normalise to nothing count as ""), then
``find_best_thresh`` for exact and F1. It reads the nested SQuAD v2.0 JSON file the way the script
does; ``job.squad.metrics.best_thresholds`` gets the same questions through the job's own reader.
Predictions and no-answer scores are drawn from a seeded generator (gold answers, partial and wrong
spans of the context, empty answers; scores rounded so that ties occur).
"""
import collections
import json
import random
import re
import string
from pathlib import Path

import pytest

from job.formats import read_rows
from job.squad.metrics import best_thresholds

DATA = Path(__file__).resolve().parents[1] / "data"
ROOT = Path(__file__).resolve().parents[2]
# the shared samples sit beside the repository (CI's clone), or beside the worktrees' folder
SHARED = next((p / "shared" / "data" / "squad_v2_dev_sample.jsonl" for p in (ROOT.parent, ROOT.parent.parent)
               if (p / "shared" / "data" / "squad_v2_dev_sample.jsonl").is_file()), ROOT.parent / "shared" / "data" / "x")


# --- the official script's logic, written here --------------------------------------------------
def _normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _exact(gold, pred):
    return int(_normalize(gold) == _normalize(pred))


def _f1(gold, pred):
    gold_toks, pred_toks = _normalize(gold).split(), _normalize(pred).split()
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    same = sum(common.values())
    if not gold_toks or not pred_toks:
        return int(gold_toks == pred_toks)
    if same == 0:
        return 0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def official_best_thresholds(dataset, preds, na_probs):
    has_ans, exact_raw, f1_raw = {}, {}, {}
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qid = qa["id"]
                has_ans[qid] = bool(qa["answers"])
                golds = [a["text"] for a in qa["answers"] if _normalize(a["text"])] or [""]
                if qid not in preds:
                    continue
                exact_raw[qid] = max(_exact(g, preds[qid]) for g in golds)
                f1_raw[qid] = max(_f1(g, preds[qid]) for g in golds)

    def find_best_thresh(scores):
        num_no_ans = sum(1 for k in has_ans if not has_ans[k])
        cur = best = num_no_ans
        best_thresh = 0.0
        for qid in sorted(na_probs, key=lambda k: na_probs[k]):
            if qid not in scores:
                continue
            if has_ans[qid]:
                diff = scores[qid]
            else:
                diff = -1 if preds[qid] else 0
            cur += diff
            if cur > best:
                best, best_thresh = cur, na_probs[qid]
        return 100.0 * best / len(scores), best_thresh

    best_exact, exact_thresh = find_best_thresh(exact_raw)
    best_f1, f1_thresh = find_best_thresh(f1_raw)
    return {"best_exact": best_exact, "best_exact_thresh": exact_thresh, "best_f1": best_f1, "best_f1_thresh": f1_thresh}


# --- the comparison -----------------------------------------------------------------------------
def predictions_for(rows, seed):
    """Best-span answers as a model gives them (gold, a longer or shifted span, a wrong one, or nothing)
    and null differences with ties, in dataset order."""
    rng = random.Random(seed)
    preds, na = {}, {}
    for row in rows:
        context, golds = row["context"], row["answers"]
        pick = rng.random()
        if golds["text"] and pick < 0.45:
            start = golds["answer_start"][0]
            end = start + len(golds["text"][0]) + (rng.choice([0, 0, 6]))  # sometimes a few characters too many
            preds[row["id"]] = context[start:end]
        elif pick < 0.9:
            start = rng.randrange(max(len(context) - 30, 1))
            preds[row["id"]] = context[start:start + rng.randint(3, 30)]
        else:
            preds[row["id"]] = ""
        # a useful model: unanswerable questions tend to score higher; whole numbers tie often
        low, high = (-6, 2) if golds["text"] else (-2, 6)
        na[row["id"]] = rng.choice([-1.5, 0.5, 2.5]) if rng.random() < 0.4 else round(rng.uniform(low, high), 3)
    return preds, na


@pytest.mark.parametrize("path, seed", [(DATA / "squad_v2_dev_nested_small.json", seed) for seed in (0, 1, 2)]
                         + [(DATA / "squad_v2_dev_24.jsonl", seed) for seed in (0, 1, 2)] + [(SHARED, 0)])
def test_best_thresholds_equal_the_official_scripts(path, seed):
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    rows = list(read_rows(path, str(path)))[:2000]  # the shared sample's first 2,000 (of 6,000): a second, not five
    if path.suffix == ".json":  # the official file format: the script reads it as it is
        dataset = json.loads(path.read_text())["data"]
    else:  # JSON Lines rows, put in the official nesting
        dataset = [{"paragraphs": [{"qas": [{"id": r["id"], "answers": [{"text": t, "answer_start": a} for t, a in zip(
            r["answers"]["text"], r["answers"]["answer_start"])]} for r in rows]}]}]
    assert rows and any(not r["answers"]["text"] for r in rows) and any(r["answers"]["text"] for r in rows)
    preds, na = predictions_for(rows, seed)
    ours = best_thresholds(rows, preds, na)
    official = official_best_thresholds(dataset, preds, na)
    assert ours.keys() == official.keys()
    for key, value in official.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    # the search is not trivial here: some threshold beats answering nothing, and ties occurred
    assert ours["best_f1_thresh"] != 0.0 or ours["best_exact_thresh"] != 0.0
    assert len(set(na.values())) < len(na)


def test_answering_nothing_is_threshold_zero_as_in_the_script():
    rows = [{"id": "a", "answers": {"text": [], "answer_start": []}},
            {"id": "b", "answers": {"text": ["Paris"], "answer_start": [0]}}]
    found = best_thresholds(rows, {"a": "London", "b": "Rome"}, {"a": -1.0, "b": 2.0})
    assert found == {"best_exact": 50.0, "best_exact_thresh": 0.0, "best_f1": 50.0, "best_f1_thresh": 0.0}
    found = best_thresholds(rows, {"a": "London", "b": "Paris"}, {"a": 3.0, "b": 2.0})
    assert found["best_exact"] == 100.0 and found["best_exact_thresh"] == 2.0
