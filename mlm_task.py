"""Masked-LM pretraining of the BERT encoder (the first step of the pipeline).

    python mlm_task.py                                  # BERT-base on WikiText-2, CPU or one GPU
    python mlm_task.py --data-dir DIR --emsize 256 --nhid 1024 --nlayers 4 --nhead 4
    python mlm_task.py --device cuda --dataset WikiText103 --data-dir DIR

Writes mlm_bert.pt (the encoder and its configuration, which ns_task.py and
qa_task.py load), full_mlm_model.pt (encoder and MLM head, best on validation),
the vocabulary (--save-vocab) and the loss log mlm_loss.txt.
"""
import math
from pathlib import Path

import torch

import checkpoint
import corpus
import data
import dist
import samples
import train
import utils
import wordpiece
from model import LAYOUTS, MAX_POSITIONS, BertModel, MLMTask


def build_parser():
    p = utils.base_parser("BERT masked-LM pretraining", lr=6.0, clip=0.1, epochs=8, batch_size=32,
                          log_interval=10, save="mlm_bert.pt", state="mlm_state.pt")
    add = p.add_argument
    add("--emsize", type=int, default=768, help="size of word embeddings")
    add("--nhid", type=int, default=3072, help="number of hidden units per layer")
    add("--nlayers", type=int, default=12, help="number of layers")
    add("--nhead", type=int, default=12, help="the number of heads in the encoder")
    add("--dropout", type=float, default=0.2, help="dropout applied to layers (0 = no dropout)")
    add("--layout", type=str, default="original", choices=sorted(LAYOUTS),
        help="the encoder's layers: 'original', post-LayerNorm with dropout inside the "
             "feed-forward block and LayerNorm epsilon 1e-5 (the original's, torch's "
             "TransformerEncoderLayer); 'bert', BERT's: no dropout there, epsilon 1e-12, as "
             "transformers' BERT (export.py writes its masked-LM model); 'pre-ln', "
             "pre-LayerNorm layers (a LayerNorm before attention and the feed-forward block, "
             "one after the last layer). Stored in the checkpoint: ns_task.py and qa_task.py "
             "follow it")
    add("--tie-weights", action="store_true",
        help="use the word embeddings as the masked-LM output projection, as BERT does (the "
             "original keeps a separate one)")
    add("--mask_frac", type=float, default=0.15, help="the fraction of masked tokens")
    add("--mask-mode", type=str, default="mask", choices=["mask", "bert", "whole-word"],
        help="'mask': every masked token becomes <MASK> (the original); "
             "'bert': 80%% <MASK>, 10%% a random word, 10%% unchanged; 'whole-word': "
             "'bert' with the pieces of a word masked together (WordPiece's ## pieces; with "
             "the word vocabulary every token is a word, and it is 'bert')")
    add("--mask-draw", type=str, default="per-token", choices=["per-token", "per-sequence"],
        help="'per-token': each token is masked with probability --mask_frac, at least one "
             "per batch (the original); 'per-sequence': BERT's, exactly round(--mask_frac x "
             "length) tokens per sequence, a step whose shapes never wait for the device, for "
             "fast GPU steps and --compile")
    add("--order", type=str, default="shuffled", choices=["shuffled", "sequential"],
        help="the order of the training blocks: 'shuffled', anew each epoch (a function of "
             "--seed, the epoch and the position, the same for any number of processes); "
             "'sequential', the corpus's order every epoch (the original)")
    utils.add_corpus_flags(p, "WikiText2", corpus.DATASETS, "MLM")
    add("--vocab-size", type=int, default=30522,
        help="size of the WordPiece vocabulary trained when --vocab-file does not exist")
    add("--save-full", type=str, default="full_mlm_model.pt",
        help="where to keep the best full model (encoder and MLM head)")
    add("--loss-log", type=str, default="mlm_loss.txt", help="the loss log written at the end")
    return p


