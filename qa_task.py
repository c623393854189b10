"""SQuAD v1.1 fine-tuning of the pretrained encoder (the third step).

    python qa_task.py --bert-model ns_bert.pt                       # .data/SQuAD1, downloaded
    python qa_task.py --bert-model ns_bert.pt --data-dir DIR --epochs 30
    python qa_task.py --bert-model ns_bert.pt --train-file T.json --dev-file D.json --doc-stride 64
    python qa_task.py --bert-model ns_bert.pt --cloze-dir WIKITEXT --save cloze.pt   # then
    python qa_task.py --bert-model ns_bert.pt --checkpoint cloze.pt --data-dir DIR

The model reads <cls> question <sep> context <sep> (cut to --bptt) and scores each
position as the answer's start and end. Every dev question is scored with the
official SQuAD v1.1 exact match and F1 (a question whose answer was cut off scores
0); the original example's token-level numbers are printed beside them. Writes
qa_model.pt (best on dev F1), predictions.json ({question id: answer}, the format
the official evaluation script reads) and qa_loss.txt. With --cloze-dir it trains on
questions made without labels from WikiText's sentences instead (span-selection
pretraining, see data.cloze_questions), for a SQuAD run that starts from its model.
"""
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import metrics
import utils
from model import BertModel, QuestionAnswerTask


def build_parser():
    p = utils.base_parser("BERT fine-tuning for SQuAD v1.1 question answering", lr=5.0, clip=0.1,
                          epochs=2, batch_size=72, log_interval=200, save="qa_model.pt",
                          seed=21192391, state="qa_state.pt")
    add = p.add_argument
    add("--bert-model", type=str, default="ns_bert.pt", help="the encoder written by ns_task.py "
        "(or mlm_task.py)")
    add("--train-file", type=str, default=None,
        help="SQuAD-format training file (default: train-v1.1.json[.gz] in --data-dir)")
    add("--dev-file", type=str, default=None,
        help="SQuAD-format file evaluated every epoch (default: dev-v1.1.json[.gz] in --data-dir)")
    add("--test-file", type=str, default=None,
        help="SQuAD-format file for the final evaluation (default: the dev file again)")
    add("--doc-stride", type=int, default=0,
        help="if > 0, read long contexts in overlapping windows this many tokens apart and take "
             "the best span of all windows (0: one window, the original)")
    add("--max-answer-len", type=int, default=30, help="longest answer considered, in tokens")
    add("--dropout", type=float, default=None,
        help="dropout of the encoder (default: the value it was pretrained with)")
    add("--match-feature", action="store_true",
        help="mark each context word that also occurs in the question with a learned input "
             "embedding (DrQA's exact-match feature); off: the original model")
    add("--random-init", action="store_true",
        help="take only the sizes from --bert-model and start from random weights (the "
             "baseline that shows what pretraining brings)")
    add("--cloze-dir", type=str, default=None, metavar="DIR",
        help="span-selection pretraining: train on questions made without labels from the "
             "WikiText corpus in DIR (wiki.train.tokens; scored on wiki.valid.tokens) instead of "
             "SQuAD, then fine-tune on SQuAD from the model it writes with --checkpoint FILE")
    utils.add_freeze_flag(p, "(words that occur only in the evaluation file then keep "
                          "embeddings of the same kind as the rest; DrQA fixes its word vectors "
                          "the same way)")
    add("--predictions", type=str, default="predictions.json",
        help="where to write the final answers, {question id: text}")
    add("--loss-log", type=str, default="qa_loss.txt", help="the loss log written at the end")
    ask = p.add_argument_group("answering questions (--predict)")
    ask.add_argument("--predict", action="store_true",
                     help="do not train: answer questions with the model in --save (qa_model.pt), "
                          "given by --question and --context, or by --predict-file")
    ask.add_argument("--question", type=str, default=None, help="a question about --context")
    ask.add_argument("--context", type=str, default=None, help="the text that holds the answer")
    ask.add_argument("--context-file", type=str, default=None,
                     help="read the context from this text file")
    ask.add_argument("--predict-file", type=str, default=None,
                     help="a JSON file of questions: SQuAD format, or a list of "
                          "{\"question\": ..., \"context\": ..., \"id\": optional}; the answers "
                          "also go to --predictions")
    return p


