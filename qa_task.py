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
import json

import torch

import checkpoint
import cloze
import corpus
import data
import dist
import squad
import train
import utils
import wordpiece
from model import MAX_POSITIONS, BertModel, QuestionAnswerTask


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
    add("--doc-stride", type=int, default=0,
        help="if > 0, read long contexts in overlapping windows this many tokens apart and take "
             "the best span of all windows (0: one window, the original)")
    add("--max-answer-len", type=int, default=30, help="longest answer considered, in tokens")
    add("--loss", default="start-end", choices=squad.LOSSES,
        help="the training loss: 'start-end', the mean of the start and end cross-entropies "
             "(the original's and BERT's); 'span', the cross-entropy of the answer's span among "
             "all the spans the answer may be (start + end scores, as the decoding chooses), "
             "so the model learns how long answers are")
    add("--decode", default="best", choices=["best", "expected-f1", "choose"],
        help="the answer of a window: its most probable span (start + end score), or the span "
             "with the highest expected F1 under the model's span distribution (minimum "
             "Bayes risk: it trades exact matches for overlap); 'choose' (with "
             "--holdout-articles): after training, the one of 'best' and 'expected-f1' at "
             "temperatures 1, 0.8, 0.67, 0.5 with the highest F1 on the held-out articles "
             "(the epochs are chosen with 'best')")
    add("--decode-temperature", type=float, default=1.0,
        help="with --decode expected-f1: the temperature of the span distribution (below 1 "
             "leans toward the most probable span)")
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
    add("--match-neighbours", action="store_true",
        help="with --match-feature: also mark each token with a learned input embedding of "
             "whether the tokens just before and after it in its window match the question, "
             "which shows where an answer that the question's words surround begins and ends")
    add("--qa-head", type=str, default="original", choices=QuestionAnswerTask.HEADS,
        help="the span head: 'original', GELU then a linear layer (the original example's); "
             "'bert', the linear layer alone (BERT's, which transformers' "
             "BertForQuestionAnswering computes, so the model can be exported)")
    add("--random-init", action="store_true",
        help="take only the sizes from --bert-model and start from random weights (the "
             "baseline that shows what pretraining brings)")
    add("--cloze-dir", type=str, default=None, metavar="DIR",
        help="span-selection pretraining: train on questions made without labels from the "
             "WikiText corpus in DIR (wiki.train.tokens; scored on wiki.valid.tokens) instead of "
             "SQuAD, then fine-tune on SQuAD from the model it writes with --checkpoint FILE")
    add("--cloze-style", default="sentence", choices=sorted(cloze.STYLES),
        help="the --cloze-dir questions: 'sentence', the answer's whole sentence without it, "
             "a quarter of its words dropped, in contexts of up to 90 words of a paragraph; "
             "'short', 6 to 12 words beside the answer, a tenth dropped, in contexts of up to "
             "110 words of a section (as long as SQuAD's questions and nearer its paragraphs); "
             "'mixed', as 'short' with answers of the kinds SQuAD asks for: names, dates and "
             "amounts, phrases of 2 to 5 words, single words")
    add("--cloze-fresh", action="store_true",
        help="with --cloze-dir: other questions from the same text every epoch (epoch k's "
             "made with seed k-1), as many windows as the first epoch's; without it every "
             "epoch reads the same questions")
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
                     help="a JSON file (plain or .gz) of questions: SQuAD format, or a list of "
                          "{\"question\": ..., \"context\": ..., \"id\": optional}; the answers "
                          "also go to --predictions")
    return p