def check_args(args):
    utils.check_positive(args, "emsize", "nhid", "nlayers", "nhead", "epochs", "batch_size",
                         "bptt", "log_interval", "lr")
    if args.emsize % args.nhead:
        raise utils.UserError(f"--nhead {args.nhead} must divide --emsize {args.emsize}")
    if not 0.0 < args.mask_frac < 1.0:
        raise utils.UserError(f"--mask_frac must be between 0 and 1, got {args.mask_frac}")
    if not 0.0 <= args.dropout < 1.0:
        raise utils.UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.bptt + 1 > MAX_POSITIONS:
        raise utils.UserError(f"--bptt {args.bptt} plus <cls> exceeds the model's "
                              f"{MAX_POSITIONS} positions")
    utils.check_writable(args.save, args.save_full, args.loss_log, utils.results_path(args),
                         args.vocab_file if args.tokenizer == "wordpiece" else args.save_vocab)


def prepare_vocab(args, dataset, sources, ctx):
    """(tokenizer, vocab): read --save-vocab (or --vocab-file for WordPiece) if it exists,
    as the original did, else build it from the training split (rank 0, with every core)
    and write it there."""
    path = Path(args.vocab_file if args.tokenizer == "wordpiece" else args.save_vocab)
    built = []

    def build():
        if path.exists():
            return
        built.append(path)
        if args.tokenizer == "wordpiece":
            lines = corpus.vocabulary_lines(dataset, corpus.read_lines(
                sources["train"][0], corpus.CORPORA[dataset].read))
            itos = wordpiece.train_vocab(lines, args.vocab_size, not args.cased)
            checkpoint.atomic_write_text(path, "\n".join(itos) + "\n")
            print(f"| WordPiece vocabulary: {len(itos)} tokens trained on the {dataset} train "
                  f"split, saved to {path}", flush=True)
        else:
            vocab = data.Vocab.from_counts(corpus.count_vocab(dataset, sources, data.Tokenizer()))
            checkpoint.atomic_write_text(path, vocab.to_text())
            print(f"| vocabulary: {len(vocab)} tokens built from the {dataset} train split, "
                  f"saved to {path}", flush=True)

    ctx.once(build, path.exists)
    if args.tokenizer == "wordpiece":
        tokenizer, vocab = wordpiece.from_args(args)
    else:
        tokenizer, vocab = data.Tokenizer(), data.Vocab.load(path)
    if not built:
        ctx.print0(f"| vocabulary: {len(vocab)} {'WordPiece ' * (args.tokenizer == 'wordpiece')}"
                   f"tokens read from {path}")
    return tokenizer, vocab


def mlm_loss(args, vocab, generator, ctx, train=True):
    """loss_fn(model, block) for the Trainer (mean loss) or train.evaluate (sums), masking
    as --mask_frac, --mask-mode and --mask-draw say.

    block (B * world, bptt) is the global batch: every rank draws the same masks for
    all of it from the same generator, then runs its own rows (ctx.rows, the sharding
    policy of every task), so a job of any size trains on the same masked batches. The
    loss is normalised by the global number of masked tokens (times world, as DDP
    averages gradients over the ranks).
    """
    continues = None  # every token is a word
    if args.mask_mode == "whole-word" and args.tokenizer == "wordpiece":
        continues = wordpiece.continuations(vocab).to(ctx.device)

    def per_token(model, block):
        tokens = data.add_cls(block, vocab.roles.cls)
        inputs, masked, _ = data.mask_tokens(tokens, args.mask_frac, len(vocab), args.mask_mode,
                                             generator, vocab.roles, continues)
        mine = ctx.rows(block.size(0))
        # summed over the M masked tokens; the model's head computes it
        loss = model(inputs[mine], masked_positions=masked[mine], targets=tokens[mine][masked[mine]])
        return loss, masked.sum(), masked[mine].sum()

    def per_sequence(model, block):
        tokens = data.add_cls(block, vocab.roles.cls)
        inputs, index, valid, targets = data.mask_per_sequence(
            tokens, args.mask_frac, len(vocab), args.mask_mode, generator, vocab.roles,
            continues=continues)
        mine = ctx.rows(block.size(0))
        loss = model(inputs[mine], masked_index=index[mine],
                     targets=targets[mine].masked_fill(~valid[mine], -100))  # (B, P) targets
        # clamp: a batch without a maskable token gives loss 0, with no check on the host
        return loss, valid.sum().clamp(min=1), valid[mine].sum()

    draw = per_sequence if args.mask_draw == "per-sequence" else per_token

    def loss_fn(model, block):
        loss, total, mine = draw(model, block)
        if train:
            return loss * ctx.world / total
        return dict(loss=loss, count=mine)
    return loss_fn


