"""Seeing a run: progress of long preparation and evaluation, and TensorBoard scalars.

Progress is a bar redrawn in place when the output is a terminal, and a plain line
every `every` seconds otherwise (a SLURM log gets a few lines, not thousands of
redraws). Work that ends within `quiet` seconds prints nothing. The environment
variables BERT_PROGRESS_EVERY (30) and BERT_PROGRESS_QUIET (2) change both. Only the process
whose `monitor.ENABLED` is true prints (utils.setup clears it on ranks other than 0).

    for line in progress(lines, "tokenizing", unit="lines"): ...
    board = Board("runs/tb"); board.scalars(step, {"train/loss": 2.3}); board.close()
"""
import os
import sys
import time

ENABLED = True
EVERY = float(os.environ.get("BERT_PROGRESS_EVERY", 30))  # seconds between plain lines
QUIET = float(os.environ.get("BERT_PROGRESS_QUIET", 2))  # work shorter than this shows nothing


class Progress:
    """Counts done work; see the module docstring for what it prints and when."""

    def __init__(self, desc, total=None, unit="", every=None, quiet=None, stream=None):
        self.desc, self.total, self.unit = desc, total, unit
        self.every = EVERY if every is None else every
        self.quiet = QUIET if quiet is None else quiet
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done, self.start, self.last, self.shown = 0, time.time(), 0.0, False

    def _text(self, elapsed):
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            frac = min(self.done / self.total, 1.0)
            left = elapsed * (1 - frac) / frac if frac > 0 else 0.0
            bar = "#" * int(20 * frac)
            return (f"| {self.desc}: [{bar:20s}] {100 * frac:3.0f}% ({self.done:,}/{self.total:,}"
                    f"{unit}) {elapsed:.0f} s, ~{left:.0f} s left")
        return f"| {self.desc}: {self.done:,}{unit}, {elapsed:.0f} s"

    def update(self, n=1):
        self.done += n
        if not ENABLED:
            return
        now = time.time()
        elapsed = now - self.start
        if elapsed < self.quiet:
            return
        if self.tty:
            if now - self.last >= 0.2:
                self.stream.write("\r" + self._text(elapsed) + "\033[K")
                self.stream.flush()
                self.last, self.shown = now, True
        elif now - self.last >= self.every:
            self.stream.write(self._text(elapsed) + "\n")
            self.stream.flush()
            self.last, self.shown = now, True

    def close(self):
        """Ends the bar (or the lines) with a final count, if anything was shown."""
        if ENABLED and self.shown:
            elapsed = time.time() - self.start
            unit = f" {self.unit}" if self.unit else ""
            end = f"| {self.desc}: done, {self.done:,}{unit} in {elapsed:.1f} s"
            self.stream.write(("\r" + end + "\033[K\n") if self.tty else end + "\n")
            self.stream.flush()


def progress(iterable, desc, total=None, unit="", **kw):
    """Yields from iterable, counting each item (total: len(iterable) where it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    p = Progress(desc, total, unit, **kw)
    try:
        for item in iterable:
            yield item
            p.update()
    finally:
        p.close()


class MissingDependency(Exception):
    """An optional package that a flag needs is not installed."""


class Board:
    """TensorBoard scalars in logdir (torch.utils.tensorboard); no-op when logdir is None."""

    def __init__(self, logdir):
        self.writer = None
        if not logdir:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise MissingDependency(
                f"--tensorboard needs the tensorboard package ({e}); install it with "
                "`pip install tensorboard`, or leave out --tensorboard") from None
        self.writer = SummaryWriter(logdir)

    def scalars(self, step, values):
        """values: {tag: number}; tags such as 'train/loss', 'valid/f1'."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