def check_args(args):
    asking = [f for f in ("question", "context", "context_file", "predict_file")
              if getattr(args, f) is not None]
    if asking and not args.predict:
        raise utils.UserError(f"--{asking[0].replace('_', '-')} is for answering questions: add "
                              "--predict")
    if args.cloze_dir is None:
        cloze_only = [f for f, on in (("cloze_style", args.cloze_style != "sentence"),
                                      ("cloze_fresh", args.cloze_fresh)) if on]
        if cloze_only:
            raise utils.UserError(f"--{cloze_only[0].replace('_', '-')} is for span-selection "
                                  "pretraining: add --cloze-dir DIR")
    if args.cloze_dir is not None:
        given = [f for f in ("train_file", "dev_file", "test_file", "predict_file")
                 if getattr(args, f) is not None]
        if args.holdout_articles:
            given.insert(0, "holdout_articles")
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
    if args.match_neighbours and not args.match_feature and not args.predict:
        raise utils.UserError("--match-neighbours marks the neighbours of the tokens that "
                              "--match-feature marks: add --match-feature")
    utils.check_positive(args, "epochs", "batch_size", "bptt", "log_interval", "lr",
                         "max_answer_len", "decode_temperature")
    if args.decode_temperature != 1.0 and args.decode != "expected-f1":
        raise utils.UserError("--decode-temperature is for --decode expected-f1; add it"
                              + (" (--decode choose chooses it)" if args.decode == "choose" else ""))
    if args.decode == "choose" and (args.predict or not args.holdout_articles):
        raise utils.UserError("--decode choose chooses on held-out training articles: "
                              + ("give the chosen --decode (and --decode-temperature) to "
                                 "--predict" if args.predict else "add --holdout-articles N"))
    if args.holdout_articles < 0:
        raise utils.UserError(f"--holdout-articles must be 0 (off) or positive, got "
                              f"{args.holdout_articles}")
    if args.doc_stride < 0:
        raise utils.UserError(f"--doc-stride must be 0 (off) or positive, got {args.doc_stride}")
    if args.bptt > MAX_POSITIONS:
        raise utils.UserError(f"--bptt {args.bptt} exceeds the model's {MAX_POSITIONS} positions")
    utils.check_writable(args.save, args.predictions, args.loss_log, utils.results_path(args))


def squad_path(args, flag, name):
    given = getattr(args, flag)
    if given:
        return given
    return squad.squad_file(corpus.dataset_dir("SQuAD1", args.data_dir), name)


