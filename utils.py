"""What the three task scripts share: flags, device, seeding, checkpoints, the
train/evaluate loop and the original example's printouts.
"""
import argparse
import contextlib
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from model import BertModel

CHECKPOINT_VERSION = 1
LINE = "-" * 89
DOUBLE_LINE = "=" * 89


_UMASK = os.umask(0)
os.umask(_UMASK)


class UserError(Exception):
    """A mistake in flags or files; printed as one line, exit status 2."""


# --------------------------------------------------------------------------- CLI

class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line (not the whole usage) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def base_parser(description, **defaults):
    """Flags every task has, with that task's defaults (the original example's)."""
    p = Parser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--lr", type=float, default=defaults["lr"], help="initial learning rate")
    add("--clip", type=float, default=defaults.get("clip", 0.1), help="gradient clipping (max norm)")
    add("--epochs", type=int, default=defaults["epochs"], help="upper epoch limit")
    add("--batch_size", type=int, default=defaults["batch_size"], metavar="N", help="batch size")
    add("--bptt", type=int, default=defaults.get("bptt", 128), help="sequence length")
    add("--seed", type=int, default=defaults.get("seed", 5431916812), help="random seed")
    add("--log-interval", type=int, default=defaults["log_interval"], metavar="N",
        help="print a progress line every N batches")
    add("--save", type=str, default=defaults["save"], help="path to save the final model")
    add("--save-vocab", type=str, default="torchtext_bert_vocab.pt",
        help="vocabulary file (plain text, one token per line): read if it exists, else built "
             "from the training split and written here")
    add("--parallel", type=str, default="None", choices=["None", "DDP"],
        help="'DDP' trains with DistributedDataParallel")
    add("--world_size", type=int, default=8, help="number of processes for --parallel DDP")
    add("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
        help="where to train; auto takes CUDA when available")
    add("--data-dir", type=str, default=None,
        help="folder with the data set's files; None means .data/<dataset>, where missing files "
             "are downloaded")
    add("--dry-run", action="store_true", help="run one batch of each split, then stop")
    return p


def add_corpus_flags(p, default, choices, task):
    """--dataset and --cache-dir, for the tasks that read a text corpus."""
    p.add_argument("--dataset", type=str, default=default, choices=choices,
                   help=f"dataset used for the {task} task")
    p.add_argument("--cache-dir", type=str, default=".data/cache",
                   help="where token ids are cached so that later runs skip tokenization "
                        "('' disables)")


def check_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is None or value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")


