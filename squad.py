"""SQuAD v1.1: reading the files, cutting questions and contexts into model windows,
decoding answer spans, and scoring them with the official measure (metrics.py).

    examples, windows = squad_features(read_squad("dev-v1.1.json"), tokenizer, vocab, 128, 64)
    scores = Evaluator("dev-v1.1.json", args, tokenizer, vocab, ctx)(model)   # loss, exact, f1

Answers are cut from the context by character offsets, so scores do not depend on how
the tokenizer splits words.
"""
import functools
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import metrics
import monitor
import train
from corpus import download, find_file, open_text
from data import PAD, DataError
from utils import UserError

SQUAD = {"train-v1.1.json": "981b29407e0affa3b1b156f72073b945",
         "dev-v1.1.json": "3e85deb501d4e538b6bc56f786231552"}
SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"


def squad_file(data_dir, name, allow_download=True):
    """data_dir/name (or name.gz); the official files are downloaded when absent."""
    data_dir = Path(data_dir)
    found = find_file(data_dir, name)
    if found:
        return found
    if name in SQUAD and allow_download:
        try:
            return download(SQUAD_URL + name, data_dir / name, SQUAD[name])
        except DataError as e:
            raise DataError(f"SQuAD file {name} not found in {data_dir} and {e}; put it there "
                            "or pass --data-dir / --train-file / --dev-file") from None
    raise DataError(f"SQuAD file {name} not found in {data_dir}; put it there or pass "
                    "--data-dir / --train-file / --dev-file")


def squad_files(folder):
    """(train, evaluation, label) files of SQuAD v1.1 in folder: train-v1.1.json and
    dev-v1.1.json where both are there ("dev"), else dev-split-train-v1.1.json and
    dev-split-eval-v1.1.json, a split of the official dev set by article ("dev-split");
    plain or .gz. DataError where neither pair is complete."""
    for names, label in ((("train-v1.1.json", "dev-v1.1.json"), "dev"),
                         (("dev-split-train-v1.1.json", "dev-split-eval-v1.1.json"), "dev-split")):
        train, dev = (find_file(Path(folder), name) for name in names)
        if train and dev:
            return train, dev, label
    raise DataError(f"{folder} has neither train-v1.1.json + dev-v1.1.json nor "
                    "dev-split-train-v1.1.json + dev-split-eval-v1.1.json (plain or .gz); "
                    "pass the SQuAD folder with --squad")


def _check_types(qa, context, answers):
    """TypeError where a question's fields are not of SQuAD's types."""
    if not isinstance(context, str) or not isinstance(qa["question"], str):
        raise TypeError("a context or question is not a string")
    if not isinstance(qa["id"], (str, int)) or isinstance(qa["id"], bool):
        raise TypeError(f"question id {qa['id']!r} is not a string")
    for text, start in answers:
        if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
            raise TypeError(f"question {qa['id']}: an answer's text or answer_start is of the "
                            "wrong type")


