"""Seeing a run: progress of long work, the run's numbers as JSON lines (and on
TensorBoard), and the original example's printouts rendered from those numbers.

Progress is a bar redrawn in place when the output is a terminal, and a plain line
every `every` seconds otherwise (a SLURM log gets a few lines, not thousands of
redraws). Work that ends within `quiet` seconds prints nothing. The environment
variables BERT_PROGRESS_EVERY (30) and BERT_PROGRESS_QUIET (2) change both. A process
that is not rank 0 of a job passes enabled=False and prints nothing.

    for line in progress(lines, "tokenizing", unit="lines"): ...
    rec = Recorder("mlm_loss.jsonl", Board("runs/tb")); rec.start(append=False)
    rec.write(dict(record="valid", epoch=1, loss=2.3), step=1, tags=["loss"]); rec.close()
"""
import json
import os
import sys
import time

from utils import check_version

RESULTS_FORMAT, RESULTS_VERSION = "bert-example-results", 1
LINE = "-" * 89
DOUBLE_LINE = "=" * 89


def _setting(name, default):
    return float(os.environ.get(name, default))


class Progress:
    """Counts done work; see the module docstring for what it prints and when."""

    def __init__(self, desc, total=None, unit="", every=None, quiet=None, stream=None,
                 enabled=True):
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        # seconds between plain lines; work shorter than quiet shows nothing
        self.every = _setting("BERT_PROGRESS_EVERY", 30) if every is None else every
        self.quiet = _setting("BERT_PROGRESS_QUIET", 2) if quiet is None else quiet
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
        if not self.enabled:
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
        if self.enabled and self.shown:
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


class Recorder:
    """The run's numbers: one JSON object per line in path (on the main process only),
    and the same numbers as TensorBoard scalars on board.

    Records: {"record": "train", epoch, step, steps, loss, ppl, lr, ms_per_batch, ...}
    per log interval; {"record": "valid", epoch, seconds, loss, <scores>} per epoch;
    {"record": "test", loss, <scores>} at the end. A resumed run appends to the file of
    the run it continues (read_results keeps the last record of a repeated step).
    """

    def __init__(self, path, board=None, main=True):
        self.path, self.board, self.main, self.file = path, board or Board(None), main, None

    def start(self, append):
        if self.main and self.path:
            self.file = open(self.path, "a" if append else "w", encoding="utf-8")
            if not append:  # the file's first line says its format and version
                self.file.write(json.dumps(dict(record="format", format=RESULTS_FORMAT,
                                                version=RESULTS_VERSION)) + "\n")

    def write(self, record, step=None, tags=()):
        """Append record; tags: its keys that also go to TensorBoard, as
        '<record>/<key>' at step."""
        if self.file is not None:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.file.flush()
        self.board.scalars(step, {f"{record['record']}/{k}": record[k] for k in tags
                                  if k in record})

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        self.board.close()


class StepProfile:
    """--profile DIR --profile-steps SKIP:COUNT: torch.profiler over COUNT training steps
    after the first SKIP, then a Chrome trace per process in DIR (trace_rank<R>.json;
    chrome://tracing or ui.perfetto.dev open it) and, from rank 0, the costliest operations
    by device time (host time on a CPU) with the host's and the device's time per step:
    a host that takes longer per step than the device's kernels is what holds a GPU back.
    Call step() after every training step and finish() at the end of the epoch."""

    def __init__(self, folder, skip, count, device, rank=0, main=True, print0=print):
        from torch.profiler import ProfilerActivity, profile, schedule
        os.makedirs(folder, exist_ok=True)
        self.folder, self.rank, self.main, self.print0 = folder, rank, main, print0
        self.skip, self.count, self.done, self.calls = skip, count, False, 0
        self.on_device = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_device else [])
        self.prof = profile(activities=activities, on_trace_ready=self._ready,
                            schedule=schedule(wait=max(skip - 1, 0), warmup=min(skip, 1),
                                              active=count, repeat=1))
        self.prof.start()

    def step(self):
        if self.prof is not None and not self.done:
            self.calls += 1
            self.prof.step()

    def finish(self):
        """Stop (at the epoch's end): what was recorded is written, or a line says why not."""
        if self.prof is None:
            return
        self.prof.stop()  # writes a window cut short by the epoch's end
        self.prof = None
        if not self.done:
            self.done = True
            self.print0(f"| profile: the epoch ended before step {self.skip + 1}; nothing was "
                        "recorded (lower --profile-steps' SKIP)")

    def _ready(self, prof):
        self.done = True
        path = os.path.join(self.folder, f"trace_rank{self.rank}.json")
        try:
            prof.export_chrome_trace(path)
            if self.main:
                steps = max(1, min(self.count, self.calls - self.skip))  # fewer at an epoch's end
                for line in profile_lines(prof.key_averages(), self.on_device, steps):
                    self.print0(line)
                self.print0(f"| profile: trace of rank {self.rank} in {path}")
        except Exception as e:  # a diagnostic must not end the run it looks at
            self.print0(f"| profile: could not be written ({type(e).__name__}: {e}); training goes on")


