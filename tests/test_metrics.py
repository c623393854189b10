"""Hand-worked checks of metrics.py (official SQuAD v1.1 + original token metrics)."""
import pytest

from metrics import (compute_qa_exact, compute_qa_f1, exact_match_score, f1_score,
                     metric_max_over_ground_truths, normalize_answer, squad_evaluate)


# --- normalize_answer -------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("The  Cat, sat!", "cat sat"),
    ("an apple a day", "apple day"),
    ("The theatre", "theatre"),          # article inside a word is kept
    ("Anthem of an era", "anthem of era"),
    ("U.S.-born", "usborn"),             # punctuation removed, not spaced
    ("  A  ", ""),
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_order_punctuation_before_articles():
    # "the," only becomes a bare article after punctuation is removed.
    assert normalize_answer("the,cat") == "thecat"
    assert normalize_answer("the, cat") == "cat"


# --- exact / f1 ----------------------------------------------------------------

def test_exact_match():
    assert exact_match_score("the Eiffel Tower.", "Eiffel Tower")
    assert not exact_match_score("Tower", "Eiffel Tower")


def test_f1_hand_worked():
    # common = {eiffel, tower}: P = 2/3, R = 2/2 -> F1 = 2*(2/3)/(5/3) = 0.8
    assert f1_score("eiffel tower paris", "the eiffel tower") == pytest.approx(0.8)
    assert f1_score("Eiffel Tower!", "the eiffel tower") == pytest.approx(1.0)
    assert f1_score("Paris", "Eiffel Tower") == 0.0


def test_f1_counts_repeated_tokens_once_each():
    # "b b b" vs "b": Counter intersection gives 1 common, P = 1/3, R = 1 -> F1 = 0.5
    assert f1_score("b b b", "b") == pytest.approx(0.5)


def test_empty_prediction_scores_zero():
    assert not exact_match_score("", "Eiffel Tower")
    assert f1_score("", "Eiffel Tower") == 0.0
    assert f1_score("the", "Eiffel Tower") == 0.0   # normalises to empty


def test_max_over_ground_truths():
    truths = ["blue car", "big red house"]
    # second truth: common 2, P = 2/2, R = 2/3 -> F1 = 0.8
    assert metric_max_over_ground_truths(f1_score, "red house", truths) == pytest.approx(0.8)
    assert not metric_max_over_ground_truths(exact_match_score, "red house", truths)
    assert metric_max_over_ground_truths(exact_match_score, "Red house.",
                                         ["house", "the red house"])


# --- squad_evaluate ------------------------------------------------------------

def _qa(qid, *texts):
    return {"id": qid, "question": "?",
            "answers": [{"text": t, "answer_start": 0} for t in texts]}


def test_squad_evaluate_counts_missing_as_zero():
    dataset = [
        {"title": "A", "paragraphs": [
            {"context": "...", "qas": [_qa("q1", "Eiffel Tower", "the tower"),
                                       _qa("q2", "the eiffel tower")]}]},
        {"title": "B", "paragraphs": [{"context": "...", "qas": [_qa("q3", "Paris")]}]},
    ]
    predictions = {"q1": "the Eiffel Tower.", "q2": "eiffel tower paris"}
    result = squad_evaluate(dataset, predictions)
    assert result["total"] == 3
    assert result["missing"] == 1
    assert result["exact_match"] == pytest.approx(100.0 * 1 / 3)
    assert result["f1"] == pytest.approx(100.0 * (1.0 + 0.8 + 0.0) / 3)


def test_squad_evaluate_empty():
    assert squad_evaluate([], {}) == {"exact_match": 0.0, "f1": 0.0, "total": 0, "missing": 0}


# --- original token-level metrics ---------------------------------------------------

def test_token_exact_normalises_but_f1_does_not():
    samples = [([["cat"]], ["The", "Cat"])]
    assert compute_qa_exact(samples) == pytest.approx(100.0)   # "the cat" -> "cat"
    assert compute_qa_f1(samples) == 0.0                      # "Cat" != "cat" raw
    # ["The", "cat"] vs ["cat"]: common 1, P = 1/2, R = 1 -> F1 = 2/3
    assert compute_qa_f1([([["cat"]], ["The", "cat"])]) == pytest.approx(200.0 / 3)


def test_token_metrics_docstring_example():
    samples = [([["this", "is", "an", "example"], ["an", "example"]], ["example"])]
    assert compute_qa_exact(samples) == pytest.approx(100.0)   # "an example" -> "example"
    # first truth: P = 1, R = 1/4 -> 0.4; second: P = 1, R = 1/2 -> 2/3; max = 2/3
    assert compute_qa_f1(samples) == pytest.approx(200.0 / 3)


def test_token_f1_empty_lists():
    assert compute_qa_f1([([[]], [])]) == pytest.approx(100.0)
    assert compute_qa_f1([([["cat"]], [])]) == 0.0
    assert compute_qa_f1([([[]], ["cat"])]) == 0.0


def test_token_metrics_average_over_samples():
    samples = [([["cat"]], ["The", "cat"]), ([["dog"]], ["cat"])]
    assert compute_qa_exact(samples) == pytest.approx(50.0)
    assert compute_qa_f1(samples) == pytest.approx(100.0 * (2 / 3 + 0.0) / 2)


def test_token_metrics_empty_input():
    assert compute_qa_exact([]) == 0.0
    assert compute_qa_f1([]) == 0.0
