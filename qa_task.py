"""SQuAD v1.1 fine-tuning of the pretrained encoder (the third step), and answering
questions with the model it writes.

    python qa_task.py --bert-model ns_bert.pt                       # .data/SQuAD1, downloaded
    python qa_task.py --bert-model ns_bert.pt --data-dir DIR --epochs 30
    python qa_task.py --bert-model ns_bert.pt --train-file T.json --dev-file D.json --doc-stride 64
    python qa_task.py --bert-model ns_bert.pt --checkpoint span_model.pt   # after span_task.py
    python qa_task.py --predict --question "Who?" --context "..."   # answers with qa_model.pt

The model reads <cls> question <sep> context <sep> (cut to --bptt) and scores each
position as the answer's start and end. Every dev question is scored with the
official SQuAD v1.1 exact match and F1 (a question whose answer was cut off scores
0); the original example's token-level numbers are printed beside them. Writes
qa_model.pt (best on dev F1), predictions.json ({question id: answer}, the format
the official evaluation script reads) and qa_loss.txt.
"""
import json

import torch

import checkpoint
import corpus
import data
import dist
import squad
import train
import utils
import wordpiece
from model import MAX_POSITIONS, BertModel, QuestionAnswerTask


def add_model_flags(p):
    """The flags of the QA model and of how it reads and answers questions, which
    span_task.py shares."""
    add = p.add_argument
    add("--bert-model", type=str, default="ns_bert.pt", help="the encoder written by ns_task.py "
        "(or mlm_task.py), or a transformers BERT folder")
    add("--dropout", type=float, default=None,
        help="dropout of the encoder (default: the value it was pretrained with)")
    add("--match-feature", action="store_true",
        help="mark each context word that also occurs in the question with a learned input "
             "embedding (DrQA's exact-match feature); off: the original model")
    add("--shape-feature", action="store_true",
        help="mark each question and context token with a learned input embedding of its "
             "shape in the raw text (lower case, Capitalised, UPPER CASE, number, other), "
             "which the lower-casing tokenizer hides; with --checkpoint of a model without "
             "it, that embedding starts at random")
    add("--qa-head", type=str, default="original", choices=QuestionAnswerTask.HEADS,
        help="the span head: 'original', GELU then a linear layer (the original example's); "
             "'bert', the linear layer alone (BERT's, which transformers' "
             "BertForQuestionAnswering computes, so the model can be exported)")
    add("--random-init", action="store_true",
        help="take only the sizes from --bert-model and start from random weights (the "
             "baseline that shows what pretraining brings)")
    add("--freeze-embeddings", action="store_true",
        help="keep the encoder's word embeddings fixed (words that occur only in the evaluation "
             "file then keep embeddings of the same kind as the rest; DrQA fixes its word "
             "vectors the same way)")
    add("--doc-stride", type=int, default=0,
        help="if > 0, read long contexts in overlapping windows this many tokens apart and take "
             "the best span of all windows (0: one window, the original)")
    add("--max-answer-len", type=int, default=30, help="longest answer considered, in tokens")
    add("--decode", default="best", choices=["best", "expected-f1"],
        help="the answer of a window: its most probable span (start + end score), or the span "
             "with the highest expected F1 under the model's span distribution (minimum "
             "Bayes risk: it trades exact matches for overlap)")
    add("--decode-temperature", type=float, default=1.0,
        help="with --decode expected-f1: the temperature of the span distribution (below 1 "
             "leans toward the most probable span)")


def build_parser():
    p = utils.base_parser("BERT fine-tuning for SQuAD v1.1 question answering", lr=5.0, clip=0.1,
                          epochs=2, batch_size=72, log_interval=200, save="qa_model.pt",
                          seed=21192391, state="qa_state.pt")
    add_model_flags(p)
    add = p.add_argument
    add("--train-file", type=str, default=None,
        help="SQuAD-format training file (default: train-v1.1.json[.gz] in --data-dir)")
    add("--dev-file", type=str, default=None,
        help="SQuAD-format file evaluated every epoch (default: dev-v1.1.json[.gz] in --data-dir)")
    add("--test-file", type=str, default=None,
        help="SQuAD-format file for the final evaluation (default: the dev file again)")
    add("--holdout-articles", type=int, default=0, metavar="N",
        help="keep the last N articles of the training file out of training and choose the "
             "epoch (the model kept in --save) by F1 on them; the --test-file (or --dev-file) "
             "is then scored once, at the end, and chooses nothing (0: choose on --dev-file, "
             "as the original did, unless --keep last)")
    add("--keep", default="best", choices=["best", "last"],
        help="the model kept in --save: 'best', the epoch of the highest F1 on the held-out "
             "articles (or on --dev-file); 'last', the last epoch, chosen by nothing: with "
             "--holdout-articles 0 every article of the training file is trained on, no "
             "file is scored between epochs, and the --test-file (or --dev-file) is scored "
             "once, at the end (settings fixed in advance)")
    add("--predictions", type=str, default="predictions.json",
        help="where to write the final answers, {question id: text}")
    add("--loss-log", type=str, default="qa_loss.txt", help="the loss log written at the end")
    ask = p.add_argument_group("answering questions (--predict)")
    ask.add_argument("--predict", nargs="?", const="", default=None, metavar="FILE",
                     help="do not train: answer questions with the model in --save (qa_model.pt): "
                          "--question about --context, or those of FILE, a JSON file (plain or "
                          ".gz) in SQuAD format or a list of {\"question\": ..., \"context\": "
                          "..., \"id\": optional}, whose answers also go to --predictions")
    ask.add_argument("--question", type=str, default=None, help="a question about --context")
    ask.add_argument("--context", type=str, default=None, help="the text that holds the answer")
    return p


