"""The training loop every task shares: the optimizer and its schedule, `evaluate`, and
the `Trainer` (epochs, gradient accumulation, autocast, non-finite checks, signals,
state files and resuming).

A task talks to the Trainer through a `Task`: its loss function, its batches, and a
`validate` that returns a dict of numbers. The Trainer records every number
(monitor.Recorder) and prints the original example's lines rendered from those records.
"""
import contextlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

import checkpoint
import dist
import cpu_kernels
import monitor
from utils import UserError, autocast, describe_error, results_path, safe_exp


# --------------------------------------------------------------------------- optimizer

def fused_adamw(params):
    """Whether torch has a fused AdamW for these parameters: on CUDA, and on the CPU from
    torch 2.4 (there it is several times faster than the foreach one at small sizes)."""
    if not params:
        return False
    if all(p.is_cuda for p in params):
        return True
    cpu_fused = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 4)
    return cpu_fused and all(p.device.type == "cpu" for p in params)


class Optimizer:
    """The optimizer and its learning-rate schedule behind one interface.

    sgd: the original's SGD; the learning rate is divided by 10 after an epoch whose
    validation did not improve. adamw: AdamW (no weight decay on biases and LayerNorm)
    with linear warm-up over --warmup optimizer steps, then linear decay to 0.
    """

    def __init__(self, args, model, steps_per_epoch):
        self.plateau = self.schedule = None
        if args.optimizer == "sgd":
            self.opt = torch.optim.SGD(model.parameters(), lr=args.lr)
            self.plateau = torch.optim.lr_scheduler.StepLR(self.opt, 1, gamma=0.1)
            return
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
        self.opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6,
                                     fused=fused_adamw(params) or None)
        total = max(1, args.epochs * -(-steps_per_epoch // args.grad_accum))
        warm = min(args.warmup, total - 1)

        def factor(step):
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (total - step) / max(1, total - warm))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)

    @property
    def lr(self):
        return self.opt.param_groups[0]["lr"]

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def step(self, scaler):
        """One optimizer step through the gradient scaler, then the per-step schedule."""
        scaler.step(self.opt)
        scaler.update()
        self.zero_grad()
        if self.schedule is not None:
            self.schedule.step()

    def end_of_epoch(self, improved):
        if not improved and self.plateau is not None:
            self.plateau.step()

    def state_dict(self):
        return dict(optimizer=self.opt.state_dict(),
                    scheduler=[x.state_dict() if x else None for x in (self.plateau, self.schedule)])

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["optimizer"])
        for sched, s in zip((self.plateau, self.schedule), state["scheduler"]):
            if sched is not None:
                sched.load_state_dict(s)


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, batches, fn, amp, dry_run, ctx, reduce=True):
    """Sums over batches of fn(model, batch) -> {name: number or 0-d tensor}, as floats,
    added up over the ranks when reduce (each rank then evaluated its own share); under
    autocast amp; one batch with dry_run."""
    model = getattr(model, "module", model)  # no DDP needed without gradients
    model.eval()
    device = next(model.parameters()).device
    totals = {}
    shown = batches if dry_run else monitor.progress(batches, "evaluating", unit="batches",
                                                          enabled=ctx.main)
    for batch in shown:
        with autocast(device, amp):
            out = fn(model, batch)
        for name, value in out.items():
            totals[name] = totals.get(name, 0) + value
        if dry_run:
            break
    names = sorted(totals)
    values = [float(totals[n]) for n in names]
    return dict(zip(names, ctx.all_sum(values) if reduce else values))


def prepare_model(raw, args, ctx, freeze=False):
    """raw on the device, with the CPU kernels (--cpu-kernels), its word embeddings fixed
    where freeze; returns the model to train (compiled and in DDP as asked, sharing raw's
    parameters)."""
    raw.to(ctx.device)
    if args.cpu_kernels == "on":
        cpu_kernels.install(raw)
    if freeze:
        raw.bert_model.freeze_word_embeddings()
        ctx.print0("| --freeze-embeddings: the word embeddings stay as loaded")
    return dist.wrap(raw, args, ctx)


def lock_outputs(args, ctx):
    """Make this run the one writer of its state file and outputs: rank 0 holds a lock
    beside --state-file (or --save, without a state file) until the process ends, and
    a second run on the same files stops here, before it trains."""
    target = Path(args.state_file or args.save)
    path = target.parent / f".{target.name}.lock"
    ctx.once(lambda: ctx.held.append(checkpoint.lock_run(path)), lambda: True)


def recorder(args, ctx):
    """Where the run's numbers go: JSON lines beside --loss-log, and --tensorboard, written by
    the main process. Made at start-up, so that a missing tensorboard fails at once."""
    try:
        board = monitor.Board(args.tensorboard if ctx.main else None)
    except monitor.MissingDependency as e:
        raise UserError(str(e)) from None
    return monitor.Recorder(results_path(args), board, ctx.main)


