"""Span-selection questions, made without labels from running text: the pretraining
task between next sentence and SQuAD (span_task.py).

    train = questions_of(path, tokenizer, bptt=128, seed=0)   # in read_squad's form

From each sentence of 8 to 40 words one span is taken away, of the kinds SQuAD asks
for in about its proportions (a name, date or amount; a phrase; a word); the question
is a wh-word for its kind and 6 to 12 of the sentence's words beside the span, a tenth of
them dropped, and the answer is the span in its context of up to 110 words of a section.
Another seed makes other questions from the same text.
"""
import random
import re

import corpus
from data import DataError

_SKIP = frozenset(
    "the a an of in on at to and or for by with from as is was were be been are it its this that "
    "which who he she they his her their also but not had has have after before during into than "
    "then there these those when while where would could can may does did will should being such "
    "some other more most only both each over through about between within without however "
    "although because against under until upon very many much what them whom whose onto made "
    "make first later several".split())
_MONTHS = frozenset("January February March April May June July August September October "
                    "November December".split())
_NUMBER = re.compile(r"[0-9][0-9,.]*")


def _named_runs(words):
    """The runs (i, j) of up to four capitalised words or numbers of a sentence, not at
    its start: the names, dates and amounts SQuAD asks about."""
    def named(w):
        return bool(_NUMBER.fullmatch(w)) or (len(w) > 1 and w[:1].isupper() and w.isalpha()
                                              and w.lower() not in _SKIP)
    runs, i = [], 1
    while i < len(words):
        if named(words[i]):
            j = i + 1
            while j < len(words) and j - i < 4 and named(words[j]):
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def _content(w):
    return w.isalpha() and len(w) > 3 and w.lower() not in _SKIP


def _mixed_answer(words, rng):
    """(i, j): an answer span of words, of the kinds SQuAD asks for in about its
    proportions, or None: a named run (_named_runs) four times in ten; three and a half
    times a phrase of 2 to 5 words without punctuation, from a content word or an article
    to a content word ("the standard features", "multiple adjustments"); else a content
    word. Where a sentence has none of the kind drawn, the next kind of that order."""
    content = [_content(w) for w in words]
    named, phrases = _named_runs(words), _phrases(words, content)
    singles = [(k, k + 1) for k in range(1, len(words)) if content[k]]
    r = rng.random()
    for kind in ([named, phrases, singles] if r < 0.4 else
                 [phrases, singles, named] if r < 0.75 else [singles, phrases, named]):
        if kind:
            return rng.choice(kind)
    return None


def _phrases(words, content):
    """The spans (k, k + n) of 2 to 5 alphanumeric words, not at the sentence's start, from
    a content word or an article to a content word, by k then n; content: _content of
    each word."""
    alnum = [w.isalnum() for w in words]
    phrases = []
    for k in range(1, len(words)):
        if not (content[k] or words[k].lower() in ("the", "a", "an")):
            continue
        for n in range(2, min(5, len(words) - k) + 1):
            if not alnum[k + n - 1]:
                break  # and so every longer one
            if content[k + n - 1]:  # (words[k], a content word or an article, is alphanumeric)
                phrases.append((k, k + n))
    return phrases


def _wh_word(answer):
    first = answer[0]
    if re.fullmatch(r"1[0-9]{3}|20[0-9]{2}", first) or first in _MONTHS:
        return "when"
    if _NUMBER.fullmatch(first):
        return "how many"
    return "who" if first[:1].isupper() else "what"


def _question_words(body, i, j, rng):
    """The words of body (a sentence without its end mark) that a question keeps around
    its answer body[i:j]: a run of WINDOW words beside the answer, some before it and the
    rest after it, as far as the sentence goes."""
    n = rng.randint(*WINDOW)
    before = rng.randint(0, n)
    after = n - before
    if before > i:  # the sentence starts too soon: take the rest after the answer
        after += before - i
        before = i
    if j + after > len(body):  # it ends too soon: take the rest before the answer
        before = min(i, before + j + after - len(body))
        after = len(body) - j
    return body[i - before:i] + body[j:j + after]