def describe(split, r):
    """The scores' text in the printouts."""
    return f"{split} loss {r['loss']:5.2f} | {split} ppl {r['ppl']:8.2f}"


def blocks(tokens, args, ctx, split):
    """The masked-LM samples of a split (samples.Blocks), refusing one too small for a
    global batch."""
    global_batch = args.batch_size * ctx.world
    out = samples.Blocks(tokens, args.bptt, ctx.device)
    if len(out) < global_batch:
        raise data.DataError(
            f"the {split} split has {len(tokens)} tokens, fewer than one batch of --batch_size "
            f"{global_batch} x --bptt {args.bptt} = {global_batch * args.bptt}; use a smaller "
            "batch or bptt, or more data")
    ctx.print0(f"| {split}: {len(tokens)} tokens, {len(out) // global_batch} batches")
    return out


def main(args):
    check_args(args)
    ctx = dist.setup(args, f"tokenizer: {args.tokenizer} ({data.BACKEND})")
    if not args.prepare_only:
        train.lock_outputs(args, ctx)
    recorder = None if args.prepare_only else train.recorder(args, ctx)
    sources = corpus.corpus_sources(args.dataset, corpus.dataset_dir(args.dataset, args.data_dir))
    tokenizer, vocab = prepare_vocab(args, args.dataset, sources, ctx)
    splits = corpus.load_corpus(args.dataset, sources, vocab, tokenizer, args.cache_dir, ctx)
    if args.prepare_only:
        ctx.print0(f"| --prepare-only: the vocabulary and the token stores are ready in "
                   f"{args.cache_dir}; stopping before training")
        return
    data_of = {split: blocks(tokens, args, ctx, split) for split, tokens in splits.items()}
    global_batch = args.batch_size * ctx.world

    def batches(split, epoch=0, start=0):
        # Every rank reads the whole global batch: the masks are drawn for all of it.
        order = None
        if split == "train" and args.order == "shuffled":
            order = samples.Shuffle(len(data_of[split]), args.seed, epoch, samples.ORDER)
        return data.Batches(data_of[split], batch_size=global_batch, drop_last=True, order=order,
                            start=start)

    raw = MLMTask.on(BertModel(len(vocab), args.emsize, args.nhead, args.nhid, args.nlayers,
                               args.dropout, **LAYOUTS[args.layout]),
                     args.tie_weights)
    model = train.prepare_model(raw, args, ctx)
    ctx.print0(f"| model: {sum(p.numel() for p in raw.parameters()):,} parameters")

    masks = torch.Generator(device=ctx.device).manual_seed(args.seed % 2**63)

    def evaluate(split):
        # The same masks at every evaluation, so valid losses compare across epochs.
        gen = torch.Generator(device=ctx.device).manual_seed((args.seed + 1) % 2**63)
        loss_fn = mlm_loss(args, vocab, gen, ctx, train=False)
        sums = train.evaluate(model, batches(split), loss_fn, args.amp, args.dry_run, ctx)
        loss = sums["loss"] / sums["count"]
        return dict(loss=loss, ppl=utils.safe_exp(loss))

    task = train.Task(
        "mlm_task", mlm_loss(args, vocab, masks, ctx),
        lambda epoch, start: batches("train", epoch, start), len(batches("train")),
        lambda model: evaluate("valid"),
        describe, args.save_full, vocab.fingerprint, generators=(masks,),
        train_tags=train.Task.train_tags + ("ppl",))
    trainer = train.Trainer(args, ctx, model, raw, task, recorder)
    trainer.fit()
    scores = evaluate("test")
    trainer.finish(scores)
    checkpoint.save_encoder(args.save, raw.bert_model, vocab.fingerprint, ctx.main,
                            test_loss=scores["loss"], test_ppl=math.exp(min(scores["loss"], 700)))
    ctx.print0(f"| saved the encoder to {args.save}")


if __name__ == "__main__":
    dist.cli(main, build_parser(), errors=(data.DataError,))
