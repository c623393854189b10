"""What every script shares and nothing else: flags, the user-error type, checks of
flags and paths, seeding and autocast. Imports nothing of this project.
"""
import argparse
import contextlib
import math
import os
import random
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """A mistake in flags or files; printed as one line, exit status 2."""


# --------------------------------------------------------------------------- flags

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
    add("--tokenizer", type=str, default="basic_english", choices=["basic_english", "wordpiece"],
        help="basic_english: the original's words with the --save-vocab vocabulary; wordpiece: "
             "BERT's WordPiece with --vocab-file (needs `pip install tokenizers`)")
    add("--vocab-file", type=str, default="vocab.txt",
        help="the WordPiece vocabulary of --tokenizer wordpiece, a BERT vocab.txt (one token a "
             "line); mlm_task.py trains one on the training split when it does not exist")
    add("--cased", action="store_true",
        help="WordPiece without lower-casing and accent stripping (a cased vocabulary)")
    add("--parallel", type=str, default="None", choices=["None", "DDP"],
        help="'DDP' trains with DistributedDataParallel; under plain python it starts "
             "--world_size processes on this machine (torchrun and srun start their own)")
    add("--world_size", type=int, default=8,
        help="processes that --parallel DDP starts under plain python")
    add("--dist-timeout", type=int, default=600,
        help="seconds to wait for the other processes of a DDP job before giving up")
    add("--amp", type=str, default="none", choices=["none", "bf16", "fp16"],
        help="mixed precision: bf16 or fp16 autocast (fp16 with a gradient scaler)")
    add("--optimizer", type=str, default="sgd", choices=["sgd", "adamw"],
        help="sgd: the original (lr divided by 10 after an epoch without improvement); adamw: "
             "linear warm-up over --warmup steps, then linear decay to 0")
    add("--warmup", type=int, default=0, metavar="STEPS", help="warm-up steps for --optimizer adamw")
    add("--weight-decay", type=float, default=0.01, help="weight decay for --optimizer adamw")
    add("--cpu-kernels", type=str, default="on", choices=["on", "off"],
        help="on the CPU, faster kernels for dropout, attention while training and the masked-LM "
             "loss (cpu_kernels.py): the same computation to float rounding (dropout draws its "
             "masks otherwise); 'off': model.py's plain PyTorch path. Elsewhere, the plain path")
    add("--grad-accum", type=int, default=1, metavar="K",
        help="accumulate the gradients of K batches per optimizer step")
    add("--compile", nargs="?", const="default", default=None, metavar="MODE",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="compile the model with torch.compile; MODE 'reduce-overhead' adds CUDA graphs "
             "(fixed shapes: mlm_task.py --mask-draw per-sequence), 'max-autotune' also tunes "
             "the kernels")
    add("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
        help="where to train; auto takes CUDA when available")
    add("--data-dir", type=str, default=None,
        help="folder with the data set's files; None means .data/<dataset>, where missing files "
             "are downloaded")
    add("--dry-run", action="store_true", help="run one batch of each split, then stop")
    add("--checkpoint", type=str, default="None",
        help="start from this file: a full model this script wrote (its weights), or a state "
             "file (the whole run: weights, optimizer, epoch, step, random states)")
    add("--resume", action="store_true",
        help="if --state-file exists, continue the run it holds (what a requeued job wants)")
    add("--state-file", type=str, default=defaults["state"],
        help="where the run's state is saved: at every epoch end, every --save-every batches "
             "and on SIGTERM/SIGUSR1 ('' disables); removed when the run ends well")
    add("--save-every", type=int, default=0, metavar="N",
        help="also save the state every N batches (0: at epoch ends only)")
    add("--tensorboard", type=str, default=None, metavar="DIR",
        help="write loss, learning rate, throughput and the validation and test scores to "
             "TensorBoard event files in DIR (needs `pip install tensorboard`)")
    add("--profile", type=str, default=None, metavar="DIR",
        help="profile some training steps with torch.profiler (see --profile-steps): a "
             "Chrome trace per process in DIR and a table of the costliest operations")
    add("--profile-steps", type=profile_steps, default="20:5", metavar="SKIP:COUNT",
        help="with --profile, record COUNT steps of the first epoch this run trains, after "
             "its first SKIP steps (which hold the compilation and warm-up)")
    return p


