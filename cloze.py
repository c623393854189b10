"""Span-selection questions made without labels from running text: pretraining for
SQuAD (qa_task.py --cloze-dir DIR).

    train, valid, text = cloze_files("DIR", tokenizer, bptt=128)   # WikiText's train and valid

From each sentence one span is taken away (a name, date or amount, sometimes a word);
the question is a wh-word for its kind plus the rest of the sentence (style 'sentence')
or 6 to 12 of its words beside the span (style 'short'), with some words dropped, and the
answer is the span in its context, in read_squad's form. cloze_split(text, ..., seed=k)
makes other questions from the same text.
"""
import random
import re
from pathlib import Path

import corpus
from data import DataError

_CLOZE_SKIP = frozenset(
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
                                              and w.lower() not in _CLOZE_SKIP)
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


def _cloze_answer(words, rng):
    """(i, j): the answer span words[i:j] of a sentence, or None. A named run
    (_named_runs); in three sentences of ten, and where there is no such run, single
    words of more than three letters are candidates too."""
    runs = _named_runs(words)
    if not runs or rng.random() < 0.3:
        runs += [(k, k + 1) for k, w in enumerate(words) if _content(w)]
    return rng.choice(runs) if runs else None


def _content(w):
    return w.isalpha() and len(w) > 3 and w.lower() not in _CLOZE_SKIP


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


_ANSWERS = {"named": _cloze_answer, "mixed": _mixed_answer}


def _cloze_wh(answer):
    first = answer[0]
    if re.fullmatch(r"1[0-9]{3}|20[0-9]{2}", first) or first in _MONTHS:
        return "when"
    if _NUMBER.fullmatch(first):
        return "how many"
    return "who" if first[:1].isupper() else "what"


def _question_words(body, i, j, window, rng):
    """The words of body (a sentence without its end mark) that a question keeps around
    its answer body[i:j]: all of them (window None), or a run of lo to hi words beside the
    answer (window (lo, hi)), some before it and the rest after it, as far as the sentence
    goes."""
    if window is None:
        return body[:i] + body[j:]
    n = rng.randint(*window)
    before = rng.randint(0, n)
    after = n - before
    if before > i:  # the sentence starts too soon: take the rest after the answer
        after += before - i
        before = i
    if j + after > len(body):  # it ends too soon: take the rest before the answer
        before = min(i, before + j + after - len(body))
        after = len(body) - j
    return body[i - before:i] + body[j:j + after]


# The kinds of question (qa_task.py --cloze-style): 'sentence', the whole sentence without
# its answer, a quarter of its words dropped, in contexts of up to 90 words of a paragraph;
# 'short', 6 to 12 words of the sentence beside the answer, a tenth dropped, in contexts of
# up to 110 words of a section: as long as SQuAD's questions (10 words on average, half of
# them from the answer's sentence) and nearer its paragraphs (110 words, median).
STYLES = {"sentence": dict(max_words=90, drop=0.25, window=None),
          "short": dict(max_words=110, drop=0.1, window=(6, 12), join=True),
          "mixed": dict(max_words=110, drop=0.1, window=(6, 12), join=True, answers="mixed")}


def _passages(lines, unk, join):
    """The sentences (word lists) of each paragraph of WikiText lines, or with join of
    all the paragraphs between two headings."""
    sentences = []
    for line in lines:
        line = line.strip()
        if line.startswith("=") or not join:  # a heading ends a passage
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