def qa_loss(model, w, pad=data.PAD, kind="start-end", max_answer_len=30):
    """The loss on Windows w (squad.window_loss: 'start-end', the original's, or 'span');
    pad: the padding id."""
    s_logits, e_logits = squad.qa_logits(model, w.input_ids, w.token_types, w.match, pad)
    return squad.window_loss(s_logits, e_logits, w, kind, max_answer_len)


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
    paragraphs = squad.questions_to_answer(args.question, args.context, args.context_file,
                                           args.predict_file)
    tokenizer, vocab = wordpiece.from_args(args)
    ctx = dist.setup(args, f"tokenizer: {tokenizer.name} ({data.BACKEND})")
    ckpt = checkpoint.load(args.save, "qa_task")
    checkpoint.check_fit(ckpt, args.save, ckpt["config"], vocab.fingerprint)  # the vocabulary
    raw = checkpoint.build(ckpt, args.save).to(ctx.device)
    args.shape_feature = raw.shape_embed is not None  # the questions read as it was trained
    if not args.doc_stride:
        args.doc_stride = max(1, args.bptt // 2)  # a long context is read whole, in windows
    reader = squad.Evaluator(paragraphs, args, tokenizer, vocab, ctx)
    spans, _ = reader.decode(raw)
    answers = reader.answers(spans, scores=True)
    questions = {q["id"]: q["question"] for p in paragraphs for q in p["qas"]}
    for ex in reader.examples:
        text, score, prob = answers[ex["id"]]
        ctx.print0(f"| question {ex['id']}: {questions[ex['id']].strip()}")
        ctx.print0(f"| answer: {text!r} | score {score:.2f} | probability {prob:.3f}")
    if args.predict_file:
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


def choose_decoding(args, held_out, model, recorder, ctx):
    """--decode choose: score the kept model's answers on the held-out articles under each
    of squad.DECODINGS, keep the one of the highest F1 in args (the first of a tie), and
    record them all."""
    tried = []
    for decode, temperature in squad.DECODINGS:
        args.decode, args.decode_temperature = decode, temperature
        r = held_out(model)
        tried.append(dict(decode=decode, temperature=temperature, exact=r["exact"], f1=r["f1"]))
        ctx.print0(f"| decoding on the held-out articles: {squad.decoding_name(decode, temperature):18s}"
                   f" | exact {r['exact']:8.3f}% | f1 {r['f1']:8.3f}%")
    best = max(tried, key=lambda t: t["f1"])  # max keeps the first of equal ones
    args.decode, args.decode_temperature = best["decode"], best["temperature"]
    recorder.write(dict(record="decode", tried=tried, **best))
    name = squad.decoding_name(args.decode, args.decode_temperature)
    flags = "" if args.decode == "best" else (
        f" --decode expected-f1 --decode-temperature {args.decode_temperature:g}")
    ctx.print0(f"| decoding chosen: {name} (held-out F1 {best['f1']:.3f}); "
               f"--predict answers the same with{flags or ' the default --decode best'}")


def main(args):
    check_args(args)
    if args.predict:
        return predict(args)
    tokenizer, vocab = wordpiece.from_args(args)
    ctx = dist.setup(args, f"tokenizer: {tokenizer.name} ({data.BACKEND})")
    train.lock_outputs(args, ctx)
    recorder = train.recorder(args, ctx)
    raw = QuestionAnswerTask(encoder(args, vocab, ctx), match_feature=args.match_feature,
                             head=args.qa_head, shape_feature=args.shape_feature,
                             match_neighbours=args.match_neighbours)
    model = train.prepare_model(raw, args, ctx)

    if args.cloze_dir is not None:
        train_paragraphs, dev_source, cloze_text = cloze.cloze_files(
            args.cloze_dir, tokenizer, args.bptt, ctx.print0, args.cloze_style)
    elif args.holdout_articles:
        # Choose on held-out training articles; the dev (or test) file is scored once.
        train_paragraphs, dev_source = squad.read_squad(
            squad_path(args, "train_file", "train-v1.1.json"), args.holdout_articles)
        if not args.test_file:
            args.test_file = squad_path(args, "dev_file", "dev-v1.1.json")
    else:
        train_paragraphs = squad.read_squad(squad_path(args, "train_file", "train-v1.1.json"))
        dev_source = squad_path(args, "dev_file", "dev-v1.1.json")
    examples, windows = squad.squad_features(train_paragraphs, tokenizer, vocab, args.bptt,
                                             args.doc_stride or None, training=True,
                                             show=ctx.main, shape=args.shape_feature)
    windows = windows.to(ctx.device)
    blind = args.keep == "last" and not args.holdout_articles and args.cloze_dir is None
    # The file scored at the end is read before training, so that a bad one fails first.
    final = squad.Evaluator(args.test_file, args, tokenizer, vocab, ctx) if args.test_file else None
    # Trained blind, nothing is chosen: the dev file is read only when it is the one scored.
    dev = (final if blind and final is not None
           else squad.Evaluator(dev_source, args, tokenizer, vocab, ctx))
    chooser = (f"held-out articles ({args.holdout_articles})" if args.holdout_articles
               else "dev" if args.keep == "best" or args.cloze_dir else "evaluation, scored once at the end")
    ctx.print0(f"| train: {len(examples)} questions, {len(windows)} windows with the answer "
               f"inside | {chooser}: {len(dev.examples)} questions, {len(dev.windows)} windows")

    fresh = {}  # the windows of the last epoch made with --cloze-fresh

    def epoch_windows(epoch):
        if args.cloze_dir is None or not args.cloze_fresh or epoch == 1:
            return windows
        if epoch not in fresh:
            paragraphs = cloze.cloze_split(cloze_text, tokenizer, args.bptt, args.cloze_style,
                                           seed=epoch - 1)
            _, more = squad.squad_features(paragraphs, tokenizer, vocab, args.bptt,
                                           args.doc_stride or None, training=True, show=False,
                                           shape=args.shape_feature)
            if len(more) > len(windows):  # the first epoch's number of steps: a random subset
                g = torch.Generator().manual_seed(epoch)
                more = more[torch.randperm(len(more), generator=g)[:len(windows)].sort().values]
            ctx.print0(f"| --cloze-fresh: epoch {epoch} reads "
                       f"{sum(len(p['qas']) for p in paragraphs)} other questions (seed "
                       f"{epoch - 1}), {len(more)} windows")
            fresh.clear()
            fresh[epoch] = more.to(ctx.device)
        return fresh[epoch]

    batches = lambda epoch, start=0: data.Batches(
        epoch_windows(epoch), batch_size=args.batch_size, shuffle=True, seed=args.seed,
        epoch=epoch, start=start, **ctx.shard(True))
    task = train.Task(
        "qa_task", lambda m, w: qa_loss(m, w, vocab.roles.pad, args.loss, args.max_answer_len),
        batches, len(batches(1)), None if blind else lambda model: numbers(dev(model)),
        describe, args.save, vocab.fingerprint, select=lambda r: -r["f1"], keep=args.keep)
    trainer = train.Trainer(args, ctx, model, raw, task, recorder)
    trainer.fit()
    if args.decode == "choose":
        choose_decoding(args, dev, model, recorder, ctx)
    r = (dev if final is None else final)(model)
    trainer.finish(numbers(r), "test" if args.test_file else "dev")
    checkpoint.atomic_write_text(args.predictions, json.dumps(r["predictions"], ensure_ascii=False),
                                 ctx.main)
    ctx.print0(f"| wrote {len(r['predictions'])} answers to {args.predictions}")


if __name__ == "__main__":
    dist.cli(main, build_parser(), errors=(data.DataError,))
