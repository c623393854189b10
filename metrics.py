"""Question-answering metrics for the BERT SQuAD v1.1 fine-tuning example.

Two families of metrics live here:

* ``compute_qa_exact`` / ``compute_qa_f1`` keep the token-level metrics of the
  original torchtext BERT example (same signatures, same semantics).
* ``normalize_answer``, ``exact_match_score``, ``f1_score``,
  ``metric_max_over_ground_truths`` and ``squad_evaluate`` reproduce the
  numbers of the official SQuAD v1.1 evaluation script (evaluate-v1.1.py),
  working on answer text rather than tokens.

Standard library only.
"""

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


# ---------------------------------------------------------------------------
# Official SQuAD v1.1 text metrics
# ---------------------------------------------------------------------------

def normalize_answer(s):
    """Lower-case, drop punctuation, blank out articles, collapse whitespace.

    The steps run in the official order: lower -> punctuation -> articles ->
    whitespace.
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction, ground_truth):
    """True when the normalised prediction equals the normalised truth."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def _overlap_f1(pred_tokens, truth_tokens):
    """Harmonic mean of token precision and recall (0 when nothing overlaps)."""
    common = Counter(pred_tokens) & Counter(truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction, ground_truth):
    """Token-overlap F1 between the normalised prediction and truth."""
    return _overlap_f1(normalize_answer(prediction).split(),
                       normalize_answer(ground_truth).split())


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    """Best score of ``metric_fn(prediction, gt)`` over all ground truths."""
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def score_answers(questions, predictions):
    """Official v1.1 scores of ``predictions`` ({question id: answer text}) for
    ``questions``, an iterable of (id, [ground-truth answer texts]).

    Every question counts; one with no prediction scores 0 for both metrics (the
    official script prints a message, here the count is returned as "missing").
    Returns percentages averaged over all questions.
    """
    exact = f1 = 0.0
    total = missing = 0
    for qid, truths in questions:
        total += 1
        if qid not in predictions:
            missing += 1
            continue
        prediction = predictions[qid]
        exact += metric_max_over_ground_truths(exact_match_score, prediction, truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, truths)
    if total == 0:
        return {"exact_match": 0.0, "f1": 0.0, "total": 0, "missing": 0}
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total,
            "total": total, "missing": missing}


def squad_evaluate(dataset, predictions):
    """Score ``predictions`` ({question id: answer text}) against ``dataset``, the list
    under the SQuAD JSON's "data" key, as evaluate-v1.1.py does (see score_answers)."""
    return score_answers(((qa["id"], [answer["text"] for answer in qa["answers"]])
                          for article in dataset for paragraph in article["paragraphs"]
                          for qa in paragraph["qas"]), predictions)


# ---------------------------------------------------------------------------
# Token-level metrics of the original torchtext example
# ---------------------------------------------------------------------------

def _token_f1(truth_tokens, pred_tokens):
    """Original example's F1 on raw (un-normalised) token lists."""
    if not truth_tokens or not pred_tokens:
        return float(truth_tokens == pred_tokens)
    return _overlap_f1(pred_tokens, truth_tokens)


def compute_qa_exact(ans_pred_tokens_samples):
    """Exact-match percentage over ``(ground_truth_token_lists, pred_tokens)``.

    Tokens are joined with spaces and passed through ``normalize_answer``
    before comparison; each sample takes its best ground truth.
    """
    if not ans_pred_tokens_samples:
        return 0.0
    hits = 0
    for truths, pred_tokens in ans_pred_tokens_samples:
        pred = normalize_answer(" ".join(pred_tokens))
        hits += max(int(normalize_answer(" ".join(t)) == pred) for t in truths)
    return 100.0 * hits / len(ans_pred_tokens_samples)


def compute_qa_f1(ans_pred_tokens_samples):
    """F1 percentage over ``(ground_truth_token_lists, pred_tokens)`` samples.

    As in the original example, F1 works on the raw token lists WITHOUT
    normalisation (case and punctuation matter). Both lists empty -> 1,
    exactly one empty -> 0. Each sample takes its best ground truth.
    """
    if not ans_pred_tokens_samples:
        return 0.0
    total = 0.0
    for truths, pred_tokens in ans_pred_tokens_samples:
        total += max(_token_f1(t, pred_tokens) for t in truths)
    return 100.0 * total / len(ans_pred_tokens_samples)