def read_squad(path, holdout=0):
    """Paragraphs of a SQuAD v1.1 file: [{'context', 'qas': [{'id', 'question',
    'answers': [(text, char_start), ...]}]}], checked against the format. holdout > 0:
    (paragraphs of all articles but the last `holdout`, paragraphs of those)."""
    try:
        with open_text(path) as f:
            articles = json.load(f)["data"]
        if holdout and not 0 < holdout < len(articles):
            raise DataError(f"{path} has {len(articles)} articles: cannot hold out {holdout} of "
                            "them and train on the rest")
        paragraphs, cut = [], None
        for i, article in enumerate(articles):
            if holdout and i == len(articles) - holdout:
                cut = len(paragraphs)
            for para in article["paragraphs"]:
                ctx = para["context"]
                qas = []
                for qa in para["qas"]:
                    answers = [(a["text"], a["answer_start"]) for a in qa["answers"]]
                    _check_types(qa, ctx, answers)
                    if not answers:
                        raise DataError(f"{path}: question {qa['id']} has no answer; this is a "
                                        "SQuAD v1.1 reader (v2.0 files are not supported)")
                    for text, start in answers:
                        if ctx[start:start + len(text)] != text:
                            raise DataError(f"{path}: question {qa['id']}: answer {text!r} is not "
                                            f"at answer_start {start} of its context")
                    qas.append(dict(id=str(qa["id"]), question=qa["question"], answers=answers))
                paragraphs.append(dict(context=ctx, qas=qas))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read SQuAD file {path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is not in the SQuAD v1.1 format (problem at {e!r})") from None
    if not paragraphs:
        raise DataError(f"{path} holds no SQuAD paragraphs")
    if holdout:
        if not 0 < cut < len(paragraphs):
            raise DataError(f"{path}: the last {holdout} articles or the others have no "
                            "paragraphs; hold out another number of articles")
        return paragraphs[:cut], paragraphs[cut:]
    return paragraphs



def answer_token_span(spans, char_start, char_end):
    """First and last token overlapping text[char_start:char_end]; (-1, -1) if none."""
    first = next((i for i, (s, e) in enumerate(spans) if e > char_start), None)
    last = next((i for i in range(len(spans) - 1, -1, -1) if spans[i][0] < char_end), None)
    if first is None or last is None or first > last:
        return -1, -1
    return first, last


@dataclass
class Windows:
    """SQuAD model inputs, one row per window of a question's context:

        input_ids, token_types (F, S)  <cls> question <sep> window <sep> <pad>...; types 0
                                       up to the first <sep>, 1 after
        match (F, S)                   1 at a context token whose word (its text, so
                                       `<unk>` words too) is a word of the question;
                                       with shapes, + 2 * token_shape at every question
                                       and context token
        start, end (F,)                answer positions in the input (-1: not inside)
        example (F,)                   the question's index in the examples
        ctx_start (F,)                 input position of the window's first context token
        window, window_len (F,)        the window's first context token, and its length

    Indexing with rows gives the Windows of those rows (data.Batches serves it).
    """
    input_ids: torch.Tensor
    token_types: torch.Tensor
    match: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    example: torch.Tensor
    ctx_start: torch.Tensor
    window: torch.Tensor
    window_len: torch.Tensor

    def __len__(self):
        return len(self.start)

    def __getitem__(self, rows):
        return Windows(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @property
    def device(self):
        return self.input_ids.device

    def to(self, device):
        return Windows(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@functools.lru_cache(maxsize=1 << 17)  # a few words make most tokens
def token_shape(text):
    """The shape of a token's raw text, an index of QuestionAnswerTask.SHAPE_NAMES: 1 a
    lower-case word, 2 Capitalised, 3 UPPER CASE (two letters or more), 4 holds a digit,
    5 anything else (punctuation, letters without case)."""
    if any(c.isdigit() for c in text):
        return 4
    letters = [c for c in text if c.isalpha()]
    if not letters or not (letters[0].isupper() or letters[0].islower()):
        return 5
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return 3
    return 2 if letters[0].isupper() else 1


def squad_features(paragraphs, tokenizer, vocab, bptt, doc_stride=None, training=False,
                   show=True, shape=False):
    """Model inputs for SQuAD: <cls> question <sep> context window <sep>, padded to bptt.

    Without doc_stride each question gets one window, the start of its context (the
    original). With doc_stride, windows start every doc_stride context tokens until
    the end of the context is covered. In training, a window that does not hold the
    (first) answer is left out without doc_stride (as the original did) and points at
    <cls> with it (as BERT's run_squad does).

    Returns (examples, windows): examples[k] = dict(id, context, answers, spans, gold);
    windows: a Windows, one row per window. show: print progress. shape: match also
    holds 2 * token_shape of every question and context token (--shape-feature).
    """
    examples, rows, roles = [], [], vocab.roles
    shown = monitor.Progress("preparing SQuAD windows", sum(len(p["qas"]) for p in paragraphs),
                             "questions", enabled=show)
    for para in paragraphs:
        ctx_tokens, spans = tokenizer.tokenize_with_spans(para["context"])
        ctx_ids = vocab.lookup_indices(ctx_tokens)
        ctx_shapes = [token_shape(para["context"][a:b]) if shape else 0 for a, b in spans]
        for qa in para["qas"]:
            q_shapes = []
            if shape:
                q_tokens, q_spans = tokenizer.tokenize_with_spans(qa["question"])
                q_shapes = [2 * token_shape(qa["question"][a:b]) for a, b in q_spans]
            else:
                q_tokens = tokenizer(qa["question"])
            q_ids = vocab.lookup_indices(q_tokens)
            q_words = {t for t in q_tokens if any(c.isalnum() for c in t)}
            ctx_match = [int(t in q_words) + 2 * x for t, x in zip(ctx_tokens, ctx_shapes)]
            budget = bptt - len(q_ids) - 3
            if budget < 1:
                raise DataError(f"question {qa['id']} has {len(q_ids)} tokens, which leaves no "
                                f"room for its context in --bptt {bptt}; raise --bptt")
            gold = [answer_token_span(spans, s, s + len(t)) for t, s in qa["answers"]]
            k = len(examples)
            examples.append(dict(id=qa["id"], context=para["context"], spans=spans,
                                 answers=[t for t, _ in qa["answers"]], gold=gold))
            step = min(doc_stride, budget) if doc_stride else None
            w = 0
            while True:
                window = ctx_ids[w:w + budget]
                ctx_start = len(q_ids) + 2
                s, e = gold[0] if gold else (-1, -1)
                inside = s >= w and 0 <= e < w + len(window)
                target = (s - w + ctx_start, e - w + ctx_start) if inside else (-1, -1)
                if training and not inside and doc_stride:
                    target = (0, 0)  # BERT: a window without the answer points at <cls>
                if not (training and target[0] < 0):
                    rows.append((k, [roles.cls] + q_ids + [roles.sep] + window + [roles.sep], ctx_start, w,
                                 len(window), target, ctx_match[w:w + budget], q_shapes))
                if step is None or w + budget >= len(ctx_ids):
                    break
                w += step
            shown.update()
    shown.close()
    n = len(rows)
    input_ids = torch.full((n, bptt), roles.pad, dtype=torch.long)
    types = torch.ones((n, bptt), dtype=torch.long)
    match = torch.zeros((n, bptt), dtype=torch.long)
    meta = torch.zeros((n, 6), dtype=torch.long)
    for i, (k, seq, ctx_start, w, wlen, (s, e), window_match, q_shapes) in enumerate(rows):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        types[i, :ctx_start] = 0
        match[i, ctx_start:ctx_start + wlen] = torch.tensor(window_match, dtype=torch.long)
        match[i, 1:1 + len(q_shapes)] = torch.tensor(q_shapes, dtype=torch.long)
        meta[i] = torch.tensor([s, e, k, ctx_start, w, wlen])
    names = ("start", "end", "example", "ctx_start", "window", "window_len")
    return examples, Windows(input_ids=input_ids, token_types=types, match=match,
                             **{name: meta[:, j] for j, name in enumerate(names)})


def _span_scores(start_logits, end_logits, ctx_start, window_len, max_answer_len):
    """(F, S, S) start + end scores of every span, -inf where the span is not allowed
    (start <= end < start + max_answer_len, both inside the context)."""
    S = start_logits.shape[1]
    pos = torch.arange(S, device=start_logits.device)
    in_ctx = (pos >= ctx_start[:, None]) & (pos < (ctx_start + window_len)[:, None])  # (F, S)
    scores = start_logits[:, :, None] + end_logits[:, None, :]  # (F, S start, S end)
    gap = pos[None, :] - pos[:, None]  # end - start
    allowed = (gap >= 0) & (gap < max_answer_len)  # (S, S)
    allowed = allowed[None] & in_ctx[:, :, None] & in_ctx[:, None, :]
    return scores.masked_fill(~allowed, float("-inf"))


def window_loss(start_logits, end_logits, w, reduction="mean"):
    """The loss of Windows w whose answer is inside them (w.start >= 0): the mean of the
    start and end cross-entropies (the original's, and BERT's)."""
    return (F.cross_entropy(start_logits, w.start, reduction=reduction)
            + F.cross_entropy(end_logits, w.end, reduction=reduction)) / 2


def best_spans(start_logits, end_logits, ctx_start, window_len, max_answer_len,
               with_total=False):
    """Best span per row with start <= end < start + max_answer_len inside the context.

    start_logits, end_logits (F, S); ctx_start, window_len (F,) -> (score, start, end),
    each (F,), positions in the input; with_total, also the logsumexp of the scores of
    all those spans (score - total is the best span's log-probability among them).
    """
    F_, S = start_logits.shape
    scores = _span_scores(start_logits, end_logits, ctx_start, window_len, max_answer_len)
    best, flat = scores.view(F_, -1).max(dim=1)
    if with_total:
        return best, flat // S, flat % S, torch.logsumexp(scores.view(F_, -1), dim=1)
    return best, flat // S, flat % S


def expected_f1_spans(start_logits, end_logits, ctx_start, window_len, max_answer_len,
                      candidates=20, support=200, temperature=1.0):
    """Per row, the span with the highest expected token F1 under the model's own span
    distribution (minimum Bayes risk), instead of the most probable span.

    The probable span of a weak model is often one word, the name or number it is surest
    of, where the answer is a phrase around it; the expected F1 weighs every span by its
    probability. The distribution is that of best_spans (start + end scores, softmax over
    the allowed spans, at `temperature`: below 1 it leans toward the most probable span),
    kept to its `support` most probable spans; the answer is chosen among the
    `candidates` most probable. Returns (score, start, end) as best_spans does, score
    being the highest span score of the row (to choose between a question's windows),
    start and end the chosen span's.
    """
    F_, S = start_logits.shape
    scores = _span_scores(start_logits, end_logits, ctx_start, window_len,
                          max_answer_len).view(F_, -1)
    top, flat = scores.topk(min(support, S * S), dim=1)  # (F, M), most probable first
    prob = torch.softmax(top / temperature, dim=1).nan_to_num(0.0)
    s, e = flat // S, flat % S
    k = min(candidates, top.shape[1])
    cs, ce = s[:, :k, None], e[:, :k, None]  # (F, K, 1) against (F, 1, M)
    overlap = (torch.minimum(ce, e[:, None]) - torch.maximum(cs, s[:, None]) + 1).clamp(min=0)
    f1 = 2 * overlap / ((ce - cs + 1) + (e - s + 1).clamp(min=1)[:, None])  # (no 0/0 where
    # fewer spans than `support` are allowed: the rest are not spans, and have probability 0)
    gain = (f1 * prob[:, None]).sum(2).masked_fill(~torch.isfinite(top[:, :k]), -1.0)
    pick = gain.argmax(1, keepdim=True)
    return top[:, 0], s.gather(1, pick).squeeze(1), e.gather(1, pick).squeeze(1)


# --------------------------------------------------------------------------- scoring

def qa_logits(model, inputs, types, match, pad_id=PAD):
    """(N, S) -> start, end logits (N, S) with padding (pad_id) never chosen."""
    pad = inputs == pad_id
    start, end = model(inputs, types, key_padding_mask=pad, match=match)
    return start.float().masked_fill(pad, -1e4), end.float().masked_fill(pad, -1e4)


@dataclass(frozen=True)
class Reading:
    """How an Evaluator reads questions and answers them: windows of bptt tokens (doc_stride
    apart over a long context; 0: one window), with or without the token-shape feature,
    batch_size windows at a time; the answer of at most max_answer_len tokens that
    decode chooses ('best': the most probable span; 'expected-f1': the span of highest
    expected F1 at temperature); amp and dry_run as the tasks' flags."""
    bptt: int
    doc_stride: int = 0
    shape: bool = False
    batch_size: int = 32
    max_answer_len: int = 30
    decode: str = "best"
    temperature: float = 1.0
    amp: str = "none"
    dry_run: bool = False

    @classmethod
    def of(cls, args, **changes):
        """The Reading a qa_task.py run's flags say, with changes."""
        given = dict(bptt=args.bptt, doc_stride=args.doc_stride, shape=args.shape_feature,
                     batch_size=args.batch_size, max_answer_len=args.max_answer_len,
                     decode=args.decode, temperature=args.decode_temperature, amp=args.amp,
                     dry_run=args.dry_run)
        return cls(**{**given, **changes})


class Evaluator:
    """Scores a SQuAD file: loss where the answer is inside a window, and EM/F1 over all
    questions from the best span across each question's windows. source: a file, or
    paragraphs as read_squad returns them; reading: a Reading. With several processes
    each scores its share of the windows and the spans are gathered, so all take the
    same decisions."""

    def __init__(self, source, reading, tokenizer, vocab, ctx):
        paragraphs = source if isinstance(source, list) else read_squad(source)
        self.examples, self.windows = squad_features(
            paragraphs, tokenizer, vocab, reading.bptt, reading.doc_stride or None, show=ctx.main,
            shape=reading.shape)
        self.reading, self.vocab, self.ctx = reading, vocab, ctx
        self.batches = data.Batches(self.windows.to(ctx.device), batch_size=reading.batch_size,
                                    rank=ctx.rank, world=ctx.world)

    def __call__(self, model):
        """{loss, exact, f1, orig_exact, orig_f1, orig_n, questions, predictions}."""
        spans, sums = self.decode(model)
        predictions = self.answers(spans)
        official = metrics.score_answers(((ex["id"], ex["answers"]) for ex in self.examples),
                                         predictions)
        return dict(loss=sums["loss"] / max(sums["count"], 1), exact=official["exact_match"],
                    f1=official["f1"], **self.original_style(spans),
                    questions=len(self.examples), predictions=predictions)

    def decode(self, model):
        """(spans, sums): spans (F, 6) per window: best span's score, the answer's start and
        end (the best span's, or with decode 'expected-f1' expected_f1_spans'), the two
        independent argmaxes, and the answer's probability among its window's spans;
        sums of the loss over the windows that hold the answer, and their count."""
        decoded = []

        def step(model, w):
            s_logits, e_logits = qa_logits(model, w.input_ids, w.token_types, w.match,
                                           self.vocab.roles.pad)
            best, s, e, total = best_spans(s_logits, e_logits, w.ctx_start, w.window_len,
                                           reading.max_answer_len, with_total=True)
            chosen = best
            if reading.decode == "expected-f1":
                _, s, e = expected_f1_spans(s_logits, e_logits, w.ctx_start, w.window_len,
                                            reading.max_answer_len, temperature=reading.temperature)
                chosen = s_logits.gather(1, s[:, None])[:, 0] + e_logits.gather(1, e[:, None])[:, 0]
            decoded.append(torch.stack([best, s, e, s_logits.argmax(1), e_logits.argmax(1),
                                        torch.exp(chosen - total)], 1).cpu())
            has = w.start >= 0
            loss = window_loss(s_logits[has], e_logits[has], w[has], reduction="sum")
            return dict(loss=loss, count=has.sum())

        reading = self.reading
        sums = train.evaluate(model, self.batches, step, reading.amp, reading.dry_run, self.ctx)
        mine = torch.cat(decoded) if decoded else torch.zeros(0, 6)
        if self.ctx.world == 1:
            return mine, sums
        # each rank's rows in the order it decoded them (all of them, but with --dry-run)
        counts = [int(n) for n in self.ctx.all_sum(
            [float(len(mine)) if r == self.ctx.rank else 0.0 for r in range(self.ctx.world)])]
        spans = torch.zeros(len(self.windows), 6)
        for r, part in enumerate(self.ctx.gather(mine, counts)):
            spans[self.batches.rows_of(r)[:len(part)]] = part
        return spans, sums

    def answers(self, spans, scores=False):
        """{id: text}: each question's best-scoring span over its windows, cut from the
        context through character offsets. A question with no span gets ''. With scores:
        {id: (text, score, probability)}."""
        w = self.windows
        best = {}
        for i, (score, s, e, _, _, prob) in enumerate(spans.tolist()):
            k = int(w.example[i])
            if score > float("-inf") and (k not in best or score > best[k][0]):
                shift = int(w.window[i]) - int(w.ctx_start[i])
                best[k] = (score, int(s) + shift, int(e) + shift, prob)
        out = {}
        for k, ex in enumerate(self.examples):
            text, score, prob = "", float("-inf"), 0.0
            if k in best:
                score, s, e, prob = best[k]
                text = ex["context"][ex["spans"][s][0]:ex["spans"][e][1]]
            out[ex["id"]] = (text, score, prob) if scores else text
        return out

    def original_style(self, spans):
        """The original example's numbers: only questions whose every answer lies in the
        first window, start and end taken as independent argmaxes, pairs with start > end
        skipped, answers compared as vocabulary tokens. Not comparable with SQuAD results."""
        w, itos = self.windows, self.vocab.itos
        samples, seen = [], set()
        for i, (_, _, _, s, e, _) in enumerate(spans.long().tolist()):
            k = int(w.example[i])
            if k in seen:
                continue  # only the first window, as the original had only that
            seen.add(k)
            c, wlen, ids = int(w.ctx_start[i]), int(w.window_len[i]), w.input_ids[i]
            gold = self.examples[k]["gold"]
            if s > e or any(gs < 0 or ge >= wlen for gs, ge in gold):
                continue
            tokens = lambda a, b: [itos[t] for t in ids[a:b + 1].tolist()]
            samples.append(([tokens(gs + c, ge + c) for gs, ge in gold], tokens(s, e)))
        return dict(orig_exact=metrics.compute_qa_exact(samples),
                    orig_f1=metrics.compute_qa_f1(samples), orig_n=len(samples))


# --------------------------------------------------------------------------- questions to answer

def questions_to_answer(question=None, context=None, predict_file=None):
    """The questions of --question and --context or of --predict FILE, as SQuAD paragraphs
    [{context, qas: [{id, question, answers: []}]}]; a UserError naming the flag for a
    file that cannot be read, is not one of the two formats, or holds an empty question
    or context."""
    if predict_file is None:
        if not question.strip():
            raise UserError("--question is empty; ask a question")
        if not context.strip():
            raise UserError("--context is empty; give the text that holds the answer")
        return [dict(context=context, qas=[dict(id="1", question=question, answers=[])])]
    path = predict_file
    try:
        with open_text(path) as f:  # plain or .gz, as the training and evaluation files
            doc = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read --predict {path}: {e.strerror or e}")
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"--predict {path} is not valid JSON: {e}")
    paragraphs = []
    try:
        if isinstance(doc, dict):  # SQuAD format; the answers, if any, are not used
            for article in doc["data"]:
                for para in article["paragraphs"]:
                    paragraphs.append(dict(context=para["context"], qas=[
                        dict(id=str(q["id"]), question=q["question"], answers=[])
                        for q in para["qas"]]))
        else:
            for i, item in enumerate(doc):
                paragraphs.append(dict(context=item["context"], qas=[dict(
                    id=str(item.get("id", i + 1)), question=item["question"], answers=[])]))
        for para in paragraphs:
            if not isinstance(para["context"], str) or not all(
                    isinstance(q["question"], str) for q in para["qas"]):
                raise TypeError("a question or context is not a string")
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"--predict {path} is neither SQuAD format nor a list of {{\"question\": ..., "
            f"\"context\": ...}} objects ({type(e).__name__}: {e})")
    for para in paragraphs:
        for q in para["qas"]:
            if not q["question"].strip() or not para["context"].strip():
                raise UserError(f"--predict {path}: question {q['id']} has an empty "
                                f"{'question' if not q['question'].strip() else 'context'}")
    return paragraphs
