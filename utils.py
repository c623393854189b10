"""What the three task scripts share: flags, device, seeding, checkpoints, the
train/evaluate loop and the original example's printouts.
"""
import argparse
import contextlib
import datetime
import math
import os
import pickle
import random
import re
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import monitor
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
    add("--grad-accum", type=int, default=1, metavar="K",
        help="accumulate the gradients of K batches per optimizer step")
    add("--compile", action="store_true", help="compile the model with torch.compile")
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
    add("--skip-nonfinite", action="store_true",
        help="skip a step whose loss is NaN or infinite instead of stopping the run")
    add("--tensorboard", type=str, default=None, metavar="DIR",
        help="write loss, learning rate, throughput and the validation and test scores to "
             "TensorBoard event files in DIR (needs `pip install tensorboard`)")
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
        parent = Path(path).parent
        if not parent.is_dir():
            raise UserError(f"cannot write {path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UserError(f"cannot write {path}: folder {parent} is not writable")
        if Path(path).is_dir():
            raise UserError(f"cannot write {path}: it is a folder")


def cli(main, parser, errors=()):
    """Run main(args), in --world_size local processes for --parallel DDP under plain
    python. A user mistake becomes one line on stderr and exit status 2."""
    args = parser.parse_args()
    if args.parallel == "DDP" and launcher_env(os.environ) is None and args.world_size > 1:
        port = free_port()
        try:
            mp.spawn(_spawned, args=(main, args, port, errors, parser.prog),
                     nprocs=args.world_size, join=True)
        except mp.ProcessExitedException as e:  # a rank failed; spawn has stopped the rest
            sys.exit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)
        except mp.ProcessRaisedException as e:
            print(f"{parser.prog}: error: a DDP process failed:\n{e}", file=sys.stderr)
            sys.exit(1)
        return
    _run(main, args, errors, parser.prog)


def _spawned(rank, main, args, port, errors, prog):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _run(main, args, errors, prog)


def _run(main, args, errors, prog):
    try:
        main(args)
    except Stopped as e:
        sys.exit(128 + e.signum)  # the shell's convention for "ended by a signal"
    except (UserError, *errors) as e:
        if DIST.rank == 0:
            print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (dist.DistError, RuntimeError) as e:
        if DIST.world == 1:
            raise
        if not isinstance(e, dist.DistError):
            traceback.print_exc()  # may be a bug of its own, not only a lost peer
        # Another process of the job died or stopped answering: say so and stop, do not hang.
        print(f"{prog}: error: rank {DIST.rank} lost the other processes of the job "
              f"({str(e).splitlines()[0][:200]}); see their logs", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dist:
    """This process's place in a job; one process alone is rank 0 of 1."""
    rank, world, local = 0, 1, 0


DIST = Dist()  # set by setup(); read by print0, atomic_write and the loop helpers


def first_slurm_host(nodelist):
    """The first host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.match(r"([^\[]*)\[([^\]]*)\]", first)
    return m.group(1) + re.split(r"[-,]", m.group(2))[0] if m else first


def launcher_env(env):
    """(rank, world, local rank, address, port) set by torchrun or srun, else None."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return (int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT", "29500"))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", ""))
        # one port per job, so that jobs sharing a node do not collide
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                int(env.get("SLURM_LOCALID", 0)), addr or "127.0.0.1", port)
    return None


def setup(args, banner=""):
    """Device, seeds and the process group; returns the torch.device to train on, after
    printing banner and the device.

    torchrun (RANK, WORLD_SIZE, LOCAL_RANK), srun (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID, first host of SLURM_JOB_NODELIST) and the processes cli() starts
    all end here: NCCL with one GPU per process on CUDA, gloo on CPU.
    """
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but CUDA is not available; use --device cpu")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    launch = launcher_env(os.environ)
    if launch and (launch[1] > 1 or args.parallel == "DDP"):
        rank, world, local, addr, port = launch
        if use_cuda:
            if local >= torch.cuda.device_count():
                raise UserError(f"local rank {local} has no GPU ({torch.cuda.device_count()} "
                                "visible); start one process per GPU")
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://{addr}:{port}",
                                rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=args.dist_timeout))
        DIST.rank, DIST.world, DIST.local = rank, world, local
        print0(f"| DDP: {world} processes, backend {dist.get_backend()}, rendezvous {addr}:{port}")
    monitor.ENABLED = DIST.rank == 0
    global BOARD
    try:
        BOARD = monitor.Board(getattr(args, "tensorboard", None) if DIST.rank == 0 else None)
    except monitor.MissingDependency as e:
        raise UserError(str(e)) from None
    print0(f"| {banner + ' | ' if banner else ''}device: {device}")
    seed_everything(args.seed)
    return device