# --------------------------------------------------------------------------- the loop

def _rows(batch):
    """The (N, S) token tensor of a batch, to count its sequences and tokens."""
    first = getattr(batch, "input_ids", batch[0] if isinstance(batch, (list, tuple)) else batch)
    return first if torch.is_tensor(first) and first.dim() == 2 else None


@dataclass
class Task:
    """What the Trainer needs to know of a task."""
    kind: str  # checkpoint kind of the whole model ("mlm_task", "ns_task", "qa_task")
    loss: Callable  # (model, batch) -> mean loss tensor
    batches: Callable  # (epoch, start) -> its batches (data.Batches: len() all of them), served
    # from batch `start` on, the same for the same epoch in every run and any number of processes
    steps: int  # batches per epoch
    validate: Optional[Callable]  # model -> {"loss": ..., score: ...}, numbers only; None: no
    # scoring between epochs (keep="last" with nothing to show)
    describe: Callable  # (split, record) -> the text of its scores in the printouts
    best: str  # where the kept model is written (and loaded from after training)
    fingerprint: str  # the vocabulary's, kept in checkpoints
    select: Callable = lambda r: r["loss"]  # the value of validate's dict to minimise
    generators: tuple = ()  # torch.Generators the loss draws from, saved with the state
    fmt: tuple = ("5.2f", "8.2f")  # formats of loss and ppl in the progress lines
    train_tags: tuple = ("loss", "lr", "batches_per_s", "sequences_per_s", "tokens_per_s")
    keep: str = "best"  # "best": the epoch of the best validation; "last": the last, chosen by nothing