def check_writable(*paths):
    """Fail before training, not after it, when an output cannot be written."""
    for path in paths:
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            raise UserError(f"cannot write {path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UserError(f"cannot write {path}: folder {parent} is not writable")
        if Path(path).is_dir():
            raise UserError(f"cannot write {path}: it is a folder")


def cli(main, parser, errors=()):
    """Run main(args); a user mistake becomes one line on stderr and exit status 2."""
    args = parser.parse_args()
    try:
        main(args)
    except (UserError, *errors) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


def setup(args):
    """Device, seeds and the DDP check; returns the torch.device to train on."""
    if args.parallel == "DDP":
        raise UserError("--parallel DDP is not supported by this version yet; "
                        "run without it (one process)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but CUDA is not available; use --device cpu")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    seed_everything(args.seed)
    return torch.device("cuda" if use_cuda else "cpu")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def print0(*a, **k):
    print(*a, **k, flush=True)


# --------------------------------------------------------------------------- checkpoints

def atomic_write(path, write):
    """write(tmp) a temporary file beside path, then rename it over path: a crash never
    leaves a half-written file in place of a good one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_checkpoint(path, kind, map_location="cpu"):
    """Load a checkpoint of this project (tensors and plain data only) and check its kind."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} not found; pass the file written by the previous step")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise UserError(f"{path} is not a checkpoint this project can read "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "bert-example":
        raise UserError(f"{path} is not a checkpoint written by this project")
    if ckpt.get("kind") != kind:
        raise UserError(f"{path} holds a {ckpt.get('kind')!r} checkpoint where {kind!r} is "
                        f"expected (pass the encoder file, e.g. mlm_bert.pt, not the full task)")
    return ckpt


def save_encoder(path, bert_model, vocab_fingerprint, **extra):
    """The encoder's weights, configuration and vocabulary fingerprint: what the next step loads."""
    atomic_save(dict(format="bert-example", version=CHECKPOINT_VERSION, kind="encoder",
                     config=dict(bert_model.config), model=bert_model.state_dict(),
                     vocab_fingerprint=vocab_fingerprint, **extra), path)


def load_encoder(path, vocab, dropout=None):
    """Rebuild a BertModel from an encoder checkpoint, refusing a vocabulary mismatch."""
    ckpt = load_checkpoint(path, "encoder")
    config = dict(ckpt["config"])
    if ckpt["vocab_fingerprint"] != vocab.fingerprint or config["ntoken"] != len(vocab):
        raise UserError(f"{path} was trained with another vocabulary ({config['ntoken']} tokens) "
                        f"than the one loaded ({len(vocab)} tokens); pass the --save-vocab file "
                        "written with that model")
    if dropout is not None:
        config["dropout"] = dropout
    model = BertModel(**config)
    model.load_state_dict(ckpt["model"])
    return model


def save_task(path, model, kind, vocab_fingerprint):
    """A whole task model (encoder and head) with the encoder's configuration."""
    atomic_save(dict(format="bert-example", version=CHECKPOINT_VERSION, kind=kind,
                     config=dict(model.bert_model.config), model=model.state_dict(),
                     vocab_fingerprint=vocab_fingerprint), path)


def load_task(model, path, kind, vocab_fingerprint):
    """Load a save_task checkpoint into model, refusing one of other sizes or vocabulary."""
    ckpt = load_checkpoint(path, kind)
    if ckpt["vocab_fingerprint"] != vocab_fingerprint:
        raise UserError(f"{path} was trained with another vocabulary than the one loaded; "
                        "pass the matching --save-vocab file")
    mine = {k: v for k, v in model.bert_model.config.items() if k != "dropout"}
    theirs = {k: v for k, v in ckpt["config"].items() if k != "dropout"}
    if mine != theirs:
        raise UserError(f"{path} holds a model of other sizes ({theirs}) than this one ({mine}); "
                        "pass the flags it was trained with")
    model.load_state_dict(ckpt["model"])
    return ckpt


# --------------------------------------------------------------------------- training loop

def autocast(device, amp="none"):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def train_epoch(model, batches, loss_fn, optimizer, args, epoch, fmt=("5.2f", "8.2f")):
    """One pass over batches; loss_fn(model, batch) -> mean loss tensor. Returns mean loss.

    Losses are summed on the device and read back only at log intervals, so the
    training step never waits for the host. fmt: formats of the printed loss and ppl.
    """
    model.train()
    nbatches = len(batches)
    total = interval = torch.zeros((), device=next(model.parameters()).device)
    count, start = 0, time.time()
    every = 1 if args.dry_run else args.log_interval
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        if args.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        total, interval = total + loss.detach(), interval + loss.detach()
        count += 1
        if count % every == 0:
            cur = check_finite(interval.item() / every, epoch, count)
            ms = (time.time() - start) * 1000 / every
            print0(f"| epoch {epoch:3d} | {count:5d}/{nbatches:5d} batches | lr "
                   f"{optimizer.param_groups[0]['lr']:05.5f} | ms/batch {ms:5.2f} | "
                   f"loss {cur:{fmt[0]}} | ppl {safe_exp(cur):{fmt[1]}}")
            interval, start = torch.zeros_like(interval), time.time()
        if args.dry_run:
            break
    return check_finite(total.item() / max(count, 1), epoch, count)


def check_finite(value, epoch, step):
    if not math.isfinite(value):
        raise UserError(f"training loss became {value} in epoch {epoch} by batch {step}; "
                        "lower --lr or --clip")
    return value


def safe_exp(x):
    return math.exp(min(x, 700.0))


@torch.no_grad()
def evaluate(model, batches, fn, dry_run=False):
    """Sums over batches of fn(model, batch) -> {name: number or 0-d tensor}, as floats."""
    model.eval()
    totals = {}
    for batch in batches:
        for name, value in fn(model, batch).items():
            totals[name] = totals.get(name, 0) + value
        if dry_run:
            break
    return {name: float(value) for name, value in totals.items()}


def fit(args, model, optimizer, scheduler, train_batches, loss_fn, validate, save_best,
        fmt=("5.2f", "8.2f")):
    """The original's epoch loop: train, validate, keep the best, decay lr when no better.

    train_batches(epoch) -> batches; validate(model) -> (valid loss, text after
    'time: ...s | ' in the end-of-epoch line, value to minimise for the best model);
    save_best() is called whenever that value improves. Returns (train, valid) loss logs.
    """
    best, train_log, val_log = None, [], []
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        train_log.append(train_epoch(model, train_batches(epoch), loss_fn, optimizer, args,
                                     epoch, fmt))
        val_loss, summary, key = validate(model)
        val_log.append(val_loss)
        print0(LINE)
        print0(f"| end of epoch {epoch:3d} | time: {time.time() - start:5.2f}s | {summary}")
        print0(LINE)
        if best is None or key < best:
            best = key
            save_best()
        else:
            scheduler.step()
        if args.dry_run:
            break
    return train_log, val_log


def finish(args, summary, train_log, val_log, test_loss):
    """The closing lines and the loss log."""
    print0(DOUBLE_LINE)
    print0(f"| End of training | {summary}")
    print0(DOUBLE_LINE)
    print_loss_log(args.loss_log, train_log, val_log, test_loss, args)


def print_loss_log(file_name, train_loss, val_loss, test_loss, args=None):
    """The original's loss log: the flags, then one line per epoch and the test loss."""
    lines = [f"{k}:    {v}" for k, v in vars(args).items()] if args else []
    lines += [f"epoch {i + 1:3d} | train loss {x:8.5f}" for i, x in enumerate(train_loss)]
    lines += [f"epoch {i + 1:3d} | val loss {x:8.5f}" for i, x in enumerate(val_loss)]
    lines.append(f"test loss {test_loss:8.5f}")
    atomic_write_text(file_name, "\n".join(lines) + "\n")