def check_model_args(args):
    utils.check_positive(args, "epochs", "batch_size", "bptt", "log_interval", "lr",
                         "max_answer_len", "decode_temperature")
    if args.decode_temperature != 1.0 and args.decode != "expected-f1":
        raise utils.UserError("--decode-temperature is for --decode expected-f1; add it")
    if args.doc_stride < 0:
        raise utils.UserError(f"--doc-stride must be 0 (off) or positive, got {args.doc_stride}")
    if args.bptt > MAX_POSITIONS:
        raise utils.UserError(f"--bptt {args.bptt} exceeds the model's {MAX_POSITIONS} positions")
    utils.check_writable(args.save, args.predictions, args.loss_log, utils.results_path(args))


def check_args(args):
    asking = [f for f, v in (("question", args.question), ("context", args.context)) if v is not None]
    if asking and args.predict is None:
        raise utils.UserError(f"--{asking[0]} is for answering questions: add --predict")
    if args.predict == "" and (args.question is None or args.context is None):
        raise utils.UserError("--predict needs --question with --context, or a file: --predict FILE")
    if args.predict and asking:
        raise utils.UserError(f"--predict {args.predict} answers the questions of that file: "
                              f"drop --{asking[0]}")
    if args.holdout_articles < 0:
        raise utils.UserError(f"--holdout-articles must be 0 (off) or positive, got "
                              f"{args.holdout_articles}")
    check_model_args(args)


def squad_path(args, given, name):
    return given or squad.squad_file(corpus.dataset_dir("SQuAD1", args.data_dir), name)


def qa_loss(model, w, pad=data.PAD):
    """The loss on Windows w: the mean of the start and end cross-entropies; pad: the
    padding id."""
    s_logits, e_logits = squad.qa_logits(model, w.input_ids, w.token_types, w.match, pad)
    return squad.window_loss(s_logits, e_logits, w)


def describe(split, r):
    """The scores' text in the printouts."""
    return (f"{split} loss {r['loss']:5.2f} | exact {r['exact']:8.3f}% | f1 {r['f1']:8.3f}%\n"
            f"| original-style token metrics ({r['orig_n']} of {r['questions']} questions) | "
            f"exact {r['orig_exact']:8.3f}% | f1 {r['orig_f1']:8.3f}%")


def numbers(r):
    """An Evaluator's result without its predictions."""
    return {k: v for k, v in r.items() if k != "predictions"}