def check_args(args):
    asking = [f for f in ("question", "context", "context_file", "predict_file")
              if getattr(args, f) is not None]
    if asking and not args.predict:
        raise utils.UserError(f"--{asking[0].replace('_', '-')} is for answering questions: add "
                              "--predict")
    if args.cloze_dir is not None:
        given = [f for f in ("train_file", "dev_file", "test_file", "predict_file")
                 if getattr(args, f) is not None]
        if given or args.predict:
            raise utils.UserError(f"--cloze-dir makes its own questions; drop "
                                  f"--{(given[0] if given else 'predict').replace('_', '-')}")
    if args.predict:
        one = args.question is not None and (args.context is not None or args.context_file)
        if args.predict_file is None and not one:
            raise utils.UserError("--predict needs --question with --context (or --context-file), "
                                  "or --predict-file")
        if args.context is not None and args.context_file:
            raise utils.UserError("give --context or --context-file, not both")
    utils.check_positive(args, "epochs", "batch_size", "bptt", "log_interval", "lr",
                         "max_answer_len")
    if args.doc_stride < 0:
        raise utils.UserError(f"--doc-stride must be 0 (off) or positive, got {args.doc_stride}")
    if args.bptt > 512:
        raise utils.UserError(f"--bptt {args.bptt} exceeds the model's 512 positions")
    utils.check_writable(args.save, args.predictions, args.loss_log)


def squad_path(args, flag, name):
    given = getattr(args, flag)
    if given:
        return given
    return data.squad_file(data.dataset_dir("SQuAD1", args.data_dir), name)


def qa_logits(model, inputs, types, match):
    """(N, S) -> start, end logits (N, S) with padding never chosen."""
    pad = inputs == data.PAD
    start, end = model(inputs, types, key_padding_mask=pad, match=match)
    return start.float().masked_fill(pad, -1e4), end.float().masked_fill(pad, -1e4)


def qa_loss(model, batch):
    """Mean of the start and end cross-entropies (the original's loss)."""
    inputs, types, match, start, end = batch
    s_logits, e_logits = qa_logits(model, inputs, types, match)
    return (F.cross_entropy(s_logits, start) + F.cross_entropy(e_logits, end)) / 2


class Evaluator:
    """Scores a SQuAD file: loss where the answer is inside a window, and EM/F1 over all
    questions from the best span across each question's windows. source: a file, or
    paragraphs as data.read_squad returns them."""

    def __init__(self, source, args, tokenizer, vocab, device):
        paragraphs = source if isinstance(source, list) else data.read_squad(source)
        self.examples, self.features = data.squad_features(
            paragraphs, tokenizer, vocab, args.bptt, args.doc_stride or None)
        self.args, self.vocab, self.device = args, vocab, device
        f = self.features
        self.batches = data.Batches(*(f[k].to(device) for k in (
            "input_ids", "token_types", "match", "start", "end", "ctx_start", "window_len")),
            batch_size=args.batch_size)

    def __call__(self, model):
        spans, sums = self.decode(model)
        predictions = self.answers(spans)
        result = dict(loss=sums["loss"] / max(sums["count"], 1), predictions=predictions)
        result.update(self.official(predictions))
        result.update(self.original_style(spans))
        return result

    def decode(self, model):
        """(spans, sums): spans (F, 6) per window: best span's score, start, end, the two
        independent argmaxes, and the best span's probability among its window's spans."""
        decoded = []

        def step(model, batch):
            inputs, types, match, start, end, ctx_start, window_len = batch
            s_logits, e_logits = qa_logits(model, inputs, types, match)
            best, s, e, total = data.best_spans(s_logits, e_logits, ctx_start, window_len,
                                                self.args.max_answer_len, with_total=True)
            decoded.append(torch.stack([best, s, e, s_logits.argmax(1), e_logits.argmax(1),
                                        torch.exp(best - total)], 1).cpu())
            has = start >= 0
            loss = (F.cross_entropy(s_logits[has], start[has], reduction="sum")
                    + F.cross_entropy(e_logits[has], end[has], reduction="sum")) / 2
            return dict(loss=loss, count=has.sum())

        # Every rank scores the whole file (no reduction), so all take the same decisions.
        sums = utils.evaluate(model, self.batches, step, self.args, reduce=False)
        return (torch.cat(decoded) if decoded else torch.zeros(0, 6)), sums

    def answers(self, spans, scores=False):
        """{id: text}: each question's best-scoring span over its windows, cut from the
        context through character offsets. A question with no span gets ''. With scores:
        {id: (text, score, probability)}."""
        f = self.features
        best = {}
        for i, (score, s, e, _, _, prob) in enumerate(spans.tolist()):
            k = int(f["example"][i])
            if score > float("-inf") and (k not in best or score > best[k][0]):
                w = int(f["window"][i]) - int(f["ctx_start"][i])
                best[k] = (score, int(s) + w, int(e) + w, prob)
        out = {}
        for k, ex in enumerate(self.examples):
            text, score, prob = "", float("-inf"), 0.0
            if k in best:
                score, s, e, prob = best[k]
                text = ex["context"][ex["spans"][s][0]:ex["spans"][e][1]]
            out[ex["id"]] = (text, score, prob) if scores else text
        return out

    def official(self, predictions):
        """SQuAD v1.1 exact match and F1 (percent), averaged over every question."""
        em = f1 = 0.0
        for ex in self.examples:
            pred = predictions[ex["id"]]
            em += metrics.metric_max_over_ground_truths(metrics.exact_match_score, pred,
                                                        ex["answers"])
            f1 += metrics.metric_max_over_ground_truths(metrics.f1_score, pred, ex["answers"])
        n = max(len(self.examples), 1)
        return dict(exact=100.0 * em / n, f1=100.0 * f1 / n)

    def original_style(self, spans):
        """The original example's numbers: only questions whose every answer lies in the
        first window, start and end taken as independent argmaxes, pairs with start > end
        skipped, answers compared as vocabulary tokens. Not comparable with SQuAD results."""
        f, itos = self.features, self.vocab.itos
        samples, seen = [], set()
        for i, (_, _, _, s, e, _) in enumerate(spans.long().tolist()):
            k = int(f["example"][i])
            if k in seen:
                continue  # only the first window, as the original had only that
            seen.add(k)
            c, wlen, ids = int(f["ctx_start"][i]), int(f["window_len"][i]), f["input_ids"][i]
            gold = self.examples[k]["gold"]
            if s > e or any(gs < 0 or ge >= wlen for gs, ge in gold):
                continue
            tokens = lambda a, b: [itos[t] for t in ids[a:b + 1].tolist()]
            samples.append(([tokens(gs + c, ge + c) for gs, ge in gold], tokens(s, e)))
        return dict(orig_exact=metrics.compute_qa_exact(samples),
                    orig_f1=metrics.compute_qa_f1(samples), orig_n=len(samples))