def wrap_ddp(model, args):
    """torch.compile (--compile) and DDP (when distributed) around model, whose
    parameters they share. Dropout then draws per rank."""
    if args.compile:
        model = torch.compile(model)
    if not dist.is_initialized():
        return model
    torch.manual_seed(args.seed + DIST.rank)
    device_ids = [DIST.local] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def make_optimizer(args, model, steps_per_epoch):
    """(optimizer, scheduler stepped after an epoch without improvement, scheduler stepped
    after every optimizer step): SGD with the original's decay, or AdamW with linear
    warm-up and decay (no weight decay on biases and LayerNorm)."""
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr)
        return opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.1), None
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    total = max(1, args.epochs * -(-steps_per_epoch // args.grad_accum))
    warm = min(args.warmup, total - 1)

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))
    return opt, None, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def shard(train):
    """Batches arguments that give this rank its share: equal shares in training."""
    return dict(rank=DIST.rank, world=DIST.world, drop_last=train and DIST.world > 1)


def all_sum(values):
    """Sum a list of floats over the ranks (itself alone without DDP)."""
    if DIST.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier():
    if DIST.world > 1:
        dist.barrier()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def print0(*a, **k):
    if DIST.rank == 0:
        print(*a, **k, flush=True)


# --------------------------------------------------------------------------- checkpoints

def atomic_write(path, write):
    """write(tmp) a temporary file beside path, then rename it over path: a crash never
    leaves a half-written file in place of a good one."""
    if DIST.rank != 0:
        return  # one writer per job
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
    """Load a checkpoint of this project (tensors and plain data only) and check its kind
    (a name, or a tuple of the names accepted)."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} not found; pass the file written by the previous step")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} is not a checkpoint this project can read: it holds Python "
                        "objects besides tensors and plain data, which are never loaded "
                        "(they could run code)") from None
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise UserError(f"{path} is not a checkpoint this project can read "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "bert-example":
        raise UserError(f"{path} is not a checkpoint written by this project")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if ckpt.get("kind") not in kinds:
        hint = ("pass the encoder file, e.g. mlm_bert.pt, not the full task" if kinds == ("encoder",)
                else "pass a file this script wrote")
        raise UserError(f"{path} holds a {ckpt.get('kind')!r} checkpoint where "
                        f"{' or '.join(map(repr, kinds))} is expected ({hint})")
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


def finetune_model(head, args, vocab, device):
    """(raw, model): head (NextSentenceTask, QuestionAnswerTask) on the encoder of
    --bert-model, on device, compiled and wrapped in DDP as asked (wrap_ddp)."""
    encoder = load_encoder(args.bert_model, vocab, args.dropout)
    if getattr(args, "random_init", False):
        # The same sizes, vocabulary and dropout, freshly initialised: the baseline that
        # shows what pretraining brings.
        torch.manual_seed(args.seed)
        encoder = BertModel(**encoder.config)
        print0(f"| --random-init: {args.bert_model} gives the sizes only; the encoder starts "
               "from random weights")
    raw = head(encoder).to(device)
    freeze_embeddings(raw.bert_model, args, "as loaded")
    return raw, wrap_ddp(raw, args)


def add_freeze_flag(parser, why):
    parser.add_argument("--freeze-embeddings", action="store_true",
                        help="keep the encoder's word embeddings fixed " + why)


def freeze_embeddings(bert_model, args, state):
    """--freeze-embeddings: the word embeddings get no gradient (the optimizer skips them)."""
    if getattr(args, "freeze_embeddings", False):
        bert_model.bert_embed.embed.weight.requires_grad_(False)
        print0(f"| --freeze-embeddings: the word embeddings stay {state}")


def save_task(path, model, kind, vocab_fingerprint):
    """A whole task model (encoder and head) with the encoder's configuration."""
    atomic_save(dict(format="bert-example", version=CHECKPOINT_VERSION, kind=kind,
                     config=dict(model.bert_model.config), model=model.state_dict(),
                     vocab_fingerprint=vocab_fingerprint), path)


def check_fit(ckpt, path, config, vocab_fingerprint):
    """Refuse a checkpoint made for another vocabulary or other model sizes."""
    if ckpt["vocab_fingerprint"] != vocab_fingerprint:
        raise UserError(f"{path} was trained with another vocabulary than the one loaded; "
                        "pass the matching --save-vocab file")
    mine = {k: v for k, v in config.items() if k != "dropout"}
    theirs = {k: v for k, v in ckpt["config"].items() if k != "dropout"}
    if mine != theirs:
        raise UserError(f"{path} holds a model of other sizes ({theirs}) than this one ({mine}); "
                        "pass the flags it was trained with")