def predict(args):
    """Answer questions with a trained model: print each answer with its score."""
    paragraphs = squad.questions_to_answer(args.question, args.context, args.predict or None)
    tokenizer, vocab = wordpiece.from_args(args)
    ctx = dist.setup(args, f"tokenizer: {tokenizer.name} ({data.BACKEND})")
    ckpt = checkpoint.load(args.save, "qa_task")
    checkpoint.check_fit(ckpt, args.save, ckpt["config"], vocab.fingerprint)  # the vocabulary
    raw = checkpoint.build(ckpt, args.save).to(ctx.device)
    # the questions read as the model was trained; a long context whole, in windows
    reading = squad.Reading.of(args, shape=raw.shape_embed is not None,
                               doc_stride=args.doc_stride or max(1, args.bptt // 2))
    reader = squad.Evaluator(paragraphs, reading, tokenizer, vocab, ctx)
    spans, _ = reader.decode(raw)
    answers = reader.answers(spans, scores=True)
    questions = {q["id"]: q["question"] for p in paragraphs for q in p["qas"]}
    for ex in reader.examples:
        text, score, prob = answers[ex["id"]]
        ctx.print0(f"| question {ex['id']}: {questions[ex['id']].strip()}")
        ctx.print0(f"| answer: {text!r} | score {score:.2f} | probability {prob:.3f}")
    if args.predict:
        checkpoint.atomic_write_text(args.predictions, json.dumps(
            {k: v[0] for k, v in answers.items()}, ensure_ascii=False), ctx.main)
        ctx.print0(f"| wrote {len(answers)} answers to {args.predictions}")


def encoder(args, vocab, ctx):
    """The encoder of --bert-model; with --random-init only its sizes, freshly initialised
    (the baseline that shows what pretraining brings)."""
    model = checkpoint.load_encoder(args.bert_model, vocab, args.dropout)
    if args.random_init:
        torch.manual_seed(args.seed)
        model = BertModel(**model.config)
        ctx.print0(f"| --random-init: {args.bert_model} gives the sizes only; the encoder starts "
                   "from random weights")
    return model


def start(args):
    """(ctx, tokenizer, vocab, recorder, raw model, model to train) of a training run."""
    tokenizer, vocab = wordpiece.from_args(args)
    ctx = dist.setup(args, f"tokenizer: {tokenizer.name} ({data.BACKEND})")
    train.lock_outputs(args, ctx)
    recorder = train.recorder(args, ctx)
    raw = QuestionAnswerTask(encoder(args, vocab, ctx), match_feature=args.match_feature,
                             head=args.qa_head, shape_feature=args.shape_feature)
    model = train.prepare_model(raw, args, ctx, args.freeze_embeddings)
    return ctx, tokenizer, vocab, recorder, raw, model


def fit(args, ctx, vocab, recorder, raw, model, windows_of, steps, dev, final, split, keep):
    """Train on windows_of(epoch) (steps batches an epoch), scoring dev between epochs
    (None: nothing scored, the last epoch kept), keep 'best' or 'last'; then score final
    as split ('dev' or 'test'), finish the run and write its answers."""
    batches = lambda epoch, start=0: data.Batches(
        windows_of(epoch), batch_size=args.batch_size, shuffle=True, seed=args.seed,
        epoch=epoch, start=start, **ctx.shard(True))
    task = train.Task(
        "qa_task", lambda m, w: qa_loss(m, w, vocab.roles.pad), batches, steps,
        None if dev is None else lambda model: numbers(dev(model)), describe, args.save,
        vocab.fingerprint, select=lambda r: -r["f1"], keep=keep)
    trainer = train.Trainer(args, ctx, model, raw, task, recorder)
    trainer.fit()
    r = final(model)
    trainer.finish(numbers(r), split)
    checkpoint.atomic_write_text(args.predictions, json.dumps(r["predictions"], ensure_ascii=False),
                                 ctx.main)
    ctx.print0(f"| wrote {len(r['predictions'])} answers to {args.predictions}")


def main(args):
    check_args(args)
    if args.predict is not None:
        return predict(args)
    ctx, tokenizer, vocab, recorder, raw, model = start(args)
    train_file = squad_path(args, args.train_file, "train-v1.1.json")
    dev_file = squad_path(args, args.dev_file, "dev-v1.1.json")
    # The file scored at the end: --test-file, else the dev file, which then chooses nothing
    # when the epoch is chosen on held-out training articles.
    test_file = args.test_file or (dev_file if args.holdout_articles else None)
    if args.holdout_articles:
        train_paragraphs, dev_source = squad.read_squad(train_file, args.holdout_articles)
    else:
        train_paragraphs, dev_source = squad.read_squad(train_file), dev_file
    reading = squad.Reading.of(args)
    examples, windows = squad.squad_features(train_paragraphs, tokenizer, vocab, args.bptt,
                                             args.doc_stride or None, training=True,
                                             show=ctx.main, shape=args.shape_feature)
    windows = windows.to(ctx.device)
    blind = args.keep == "last" and not args.holdout_articles
    # The file scored at the end is read before training, so that a bad one fails first.
    final = squad.Evaluator(test_file, reading, tokenizer, vocab, ctx) if test_file else None
    # Trained blind, nothing is chosen: the dev file is read only when it is the one scored.
    dev = (final if blind and final is not None
           else squad.Evaluator(dev_source, reading, tokenizer, vocab, ctx))
    chooser = (f"held-out articles ({args.holdout_articles})" if args.holdout_articles
               else "dev" if args.keep == "best" else "evaluation, scored once at the end")
    ctx.print0(f"| train: {len(examples)} questions, {len(windows)} windows with the answer "
               f"inside | {chooser}: {len(dev.examples)} questions, {len(dev.windows)} windows")
    fit(args, ctx, vocab, recorder, raw, model, lambda epoch: windows,
        data.Batches.count(len(windows), args.batch_size, **ctx.shard(True)),
        None if blind else dev, final or dev, "test" if test_file else "dev", args.keep)


if __name__ == "__main__":
    dist.cli(main, build_parser(), errors=(data.DataError,))