class Trainer:
    """The original's epoch loop: train, validate, keep the best, divide the learning
    rate by 10 when validation does not improve (sgd). Resumable between any two steps.

    model: raw, maybe compiled and in DDP (prepare_model). The state (model, optimizer,
    schedule, epoch and step, random states, best value and loss logs) goes to
    --state-file at every epoch end, every --save-every steps, and when SIGTERM, SIGUSR1
    or SIGINT (Ctrl-C) arrives (then the run stops with status 128 + signal).
    """

    def __init__(self, args, ctx, model, raw, task, recorder):
        self.args, self.ctx, self.model, self.raw, self.task = args, ctx, model, raw, task
        self.recorder = recorder
        self.optimizer = Optimizer(args, raw, task.steps)
        self.device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.epoch, self.step, self.sums = 1, 0, [0.0, 0.0]  # next epoch; its steps done; loss sums
        self.best, self.train_log, self.val_log = None, [], []
        self.signal = None
        self.profile, self.profiled = None, False
        if args.profile:  # fail now, not after the first steps
            try:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"--profile {args.profile}: cannot make that folder ({e})") from None
        recorder.start(append=self._start_from(args))

    # ---------------------------------------------------------------- state
    def _start_from(self, args):
        """Load --checkpoint, or the state file with --resume; True when a run goes on."""
        path = None if args.checkpoint == "None" else args.checkpoint
        if args.resume and args.state_file and Path(args.state_file).is_file():
            path = args.state_file  # a stopped run goes on; --checkpoint was where it began
        if path is None:
            return False
        kind = self.task.kind
        ckpt = checkpoint.load_into(self.raw, path, (kind, kind + "_state"), self.task.fingerprint)
        if ckpt["kind"] == kind:
            self.ctx.print0(f"| starting from the weights in {path}")
            return False
        try:
            self._restore(ckpt)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
            raise UserError(f"{path} is a damaged state file ({describe_error(e)}); delete it to "
                            "start the run over") from None
        if self.ctx.world > 1:  # dropout draws per rank; rank 0's state was saved
            torch.manual_seed(self.args.seed + self.ctx.rank + 7919 * (self.epoch * 100003 + self.step))
        self.ctx.print0(f"| resuming from {path}: epoch {self.epoch}, {self.step} batches done")
        return True

    def _restore(self, ckpt):
        """The run's state from a state file's dict (but the model, loaded already)."""
        epoch, step, sums = ckpt["epoch"], ckpt["step"], [float(x) for x in ckpt["sums"]]
        if not (isinstance(epoch, int) and isinstance(step, int) and 1 <= epoch
                and 0 <= step <= self.task.steps and len(sums) == 2):
            raise ValueError(f"epoch {epoch!r}, step {step!r}, sums {sums!r}")
        if not all(isinstance(ckpt[k], list) for k in ("train_log", "val_log")):
            raise TypeError("the loss logs are not lists")
        self.optimizer.load_state_dict(ckpt)
        self.scaler.load_state_dict(ckpt["scaler"])
        # the epoch's loss sums so far, over all ranks (save_state): rank 0 carries them on
        self.epoch, self.step = epoch, step
        self.sums = sums if self.ctx.main else [0.0, 0.0]
        self.best, self.train_log, self.val_log = ckpt["best"], ckpt["train_log"], ckpt["val_log"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        generators = ckpt["rng"]["generators"]
        if len(generators) != len(self.task.generators):
            raise ValueError(f"{len(generators)} random generators where the task has "
                             f"{len(self.task.generators)}")
        for gen, state in zip(self.task.generators, generators):
            gen.set_state(state)

    def save_state(self):
        if not self.args.state_file:
            return
        rng = dict(torch=torch.get_rng_state(),
                   generators=[g.get_state() for g in self.task.generators])
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = checkpoint.header(
            self.task.kind + "_state", self.raw.bert_model.config, self.task.fingerprint,
            model=self.raw.state_dict(), **self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(), epoch=self.epoch, step=self.step,
            sums=self.ctx.all_sum(self.sums),  # of every rank: a resumed run may have another number
            best=self.best, train_log=self.train_log, val_log=self.val_log, rng=rng)
        checkpoint.atomic_save(state, self.args.state_file, self.ctx.main)

    # ---------------------------------------------------------------- loop
    def fit(self):
        """Run the remaining epochs, then load the kept model (task.keep) into raw;
        returns the (train, valid) loss logs."""
        handlers = {s: signal.signal(s, self._on_signal)
                    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        try:
            while self.epoch <= self.args.epochs:
                start = time.time()
                self.train_log.append(self.train_epoch(self.epoch))
                keep, improved = self.validate(start)
                if keep:
                    checkpoint.save_task(self.task.best, self.raw, self.task.kind,
                                         self.task.fingerprint, self.ctx.main)
                self.optimizer.end_of_epoch(improved)
                self.epoch, self.step, self.sums = self.epoch + 1, 0, [0.0, 0.0]
                if self.args.dry_run:
                    break
                self.save_state()
                if self.epoch <= self.args.epochs and self.ctx.any(self.signal is not None):
                    self._stopped()  # a signal during validation: the state is saved
        finally:
            self._finish_profile()  # a run that stops early still writes what it recorded
            for s, h in handlers.items():
                signal.signal(s, h)
        self.ctx.barrier()  # the file may just have been written by rank 0
        checkpoint.load_into(self.raw, self.task.best, self.task.kind, self.task.fingerprint)
        return self.train_log, self.val_log

    def validate(self, start):
        """Score the epoch just trained (where the task scores between epochs); returns
        (keep its model: the best so far, or with keep="last" every epoch's; validation
        improved, which the sgd schedule reads)."""
        if self.task.validate is None:
            self.ctx.print0(monitor.epoch_lines(
                dict(epoch=self.epoch, seconds=time.time() - start),
                "nothing scored: the last epoch is kept, the evaluation file is scored once "
                "at the end"))
            return True, True
        scores = self.task.validate(self.model)
        self.val_log.append(scores["loss"])
        record = dict(record="valid", epoch=self.epoch, seconds=time.time() - start, **scores)
        self.recorder.write(record, step=self.epoch, tags=list(scores))
        self.ctx.print0(monitor.epoch_lines(record, self.task.describe("valid", record)))
        key = self.task.select(scores)
        improved = self.best is None or key < self.best
        if improved:
            self.best = key
        return improved or self.task.keep == "last", improved

    def _start_profile(self):
        """--profile: a StepProfile over the first epoch this run trains (once per run)."""
        if getattr(self.args, "profile", None) and not self.profiled:
            self.profiled = True
            skip, count = self.args.profile_steps
            self.profile = monitor.StepProfile(self.args.profile, skip, count, self.device,
                                               self.ctx.rank, self.ctx.main, self.ctx.print0)

    def _finish_profile(self):
        if self.profile is not None:
            self.profile.finish()
            self.profile = None

    def _on_signal(self, signum, frame):
        self.signal = signum  # acted on at the next step boundary
        if signum == signal.SIGINT:  # Ctrl-C: a second one stops at once (KeyboardInterrupt)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self.ctx.main:
                print("\n| Ctrl-C: stopping after this step to save the run's state (Ctrl-C "
                      "again to stop at once, losing what was done since the last save)",
                      file=sys.stderr, flush=True)
            return
        print(f"| rank {self.ctx.rank}: signal {signum} received, stopping after this step",
              file=sys.stderr, flush=True)

    def _stopped(self):
        self.ctx.print0(f"| stopped at epoch {self.epoch}, batch {self.step}; state saved to "
                        f"{self.args.state_file}: run the same command with --resume to go on")
        raise dist.Stopped(self.signal or signal.SIGTERM)

    def train_epoch(self, epoch):
        """Train one epoch from self.step on; returns its mean loss over the ranks.

        Losses are summed on the device and read back at log intervals only, so a
        step never waits for the host; a non-finite loss is caught there, named with
        the step it first appeared in.
        """
        args, model, opt, ctx = self.args, self.model, self.optimizer, self.ctx
        model.train()
        opt.zero_grad()
        batches = self.task.batches(epoch, self.step)  # a resumed run starts where it stopped
        nbatches, every = len(batches), 1 if args.dry_run else args.log_interval
        total, counted = torch.zeros((), device=self.device), 0
        interval, first_bad = torch.zeros_like(total), torch.full((), -1, device=self.device)
        start = time.time()
        self._start_profile()
        for i, batch in enumerate(batches, start=self.step):
            # --grad-accum K: K batches per optimizer step, gradients synced on the last.
            last = (i + 1) % args.grad_accum == 0 or i + 1 == nbatches or args.dry_run
            no_sync = not last and hasattr(model, "no_sync")
            with model.no_sync() if no_sync else contextlib.nullcontext():
                with autocast(self.device, args.amp):
                    loss = self.task.loss(model, batch).float()
                self.scaler.scale(loss / args.grad_accum).backward()
                first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), i + 1, first_bad)
                total, interval = total + loss.detach(), interval + loss.detach()
                counted += 1
            if last:
                if args.clip > 0:
                    self.scaler.unscale_(opt.opt)
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                opt.step(self.scaler)
            self.step = i + 1
            if self.profile is not None:
                self.profile.step()
            if self.step % every == 0:
                self._check(first_bad, epoch)
                self._log(epoch, nbatches, ctx.all_sum([interval.item()])[0] / every / ctx.world,
                          (time.time() - start) * 1000 / every, batch)
                interval, start = torch.zeros_like(interval), time.time()
            if args.dry_run:
                break
            if not last:
                continue  # the state is saved between optimizer steps only
            stop = ctx.any(self.signal is not None)
            if stop or (args.save_every and self.step % args.save_every == 0):
                self._check(first_bad, epoch)
                self.sums = [self.sums[0] + total.item(), self.sums[1] + counted]
                total, counted = torch.zeros_like(total), 0
                self.save_state()
                if stop:
                    self._stopped()
        self._finish_profile()
        self._check(first_bad, epoch)
        loss_sum, count = ctx.all_sum([self.sums[0] + total.item(), self.sums[1] + counted])
        return loss_sum / max(count, 1)

    def _log(self, epoch, nbatches, loss, ms, batch):
        """The record of a log interval, then its progress line."""
        per_s = 1000.0 / ms if ms > 0 else 0.0
        record = dict(record="train", epoch=epoch, step=self.step, steps=nbatches,
                      lr=self.optimizer.lr, ms_per_batch=ms, loss=loss, ppl=safe_exp(loss),
                      batches_per_s=per_s)
        rows = _rows(batch)
        if rows is not None:
            record["sequences_per_s"] = per_s * rows.size(0) * self.ctx.world
            record["tokens_per_s"] = per_s * rows.numel() * self.ctx.world
        self.recorder.write(record, step=(epoch - 1) * nbatches + self.step,
                            tags=self.task.train_tags)
        self.ctx.print0(monitor.train_line(record, self.task.fmt))

    def _check(self, first_bad, epoch):
        bad = int(first_bad.item())
        if bad >= 0:
            raise UserError(f"the training loss became NaN or infinite at epoch {epoch}, batch "
                            f"{bad}; lower --lr or --clip, or use --amp none")

    def finish(self, scores, split="test"):
        """The closing lines from the final scores, the test record, the loss log; the
        state file goes (the run is complete)."""
        record = dict(record="test", split=split, **scores)
        self.recorder.write(record, step=len(self.val_log), tags=list(scores))
        self.recorder.close()
        self.ctx.print0(monitor.final_lines(self.task.describe(split, record)))
        write_loss_log(self.args.loss_log, self.train_log, self.val_log, scores["loss"],
                       self.args, self.ctx.main)
        if self.args.state_file and self.ctx.main and not self.args.dry_run:
            Path(self.args.state_file).unlink(missing_ok=True)


def write_loss_log(file_name, train_loss, val_loss, test_loss, args=None, main=True):
    """The original's loss log: the flags, then one line per epoch and the test loss."""
    lines = [f"{k}:    {v}" for k, v in vars(args).items()] if args else []
    lines += [f"epoch {i + 1:3d} | train loss {x:8.5f}" for i, x in enumerate(train_loss)]
    lines += [f"epoch {i + 1:3d} | val loss {x:8.5f}" for i, x in enumerate(val_loss)]
    lines.append(f"test loss {test_loss:8.5f}")
    checkpoint.atomic_write_text(file_name, "\n".join(lines) + "\n", main)