def load_task(model, path, kind, vocab_fingerprint):
    """Load a save_task checkpoint into model, refusing one of other sizes or vocabulary."""
    barrier()  # the file may just have been written by rank 0
    ckpt = load_checkpoint(path, kind)
    check_fit(ckpt, path, model.bert_model.config, vocab_fingerprint)
    check_heads(ckpt["model"], model, path)
    model.load_state_dict(ckpt["model"])
    return ckpt


def check_heads(state, model, path):
    """Refuse weights whose task layers differ from the model's (a flag such as
    --match-feature given to one run and not to the other)."""
    theirs, mine = set(state), set(model.state_dict())
    if theirs != mine:
        odd = sorted((theirs - mine) | (mine - theirs))
        raise UserError(f"{path} does not fit this model: its layers differ in {', '.join(odd[:4])}; "
                        "pass the flags it was trained with (e.g. --match-feature)")
    head = getattr(model, "mlm_head", None)
    if head is not None:  # loading untied weights into a tied model would overwrite the embeddings
        embed = "bert_model.bert_embed.embed.weight"
        mine = head.weight is model.bert_model.bert_embed.embed.weight
        if mine != torch.equal(state["mlm_head.weight"], state[embed]):
            raise UserError(f"{path} was trained {'without' if mine else 'with'} --tie-weights; "
                            "pass the flags it was trained with")


# --------------------------------------------------------------------------- training loop

def autocast(device, amp="none"):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def safe_exp(x):
    return math.exp(min(x, 700.0))


@torch.no_grad()
def evaluate(model, batches, fn, args, reduce=True):
    """Sums over batches of fn(model, batch) -> {name: number or 0-d tensor}, as floats,
    added up over the ranks when reduce (each rank then evaluated its own share)."""
    model = getattr(model, "module", model)  # no DDP needed without gradients
    model.eval()
    device = next(model.parameters()).device
    totals = {}
    shown = batches if args.dry_run else monitor.progress(batches, "evaluating", unit="batches")
    for batch in shown:
        with autocast(device, args.amp):
            out = fn(model, batch)
        for name, value in out.items():
            totals[name] = totals.get(name, 0) + value
        if args.dry_run:
            break
    names = sorted(totals)
    values = [float(totals[n]) for n in names]
    return dict(zip(names, all_sum(values) if reduce else values))


BOARD = monitor.Board(None)  # set by setup() from --tensorboard