# As long as SQuAD's questions (10 words on average, half of them from the answer's
# sentence), in contexts as long as its paragraphs (110 words, median).
WINDOW = (6, 12)  # words of the question beside the answer
DROP = 0.1  # the chance of each of them to be left out
MAX_WORDS = 110  # of a context


def _passages(lines, unk):
    """The sentences (word lists) of all the paragraphs between two headings of WikiText
    lines."""
    sentences = []
    for line in lines:
        line = line.strip()
        if line.startswith("="):  # a heading ends a passage
            if sentences:
                yield sentences
            sentences = []
        if not line or line.startswith("="):
            continue
        line = corpus.wikitext_plain(line)
        if unk != "<unk>":
            line = line.replace("<unk>", unk)
        current = []
        for word in line.split():
            current.append(word)
            if word in (".", "!", "?"):
                sentences.append(current)
                current = []
        if current:
            sentences.append(current)
    if sentences:
        yield sentences


def questions(lines, seed=0, unk="<unk>"):
    """Questions without labels from running text, in read_squad's form. lines: WikiText
    lines (a line is a paragraph; headings, ' = Title = ', end a section; ' @-@ ', ' @,@ ',
    ' @.@ ' are joined back). The paragraphs of a section, one after the other, are cut
    into contexts of whole sentences, up to MAX_WORDS words. From every sentence of 8 to
    40 words one answer span is taken (_mixed_answer); its question is a wh-word for the
    span's kind (when, how many, who, what) followed by WINDOW words of the sentence
    beside the span, each dropped with probability DROP and `<unk>` words left out, so
    that the model must find the sentence by its words and pick what the question lacks,
    as in SQuAD. The same lines and seed give the same questions. unk: the text that
    stands for WikiText's `<unk>` in the contexts (a subword tokenizer's unknown token,
    which it reads whole)."""
    rng = random.Random(seed)
    paragraphs, count = [], 0
    for sentences in _passages(lines, unk):
        contexts, current, words = [], [], 0
        for sentence in sentences:
            if current and words + len(sentence) > MAX_WORDS:
                contexts.append(current)
                current, words = [], 0
            current.append(sentence)
            words += len(sentence)
        if current:
            contexts.append(current)
        for context in contexts:
            text = " ".join(w for sentence in context for w in sentence)
            qas, offset = [], 0
            for sentence in context:
                span = _mixed_answer(sentence, rng) if 8 <= len(sentence) <= 40 else None
                if span is not None:
                    i, j = span
                    answer = " ".join(sentence[i:j])
                    body = sentence[:-1] if sentence[-1] in (".", "!", "?") else sentence
                    kept = [w for w in _question_words(body, i, j, rng) if w != unk
                            and rng.random() >= DROP]
                    start = offset + sum(len(w) + 1 for w in sentence[:i])
                    count += 1
                    qas.append(dict(id=f"span-{count}",
                                    question=" ".join([_wh_word(sentence[i:j])] + kept) + " ?",
                                    answers=[(answer, start)]))
                offset += sum(len(w) + 1 for w in sentence)
            if qas:
                paragraphs.append(dict(context=text, qas=qas))
    return paragraphs


def questions_of(path, tokenizer, bptt, seed=0):
    """questions() of the WikiText file path, leaving out those that take more than half
    of the --bptt window."""
    unk = getattr(tokenizer, "unk_text", None) or "<unk>"  # WordPiece's [UNK], read whole
    paragraphs = questions(corpus.read_lines([path]), seed=seed, unk=unk)
    for para in paragraphs:
        para["qas"] = [qa for qa in para["qas"] if len(tokenizer(qa["question"])) <= bptt // 2]
    paragraphs = [para for para in paragraphs if para["qas"]]
    if not paragraphs:
        raise DataError(f"{path} gives no span-selection questions: it needs sentences of 8 to "
                        "40 words (and a --bptt that fits them)")
    return paragraphs
