"""Next-sentence pretraining of the encoder trained by mlm_task.py (the second step).

    python ns_task.py --bert-model mlm_bert.pt                      # WikiText-103, as the original
    python ns_task.py --bert-model mlm_bert.pt --dataset WikiText2 --data-dir DIR
    python ns_task.py --bert-model mlm_bert.pt --device cuda

Each line with at least --min_sentence_len tokens is split at a random point into
(A, B); for --frac_ns of the pairs B is replaced by the A of another pair. The
model reads <cls> A <sep> B <sep> and predicts 1 (B follows A) or 0. Pairs are made
per batch from the token store (samples.Pairs), drawn anew and shuffled each epoch. Writes
ns_bert.pt (the encoder, loaded by qa_task.py), ns_model.pt (encoder and
classifier, best on validation) and ns_loss.txt.
"""
import torch.nn.functional as F

import checkpoint
import corpus
import data
import dist
import samples
import train
import utils
import wordpiece
from model import MAX_POSITIONS, NextSentenceTask


def build_parser():
    p = utils.base_parser("BERT next-sentence pretraining", lr=0.25, clip=0.1, epochs=5,
                          batch_size=24, log_interval=600, save="ns_bert.pt", seed=312216194,
                          state="ns_state.pt")
    add = p.add_argument
    utils.add_corpus_flags(p, "WikiText103", corpus.DATASETS, "next-sentence")
    add("--min_sentence_len", type=int, default=60,
        help="lines shorter than this many tokens are not used")
    add("--frac_ns", type=float, default=0.5, help="fraction of pairs whose B is not the next text")
    add("--bert-model", type=str, default="mlm_bert.pt", help="the encoder written by mlm_task.py")
    add("--dropout", type=float, default=None,
        help="dropout of the encoder (default: the value it was pretrained with)")
    add("--cuda", dest="device", action="store_const", const="cuda",
        help="same as --device cuda (the original's flag)")
    add("--save-full", type=str, default="ns_model.pt",
        help="where to keep the best full model (encoder and classifier)")
    add("--loss-log", type=str, default="ns_loss.txt", help="the loss log written at the end")
    return p


def check_args(args):
    utils.check_positive(args, "epochs", "batch_size", "bptt", "log_interval", "lr")
    if not 0.0 <= args.frac_ns <= 1.0:
        raise utils.UserError(f"--frac_ns must be between 0 and 1, got {args.frac_ns}")
    if args.min_sentence_len < 0:
        raise utils.UserError(f"--min_sentence_len must not be negative, got {args.min_sentence_len}")
    if args.bptt + 1 > MAX_POSITIONS:
        raise utils.UserError(f"--bptt {args.bptt} plus <cls> exceeds the model's "
                              f"{MAX_POSITIONS} positions")
    utils.check_writable(args.save, args.save_full, args.loss_log, utils.results_path(args))


def ns_step(model, batch, reduce=True, pad=data.PAD):
    """Cross-entropy of the is-next classifier on (inputs, types, labels) (N, S+1), (N,);
    pad: the padding id."""
    inputs, types, labels = batch
    logits = model(inputs, types, key_padding_mask=inputs == pad)  # (N, 2)
    if reduce:
        return F.cross_entropy(logits.float(), labels)
    return dict(loss=F.cross_entropy(logits.float(), labels, reduction="sum"),
                correct=(logits.argmax(1) == labels).sum(), count=len(labels))


def describe(split, r):
    """The scores' text in the printouts."""
    text = f"{split} loss {r['loss']:8.5f} | "
    if split == "test":
        text += f"test ppl {utils.safe_exp(r['loss']):8.5f} | "
    return text + f"{split} accuracy {r['accuracy']:6.2f}%"


def main(args):
    check_args(args)
    tokenizer, vocab = wordpiece.from_args(args)
    ctx = dist.setup(args, f"tokenizer: {tokenizer.name} ({data.BACKEND})")
    if not args.prepare_only:  # a mismatched encoder fails now, not after the data
        train.lock_outputs(args, ctx)
        recorder = train.recorder(args, ctx)
        raw = NextSentenceTask(checkpoint.load_encoder(args.bert_model, vocab, args.dropout))
        model = train.prepare_model(raw, args, ctx)
    sources = corpus.corpus_sources(args.dataset, corpus.dataset_dir(args.dataset, args.data_dir))
    splits = corpus.load_corpus(args.dataset, sources, vocab, tokenizer, args.cache_dir, ctx)
    if args.prepare_only:
        ctx.print0(f"| --prepare-only: the token stores are ready in {args.cache_dir}; stopping "
                   "before training")
        return

    def pairs(split, epoch):
        """The split's pairs, drawn anew each training epoch; validation and test pairs are
        drawn once (epochs -1 and -2), so that their losses compare across epochs."""
        return samples.Pairs(splits[split], args.min_sentence_len, args.frac_ns, args.bptt,
                             (args.seed, epoch), vocab.roles, ctx.device)

    fixed = {"valid": pairs("valid", -1), "test": pairs("test", -2)}
    train_pairs = pairs("train", 1)
    for split, p in (("train", train_pairs), *fixed.items()):
        ctx.print0(f"| {split}: {len(p)} pairs (lines with at least {args.min_sentence_len} tokens)")

    def train_batches(epoch, start):
        order = samples.Shuffle(len(train_pairs), args.seed, epoch, samples.ORDER)
        return data.Batches(train_pairs.redraw((args.seed, epoch)), batch_size=args.batch_size,
                            order=order, start=start, **ctx.shard(True))

    def evaluate(split):
        batches = data.Batches(fixed[split], batch_size=args.batch_size, **ctx.shard(False))
        sums = train.evaluate(model, batches, lambda m, b: ns_step(m, b, False, vocab.roles.pad),
                              args.amp, args.dry_run, ctx)
        return dict(loss=sums["loss"] / sums["count"],
                    accuracy=100.0 * sums["correct"] / sums["count"])

    task = train.Task(
        "ns_task", lambda m, b: ns_step(m, b, pad=vocab.roles.pad), train_batches,
        data.Batches.count(len(train_pairs), args.batch_size, **ctx.shard(True)),
        lambda model: evaluate("valid"), describe, args.save_full, vocab.fingerprint,
        fmt=("8.5f", "5.2f"))
    trainer = train.Trainer(args, ctx, model, raw, task, recorder)
    trainer.fit()
    scores = evaluate("test")
    trainer.finish(scores)
    checkpoint.save_encoder(args.save, raw.bert_model, vocab.fingerprint, ctx.main,
                            test_loss=scores["loss"], test_accuracy=scores["accuracy"])
    ctx.print0(f"| saved the encoder to {args.save}")


if __name__ == "__main__":
    dist.cli(main, build_parser(), errors=(data.DataError,))