def cloze_questions(lines, seed=0, max_words=90, drop=0.25, unk="<unk>", window=None,
                    join=False, answers="named"):
    """Questions without labels from running text, in read_squad's form: span-selection
    pretraining for SQuAD. lines: WikiText lines (a line is a paragraph; headings,
    ' = Title = ', are skipped; ' @-@ ', ' @,@ ', ' @.@ ' are joined back). Each
    paragraph (with join: the paragraphs between two headings, one after the other) is cut
    into contexts of whole sentences, up to max_words words. From every
    sentence of 8 to 40 words one answer span is taken (_cloze_answer); its question is a
    wh-word for the span's kind (when, how many, who, what) followed by the sentence
    without the span, each remaining word dropped with probability drop and `<unk>`
    words left out, so that the model must find the sentence by its words and pick what
    the question lacks, as in SQuAD. window (lo, hi): the question keeps only a run of
    lo to hi of the sentence's words beside the span (_question_words). answers 'mixed':
    the spans are names, phrases and words in SQuAD's proportions (_mixed_answer). The
    same lines and seed give the same questions.
    unk: the text that stands for WikiText's `<unk>` in the contexts (a subword
    tokenizer's unknown token, which it reads whole)."""
    rng = random.Random(seed)
    paragraphs, count = [], 0
    for sentences in _passages(lines, unk, join):
        contexts, current, words = [], [], 0
        for sentence in sentences:
            if current and words + len(sentence) > max_words:
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
                span = (_ANSWERS[answers](sentence, rng) if 8 <= len(sentence) <= 40
                        else None)
                if span is not None:
                    i, j = span
                    answer = " ".join(sentence[i:j])
                    body = sentence[:-1] if sentence[-1] in (".", "!", "?") else sentence
                    kept = [w for w in _question_words(body, i, j, window, rng) if w != unk
                            and rng.random() >= drop]
                    start = offset + sum(len(w) + 1 for w in sentence[:i])
                    count += 1
                    qas.append(dict(id=f"cloze-{count}",
                                    question=" ".join([_cloze_wh(sentence[i:j])] + kept) + " ?",
                                    answers=[(answer, start)]))
                offset += sum(len(w) + 1 for w in sentence)
            if qas:
                paragraphs.append(dict(context=text, qas=qas))
    return paragraphs


def _wikitext_files(folder):
    """{split: path} of WikiText's train and valid files in folder (or its wikitext-2,
    wikitext-103 folder)."""
    files = {}
    for where in (Path(folder), Path(folder) / "wikitext-2", Path(folder) / "wikitext-103"):
        files = {s: corpus.find_file(where, f"wiki.{s}.tokens") for s in ("train", "valid")}
        if all(files.values()):
            break
    if not all(files.values()):
        raise DataError(f"--cloze-dir {folder} holds no wiki.train.tokens and "
                        "wiki.valid.tokens (plain or .gz); pass the folder of WikiText's files")
    return files


def cloze_split(path, tokenizer, bptt, style="sentence", seed=0):
    """Cloze questions (cloze_questions, of STYLES[style]) from the WikiText file path,
    leaving out those that take more than half of the --bptt window."""
    unk = getattr(tokenizer, "unk_text", None) or "<unk>"  # WordPiece's [UNK], read whole
    paragraphs = cloze_questions(corpus.read_lines([path]), seed=seed, unk=unk, **STYLES[style])
    for para in paragraphs:
        para["qas"] = [qa for qa in para["qas"] if len(tokenizer(qa["question"])) <= bptt // 2]
    paragraphs = [para for para in paragraphs if para["qas"]]
    if not paragraphs:
        raise DataError(f"{path} gives no cloze questions: it needs sentences of 8 to 40 "
                        "words (and a --bptt that fits them)")
    return paragraphs


def cloze_files(folder, tokenizer, bptt, print0=print, style="sentence"):
    """(train paragraphs, evaluation paragraphs, train file): cloze questions (of
    STYLES[style]) from WikiText's train and valid splits in folder; cloze_split(train
    file, ..., seed=k) makes other questions from the same training text."""
    files = _wikitext_files(folder)
    train, valid = (cloze_split(files[s], tokenizer, bptt, style) for s in ("train", "valid"))
    print0(f"| --cloze-dir: {sum(len(p['qas']) for p in train)} questions made from "
           f"{files['train'].name}, {sum(len(p['qas']) for p in valid)} from "
           f"{files['valid'].name}")
    return train, valid, files["train"]