def profile_steps(text):
    """'SKIP:COUNT' -> (SKIP, COUNT), for --profile-steps."""
    try:
        skip, count = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SKIP:COUNT, two whole numbers such as 20:5, "
                                         f"got {text!r}") from None
    if skip < 0 or count < 1:
        raise argparse.ArgumentTypeError(f"SKIP must be 0 or more and COUNT 1 or more, got {text!r}")
    return skip, count


def add_corpus_flags(p, default, choices, task):
    """--dataset and --cache-dir, for the tasks that read a text corpus."""
    p.add_argument("--dataset", type=str, default=default, choices=choices,
                   help=f"dataset used for the {task} task")
    p.add_argument("--cache-dir", type=str, default=".data/cache",
                   help="where the token stores are kept (the corpus's token ids, built once with "
                        "every core, read by every process); '' keeps them in a temporary folder "
                        "of each process, removed at the end")
    p.add_argument("--prepare-only", action="store_true",
                   help="build the vocabulary and the token stores of --dataset, then stop: on a "
                        "CPU machine ahead of a GPU job that reads them from --cache-dir")


def describe_error(e, limit=120):
    """An exception as one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


def check_version(path, what, version, reads):
    """Refuse a file whose format version this code does not read (reads: the versions it
    does), with one line naming the file, its version and those versions."""
    if version in reads:
        return
    newer = isinstance(version, int) and version > max(reads)
    raise UserError(
        f"{path} is a {what} of format version {version}, "
        f"{'newer than the versions' if newer else 'not a version'} this code reads "
        f"({', '.join(map(str, reads))}): "
        + ("use the version of this project that wrote it" if newer else "make it again with this one"))


def sync_folder(folder):
    """fsync a folder, so that a rename in it survives a power loss (where the operating
    system allows opening a folder: not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder
    finally:
        os.close(fd)


def check_tensors(state, want, path):
    """Refuse (one line) weights whose names, shapes or kinds differ from want's."""
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise UserError(f"{path} does not fit the model its configuration describes: "
                        + (f"no tensor {missing[0]}" if missing else f"an unknown tensor {extra[0]}")
                        + f"{f' and {len(missing) + len(extra) - 1} more' if len(missing) + len(extra) > 1 else ''}"
                        "; the file is damaged or not from this model")
    for name, tensor in want.items():
        if tuple(state[name].shape) != tuple(tensor.shape) or not state[name].is_floating_point():
            raise UserError(f"{path}: tensor {name} is {state[name].dtype} of shape "
                            f"{tuple(state[name].shape)} where the model has {tuple(tensor.shape)}; "
                            "the file is damaged or its configuration does not match its weights")


def check_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is None or value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")


def check_writable(*paths):
    """Fail before training, not after it, when an output cannot be written."""
    for path in paths:
        parent = Path(path).parent
        if not parent.is_dir():
            raise UserError(f"cannot write {path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UserError(f"cannot write {path}: folder {parent} is not writable")
        if Path(path).is_dir():
            raise UserError(f"cannot write {path}: it is a folder")


def results_path(args):
    """The JSON-lines file of a run's numbers: the --loss-log path with .jsonl."""
    return str(Path(args.loss_log).with_suffix(".jsonl"))


# --------------------------------------------------------------------------- run-time

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device, amp="none"):
    """bf16 or fp16 autocast on device; a no-op context for amp 'none'."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def safe_exp(x):
    return math.exp(min(x, 700.0))
