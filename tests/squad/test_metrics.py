"""EM/F1 by the official SQuAD v1.1 and v2.0 rules."""
import pytest

from job.squad.metrics import f1, normalize_answer, squad_scores


@pytest.mark.parametrize("raw, expected", [
    ("The Denver Broncos!", "denver broncos"),
    ("  a  tale of   an apple ", "tale of apple"),
    ("Theory", "theory"),  # 'the' only as a whole word
    ("“quoted” – dash", "“quoted” – dash"),  # Unicode punctuation is kept
])
def test_normalize(raw, expected):
    assert normalize_answer(raw) == expected


def test_f1_partial_overlap():
    assert f1("Denver Broncos team", "the Denver Broncos") == pytest.approx(0.8)


def rows(*specs):
    return [{"id": i, "answers": {"text": list(golds), "answer_start": [0] * len(golds)}} for i, golds in specs]


def test_v1_max_over_golds_and_missing_counts_as_wrong():
    data = rows(("q1", ["February 7", "February 7, 2016"]), ("q2", ["Santa Clara"]))
    scores = squad_scores(data, {"q1": "February 7, 2016"})
    assert scores["exact_match"] == pytest.approx(50.0) and scores["f1"] == pytest.approx(50.0)
    assert scores["total"] == 2


def test_v2_empty_gold_and_skips_missing():
    data = rows(("q1", []), ("q2", ["Normandy"]), ("q3", ["France"]))
    scores = squad_scores(data, {"q1": "", "q2": "in Normandy"}, version_2=True)
    assert scores["total"] == 2
    assert scores["NoAns_exact"] == 100.0 and scores["HasAns_exact"] == 0.0
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_v1_empty_prediction_on_empty_normalised_gold_scores_zero_f1():
    assert squad_scores(rows(("q", ["the"])), {"q": ""})["f1"] == 0.0


@pytest.mark.parametrize("version_2", [False, True])
def test_per_example_scores_average_to_the_official_scores(version_2):
    from job.squad.metrics import per_example_scores

    data = rows(("q1", ["February 7", "February 7, 2016"]), ("q2", ["Santa Clara"]), ("q3", []), ("q4", ["Denver Broncos"]))
    if not version_2:
        data = [r for r in data if r["answers"]["text"]]
    predictions = {"q1": "February 7, 2016", "q3": "", "q4": "the Broncos of Denver"}
    official = squad_scores(data, predictions, version_2=version_2)
    each = per_example_scores(data, predictions, version_2=version_2)
    assert len(each) == official["total"]
    for metric in ("exact_match", "f1"):
        assert sum(s[metric] for s in each.values()) / len(each) == pytest.approx(official[metric])
    assert each["q1"] == {"exact_match": 100.0, "f1": 100.0}
    assert ("q2" in each) is (not version_2)  # v1.1 counts a missing prediction as 0, v2.0 leaves it out


def test_v2_answers_that_normalise_to_nothing_are_still_answerable():
    """The official v2.0 script splits HasAns/NoAns on the raw answers, and scores such a question against ""."""
    data = rows(("q1", ["the", "."]), ("q2", []), ("q3", ["Normandy"]))
    scores = squad_scores(data, {"q1": "", "q2": "", "q3": "Normandy"}, version_2=True)
    assert (scores["HasAns_total"], scores["NoAns_total"]) == (2, 1)
    assert scores["HasAns_exact"] == 100.0 and scores["exact_match"] == 100.0  # "" matches the emptied gold