def _device_us(event):
    """An event's own device time in microseconds (the name changed in torch 2.4)."""
    value = getattr(event, "self_device_time_total", None)
    return value if value is not None else getattr(event, "self_cuda_time_total", 0.0)


def profile_lines(averages, on_device, steps, rows=15):
    """The summary lines of a profile of `steps` steps: per-step host and device times,
    then the `rows` operations with the most own device time (host time without a device)."""
    # The step marks as the host saw them (a GPU trace also has them as device annotations),
    # and the operations without annotations, whose own device times add up to the kernels'.
    marks = [e for e in averages if e.key.startswith("ProfilerStep")
             and str(getattr(e, "device_type", "CPU")).endswith("CPU")]
    host = sum(e.cpu_time_total for e in marks) / steps / 1000  # the steps' wall time on the host
    ops = [e for e in averages if not e.key.startswith("ProfilerStep")
           and not getattr(e, "is_user_annotation", False)]
    own = _device_us if on_device else (lambda e: e.self_cpu_time_total)
    total = sum(own(e) for e in ops)
    where = "device" if on_device else "host"
    lines = [f"| profile: {steps} steps | host {host:.2f} ms/step"
             + (f" | device kernels {total / steps / 1000:.2f} ms/step" if on_device else "")]
    lines.append(f"| {'operation':60s} | {'calls/step':>10s} | {where + ' ms/step':>15s} | {'share':>6s} |")
    for e in sorted(ops, key=own, reverse=True)[:rows]:
        name = e.key if len(e.key) <= 60 else e.key[:57] + "..."
        lines.append(f"| {name:60s} | {e.count / steps:10.1f} | {own(e) / steps / 1000:15.3f} | "
                     f"{100 * own(e) / max(total, 1e-9):5.1f}% |")
    return lines


def read_results(path):
    """The records of a results file, in order; a record repeated by a resumed run (same
    record kind, epoch and step) replaces the earlier one. ValueError for a file that
    is not JSON lines of records, UserError for one of a format version not read here
    (files without the format line, from before it, are read)."""
    records, where = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {n} is not JSON ({e})") from None
            if not isinstance(r, dict) or "record" not in r:
                raise ValueError(f"line {n} is not a record of a task script")
            if r["record"] == "format":
                check_version(path, "results file", r.get("version"), (RESULTS_VERSION,))
                continue
            key = (r["record"], r.get("epoch"), r.get("step"))
            if key in where:
                records[where[key]] = None
            where[key] = len(records)
            records.append(r)
    return [r for r in records if r is not None]


# --------------------------------------------------------------------------- printouts

def train_line(r, fmt):
    """The original's progress line from a train record; fmt: formats of loss and ppl."""
    return (f"| epoch {r['epoch']:3d} | {r['step']:5d}/{r['steps']:5d} batches | lr "
            f"{r['lr']:05.5f} | ms/batch {r['ms_per_batch']:5.2f} | "
            f"loss {r['loss']:{fmt[0]}} | ppl {r['ppl']:{fmt[1]}}")


def epoch_lines(r, text):
    """The end-of-epoch block from a valid record and the task's text of its scores."""
    return f"{LINE}\n| end of epoch {r['epoch']:3d} | time: {r['seconds']:5.2f}s | {text}\n{LINE}"


def final_lines(text):
    return f"{DOUBLE_LINE}\n| End of training | {text}\n{DOUBLE_LINE}"