class Stopped(Exception):
    """Raised after a signal asked the run to stop and its state was saved."""

    def __init__(self, signum):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class Trainer:
    """The original's epoch loop: train, validate, keep the best, divide the learning
    rate by 10 when validation does not improve. Resumable between any two steps.

    model: raw, maybe compiled and wrapped in DDP (wrap_ddp); the optimizer comes from
    make_optimizer. loss_fn(model, batch) -> mean loss tensor; train_batches(epoch) ->
    batches (steps_per_epoch of them), the same for the same epoch in every run; validate(model) -> (valid loss, text after
    'time: ...s | ' in the end-of-epoch line, value to minimise for the best model);
    save_best() runs whenever that value improves. generators: the torch.Generators
    that loss_fn draws from, saved with the state.

    The state (model, optimizer, scheduler, epoch and step, random states, best value
    and loss logs) goes to --state-file at every epoch end, every --save-every steps,
    and when SIGTERM or SIGUSR1 arrives (then the run stops with status 128 + signal).
    """

    def __init__(self, args, model, raw, loss_fn, train_batches, steps_per_epoch, validate,
                 save_best, kind, fingerprint, generators=(), fmt=("5.2f", "8.2f")):
        self.args, self.model, self.raw, self.loss_fn = args, model, raw, loss_fn
        self.optimizer, self.plateau, self.schedule = make_optimizer(args, raw, steps_per_epoch)
        self.train_batches, self.validate, self.save_best = train_batches, validate, save_best
        self.kind, self.fingerprint, self.generators, self.fmt = kind, fingerprint, generators, fmt
        self.device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.epoch, self.step, self.sums = 1, 0, [0.0, 0.0]  # next epoch; its steps done; loss sums
        self.best, self.train_log, self.val_log = None, [], []
        self.signal = None
        self._start_from(args)

    # ---------------------------------------------------------------- state
    def _start_from(self, args):
        path = None if args.checkpoint == "None" else args.checkpoint
        if args.resume and args.state_file and Path(args.state_file).is_file():
            path = args.state_file  # a stopped run goes on; --checkpoint was where it began
        if path is None:
            return
        ckpt = load_checkpoint(path, (self.kind, self.kind + "_state"))
        check_fit(ckpt, path, self.raw.bert_model.config, self.fingerprint)
        check_heads(ckpt["model"], self.raw, path)
        self.raw.load_state_dict(ckpt["model"])
        if ckpt["kind"] == self.kind:
            print0(f"| starting from the weights in {path}")
            return
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for sched, state in zip((self.plateau, self.schedule), ckpt["scheduler"]):
            if sched is not None:
                sched.load_state_dict(state)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step, self.sums = ckpt["epoch"], ckpt["step"], list(ckpt["sums"])
        self.best, self.train_log, self.val_log = ckpt["best"], ckpt["train_log"], ckpt["val_log"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        for gen, state in zip(self.generators, ckpt["rng"]["generators"]):
            gen.set_state(state)
        if DIST.world > 1:  # dropout draws per rank; rank 0's state was saved
            torch.manual_seed(self.args.seed + DIST.rank + 7919 * (self.epoch * 100003 + self.step))
        print0(f"| resuming from {path}: epoch {self.epoch}, {self.step} batches done")

    def save_state(self):
        if not self.args.state_file:
            return
        rng = dict(torch=torch.get_rng_state(), generators=[g.get_state() for g in self.generators])
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        atomic_save(dict(format="bert-example", version=CHECKPOINT_VERSION,
                         kind=self.kind + "_state", config=dict(self.raw.bert_model.config),
                         vocab_fingerprint=self.fingerprint, model=self.raw.state_dict(),
                         optimizer=self.optimizer.state_dict(),
                         scheduler=[x.state_dict() if x else None
                                    for x in (self.plateau, self.schedule)],
                         scaler=self.scaler.state_dict(),
                         epoch=self.epoch, step=self.step, sums=self.sums, best=self.best,
                         train_log=self.train_log, val_log=self.val_log, rng=rng),
                    self.args.state_file)

    # ---------------------------------------------------------------- loop
    def fit(self):
        """Run the remaining epochs; returns the (train, valid) loss logs."""
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            while self.epoch <= self.args.epochs:
                start = time.time()
                self.train_log.append(self.train_epoch(self.epoch))
                val_loss, summary, key, *scores = self.validate(self.model)
                self.val_log.append(val_loss)
                BOARD.scalars(self.epoch, {"valid/loss": val_loss, **{
                    f"valid/{k}": v for k, v in (scores[0] if scores else {}).items()}})
                print0(LINE)
                print0(f"| end of epoch {self.epoch:3d} | time: {time.time() - start:5.2f}s "
                       f"| {summary}")
                print0(LINE)
                if self.best is None or key < self.best:
                    self.best = key
                    self.save_best()
                elif self.plateau is not None:
                    self.plateau.step()
                self.epoch, self.step, self.sums = self.epoch + 1, 0, [0.0, 0.0]
                if self.args.dry_run:
                    break
                self.save_state()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return self.train_log, self.val_log

    def _on_signal(self, signum, frame):
        self.signal = signum  # acted on at the next step boundary
        print(f"| rank {DIST.rank}: signal {signum} received, stopping after this step",
              file=sys.stderr, flush=True)

    def train_epoch(self, epoch):
        """Train one epoch from self.step on; returns its mean loss over the ranks.

        Losses are summed on the device and read back at log intervals only, so a
        step never waits for the host; a non-finite loss is caught there, named with
        the step it first appeared in (or skipped at once with --skip-nonfinite).
        """
        args, model, opt = self.args, self.model, self.optimizer
        model.train()
        opt.zero_grad(set_to_none=True)
        batches = self.train_batches(epoch)
        nbatches, every = len(batches), 1 if args.dry_run else args.log_interval
        total, counted = torch.zeros((), device=self.device), 0
        interval, first_bad = torch.zeros_like(total), torch.full((), -1, device=self.device)
        start = time.time()
        for i, batch in enumerate(batches):
            if i < self.step:
                continue  # done before the run was stopped
            # --grad-accum K: K batches per optimizer step, gradients synced on the last.
            last = (i + 1) % args.grad_accum == 0 or i + 1 == nbatches or args.dry_run
            no_sync = not last and hasattr(model, "no_sync")
            with model.no_sync() if no_sync else contextlib.nullcontext():
                with autocast(self.device, args.amp):
                    loss = self.loss_fn(model, batch).float()
                finite = torch.isfinite(loss)
                if args.skip_nonfinite and not finite:
                    print0(f"| epoch {epoch:3d} | batch {i + 1}: loss {loss.item()}, step skipped")
                else:
                    self.scaler.scale(loss / args.grad_accum).backward()
                    first_bad = torch.where(~finite & (first_bad < 0), i + 1, first_bad)
                    total, interval = total + loss.detach(), interval + loss.detach()
                    counted += 1
            if last:
                if args.clip > 0:
                    self.scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                self.scaler.step(opt)
                self.scaler.update()
                opt.zero_grad(set_to_none=True)
                if self.schedule is not None:
                    self.schedule.step()
            self.step = i + 1
            if self.step % every == 0:
                self._check(first_bad, epoch)
                cur = all_sum([interval.item()])[0] / every / DIST.world
                ms = (time.time() - start) * 1000 / every
                self._board(epoch, nbatches, cur, ms, batch)
                print0(f"| epoch {epoch:3d} | {self.step:5d}/{nbatches:5d} batches | lr "
                       f"{opt.param_groups[0]['lr']:05.5f} | ms/batch {ms:5.2f} | "
                       f"loss {cur:{self.fmt[0]}} | ppl {safe_exp(cur):{self.fmt[1]}}")
                interval, start = torch.zeros_like(interval), time.time()
            if args.dry_run:
                break
            if not last:
                continue  # the state is saved between optimizer steps only
            stop = self.signal is not None
            if DIST.world > 1:
                stop = all_sum([float(stop)])[0] > 0
            if stop or (args.save_every and self.step % args.save_every == 0):
                self._check(first_bad, epoch)
                self.sums = [self.sums[0] + total.item(), self.sums[1] + counted]
                total, counted = torch.zeros_like(total), 0
                self.save_state()
                if stop:
                    print0(f"| stopped at epoch {epoch}, batch {self.step}; state saved to "
                           f"{args.state_file}: run the same command with --resume to go on")
                    raise Stopped(self.signal or signal.SIGTERM)
        self._check(first_bad, epoch)
        loss_sum, count = all_sum([self.sums[0] + total.item(), self.sums[1] + counted])
        return loss_sum / max(count, 1)

    def _board(self, epoch, nbatches, loss, ms, batch):
        """Training scalars at a log interval, against the global batch count."""
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        per_s = 1000.0 / ms if ms > 0 else 0.0
        values = {"train/loss": loss, "train/lr": self.optimizer.param_groups[0]["lr"],
                  "train/batches_per_s": per_s}
        if self.kind == "mlm_task":
            values["train/ppl"] = safe_exp(loss)
        if torch.is_tensor(first) and first.dim() == 2:
            values["train/sequences_per_s"] = per_s * first.size(0) * DIST.world
            values["train/tokens_per_s"] = per_s * first.numel() * DIST.world
        BOARD.scalars((epoch - 1) * nbatches + self.step, values)

    def _check(self, first_bad, epoch):
        bad = int(first_bad.item())
        if bad >= 0:
            raise UserError(f"the training loss became NaN or infinite at epoch {epoch}, batch "
                            f"{bad}; lower --lr, --clip or use --amp none, or pass "
                            "--skip-nonfinite to skip such steps")


def finish(args, summary, train_log, val_log, test_loss, scores=None):
    """The closing lines, the loss log, and the test scores on TensorBoard."""
    BOARD.scalars(len(val_log), {"test/loss": test_loss,
                                 **{f"test/{k}": v for k, v in (scores or {}).items()}})
    BOARD.close()
    print0(DOUBLE_LINE)
    print0(f"| End of training | {summary}")
    print0(DOUBLE_LINE)
    print_loss_log(args.loss_log, train_log, val_log, test_loss, args)
    if args.state_file and DIST.rank == 0 and not args.dry_run:
        Path(args.state_file).unlink(missing_ok=True)  # the run is complete: nothing to resume


def print_loss_log(file_name, train_loss, val_loss, test_loss, args=None):
    """The original's loss log: the flags, then one line per epoch and the test loss."""
    lines = [f"{k}:    {v}" for k, v in vars(args).items()] if args else []
    lines += [f"epoch {i + 1:3d} | train loss {x:8.5f}" for i, x in enumerate(train_loss)]
    lines += [f"epoch {i + 1:3d} | val loss {x:8.5f}" for i, x in enumerate(val_loss)]
    lines.append(f"test loss {test_loss:8.5f}")
    atomic_write_text(file_name, "\n".join(lines) + "\n")

