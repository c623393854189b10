"""span_selection.py: questions made without labels from WikiText's text."""
import random

import pytest

import span_selection


LINES = [
    " = Valkyria Chronicles III = \n",
    " \n",
    " The game began development in 2010 , carrying over a large portion of the work done on "
    "Valkyria Chronicles II . While it retained the standard features of the series , it also "
    "underwent multiple adjustments . The team wrote a role @-@ playing script of 1 @,@ 200 pages . \n",
    " Short line . \n",
]


@pytest.fixture
def short_contexts(monkeypatch):
    monkeypatch.setattr(span_selection, "MAX_WORDS", 30)


def test_questions_hold_their_answers(short_contexts):
    paras = span_selection.questions(LINES, seed=3)
    assert span_selection.questions(LINES, seed=3) == paras  # reproducible
    assert len(paras) == 2  # the heading is skipped; two contexts of whole sentences, <= 30 words
    assert all(len(p["context"].split()) <= 30 for p in paras)
    assert "role-playing" in paras[1]["context"] and "1,200" in paras[1]["context"]
    qas = [qa for p in paras for qa in p["qas"]]
    assert len(qas) == 3  # one per sentence of 8 to 40 words ("Short line ." has none)
    assert len({qa["id"] for qa in qas}) == 3
    for p in paras:
        for qa in p["qas"]:
            (text, start), = qa["answers"]
            assert p["context"][start:start + len(text)] == text
            words = qa["question"].split()
            assert words[0] in ("when", "how", "who", "what") and words[-1] == "?"
            assert text not in " ".join(words[1:])  # the question lacks what it asks for
    kinds = {qa["answers"][0][0]: qa["question"].split()[0] for qa in qas}
    for text, wh in kinds.items():
        if text in ("2010", "1,200"):
            assert wh == {"2010": "when", "1,200": "how"}[text]
    others = span_selection.questions(LINES, seed=4)
    assert [p["context"] for p in others] == [p["context"] for p in paras]
    assert others != paras  # another seed: other questions from the same contexts


def test_mixed_answers_are_names_phrases_and_words():
    rng = random.Random(0)
    words = "In 1990 the Royal Navy sent a small fleet of armed ships to the Baltic Sea .".split()
    spans = [span_selection._mixed_answer(words, rng) for _ in range(400)]
    texts = {" ".join(words[i:j]) for i, j in spans}
    assert all(0 < i < j <= len(words) - 1 for i, j in spans)  # never the first word or the mark
    named = {"1990", "Royal Navy", "Baltic Sea"}
    assert named <= texts and "the Royal Navy" in texts and "small fleet" in texts
    phrases = [t for t in texts if t not in named and " " in t]
    assert all(t.split()[-1].isalpha() and len(t.split()) <= 5 for t in phrases)
    share = sum(" ".join(words[i:j]) in named for i, j in spans) / len(spans)
    assert 0.3 < share < 0.5  # four in ten
    assert span_selection._mixed_answer("and so it was .".split(), rng) is None


@pytest.mark.parametrize("sentence", [
    "In 1990 the Royal Navy sent a small fleet of armed ships to the Baltic Sea .",
    "The band , formed in Leeds , released the album Third Light , an early record .",
    "It was a very long and hard winter for all the people in the northern valleys",
])
def test_phrases_are_every_span_the_definition_allows(sentence):
    words = sentence.split()
    content = [span_selection._content(w) for w in words]
    defined = [(k, k + n) for k in range(1, len(words)) for n in range(2, 6)
               if k + n <= len(words) and all(w.isalnum() for w in words[k:k + n])
               and (content[k] or words[k].lower() in ("the", "a", "an")) and content[k + n - 1]]
    assert span_selection._phrases(words, content) == defined and defined


def test_question_words_stay_inside_the_sentence(monkeypatch):
    monkeypatch.setattr(span_selection, "WINDOW", (4, 6))
    rng = random.Random(0)
    body = "a b c d e f g h".split()
    for i, j in [(0, 1), (7, 8), (3, 5)]:
        for _ in range(50):
            kept = span_selection._question_words(body, i, j, rng)
            assert 4 <= len(kept) <= 6 and body[i] not in kept
            assert kept == [w for w in body if w in kept]  # a run, around the answer


def test_contexts_for_a_subword_tokenizer(short_contexts):
    """With unk (WordPiece's [UNK]), WikiText's <unk> becomes that token in the contexts and
    is left out of the questions; everything else is as with the words' <unk>."""
    lines = [line.replace("Chronicles II", "<unk> II") for line in LINES]
    words, pieces = (span_selection.questions(lines, seed=3, unk=u) for u in ("<unk>", "[UNK]"))
    assert "<unk> II" in words[0]["context"] and "[UNK] II" in pieces[0]["context"]
    for a, b in zip(words, pieces):
        assert a["context"].replace("<unk>", "[UNK]") == b["context"]
        for qa, qb in zip(a["qas"], b["qas"]):
            assert qa["question"] == qb["question"] and "[UNK]" not in qb["question"]
            assert qa["answers"] == qb["answers"]  # the same length: no offset moves