def scores(r):
    return {k: r[k] for k in ("exact", "f1", "orig_exact", "orig_f1")}


def describe(r, total):
    return (f"loss {r['loss']:5.2f} | exact {r['exact']:8.3f}% | f1 {r['f1']:8.3f}%\n"
            f"| original-style token metrics ({r['orig_n']} of {total} questions) | "
            f"exact {r['orig_exact']:8.3f}% | f1 {r['orig_f1']:8.3f}%")


def questions_to_answer(args):
    """The questions of --question/--context or --predict-file, as SQuAD paragraphs
    [{context, qas: [{id, question, answers: []}]}]."""
    if args.predict_file is None:
        context = args.context
        if args.context_file:
            try:
                context = Path(args.context_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise utils.UserError(f"cannot read --context-file {args.context_file}: {e}")
        return [dict(context=context, qas=[dict(id="1", question=args.question, answers=[])])]
    path = args.predict_file
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise utils.UserError(f"cannot read --predict-file {path}: {e.strerror}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise utils.UserError(f"--predict-file {path} is not valid JSON: {e}")
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
        raise utils.UserError(
            f"--predict-file {path} is neither SQuAD format nor a list of {{\"question\": ..., "
            f"\"context\": ...}} objects ({type(e).__name__}: {e})")
    return paragraphs


def predict(args):
    """Answer questions with a trained model: print each answer with its score."""
    tokenizer, vocab = data.Tokenizer(), data.Vocab.load(args.save_vocab)
    device = utils.setup(args, f"tokenizer: {tokenizer.name} ({data.BACKEND})")
    ckpt = utils.load_checkpoint(args.save, "qa_task")
    utils.check_fit(ckpt, args.save, ckpt["config"], vocab.fingerprint)  # the vocabulary
    raw = QuestionAnswerTask(BertModel(**ckpt["config"]),
                             match_feature="match_embed.weight" in ckpt["model"])
    raw.load_state_dict(ckpt["model"])
    raw.to(device)
    if not args.doc_stride:
        args.doc_stride = max(1, args.bptt // 2)  # a long context is read whole, in windows
    paragraphs = questions_to_answer(args)
    reader = Evaluator(paragraphs, args, tokenizer, vocab, device)
    spans, _ = reader.decode(raw)
    answers = reader.answers(spans, scores=True)
    questions = {q["id"]: q["question"] for p in paragraphs for q in p["qas"]}
    for ex in reader.examples:
        text, score, prob = answers[ex["id"]]
        utils.print0(f"| question {ex['id']}: {questions[ex['id']].strip()}")
        utils.print0(f"| answer: {text!r} | score {score:.2f} | probability {prob:.3f}")
    if args.predict_file:
        utils.atomic_write_text(args.predictions, json.dumps(
            {k: v[0] for k, v in answers.items()}, ensure_ascii=False))
        utils.print0(f"| wrote {len(answers)} answers to {args.predictions}")


def cloze_files(folder, tokenizer, bptt):
    """(train paragraphs, evaluation paragraphs): cloze questions from WikiText's train and
    valid splits in folder (data.cloze_questions), leaving out those that take more than
    half of the --bptt window."""
    files = {}
    for where in (Path(folder), Path(folder) / "wikitext-2", Path(folder) / "wikitext-103"):
        files = {s: data.find_file(where, f"wiki.{s}.tokens") for s in ("train", "valid")}
        if all(files.values()):
            break
    if not all(files.values()):
        raise data.DataError(f"--cloze-dir {folder} holds no wiki.train.tokens and "
                             "wiki.valid.tokens (plain or .gz); pass the folder of WikiText's "
                             "files")

    def fitting(paragraphs):
        for para in paragraphs:
            para["qas"] = [qa for qa in para["qas"] if len(tokenizer(qa["question"])) <= bptt // 2]
        return [para for para in paragraphs if para["qas"]]
    train, valid = (fitting(data.cloze_questions(data.read_lines([files[s]])))
                    for s in ("train", "valid"))
    for split, paragraphs in (("train", train), ("valid", valid)):
        if not paragraphs:
            raise data.DataError(f"{files[split]} gives no cloze questions: it needs "
                                 "sentences of 8 to 40 words (and a --bptt that fits them)")
    utils.print0(f"| --cloze-dir: {sum(len(p['qas']) for p in train)} questions made from "
                 f"{files['train'].name}, {sum(len(p['qas']) for p in valid)} from "
                 f"{files['valid'].name}")
    return train, valid


def main(args):
    check_args(args)
    if args.predict:
        return predict(args)
    tokenizer, vocab = data.Tokenizer(), data.Vocab.load(args.save_vocab)
    device = utils.setup(args, f"tokenizer: {tokenizer.name} ({data.BACKEND})")
    head = functools.partial(QuestionAnswerTask, match_feature=args.match_feature)
    raw, model = utils.finetune_model(head, args, vocab, device)

    if args.cloze_dir is not None:
        train_paragraphs, dev_source = cloze_files(args.cloze_dir, tokenizer, args.bptt)
    else:
        train_paragraphs = data.read_squad(squad_path(args, "train_file", "train-v1.1.json"))
        dev_source = squad_path(args, "dev_file", "dev-v1.1.json")
    examples, feats = data.squad_features(train_paragraphs, tokenizer, vocab,
                                          args.bptt, args.doc_stride or None, training=True)
    train = [feats[k].to(device) for k in ("input_ids", "token_types", "match", "start", "end")]
    dev = Evaluator(dev_source, args, tokenizer, vocab, device)
    utils.print0(f"| train: {len(examples)} questions, {len(train[0])} windows with the answer "
                 f"inside | dev: {len(dev.examples)} questions, {len(dev.features['start'])} windows")

    def validate(model):
        r = dev(model)
        return r["loss"], "valid " + describe(r, len(dev.examples)), -r["f1"], scores(r)

    batches = lambda epoch: data.Batches(*train, batch_size=args.batch_size, shuffle=True,
                                         seed=args.seed, epoch=epoch, **utils.shard(True))
    train_log, val_log = utils.Trainer(
        args, model, raw, qa_loss, batches, len(batches(1)),
        validate, lambda: utils.save_task(args.save, raw, "qa_task", vocab.fingerprint),
        "qa_task", vocab.fingerprint).fit()

    utils.load_task(raw, args.save, "qa_task", vocab.fingerprint)
    final = Evaluator(args.test_file, args, tokenizer, vocab, device) if args.test_file else dev
    r = final(model)
    which = "test" if args.test_file else "dev"
    utils.finish(args, f"{which} " + describe(r, len(final.examples)), train_log, val_log,
                 r["loss"], scores(r))
    utils.atomic_write_text(args.predictions, json.dumps(r["predictions"], ensure_ascii=False))
    utils.print0(f"| wrote {len(r['predictions'])} answers to {args.predictions}")


if __name__ == "__main__":
    utils.cli(main, build_parser(), errors=(data.DataError,))
