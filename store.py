"""The token store: a corpus's token ids, tokenized once with every core into one flat
file that every rank reads through numpy.memmap, so that no process holds the corpus.

    <cache-dir>/<dataset>-<tokenizer>-<digest of the source files' paths>/
        tokens.bin     the ids of every line, one line after another: uint16 where the
                       vocabulary has at most 65,536 entries, else uint32
        lines.idx      int64 offsets of the lines in tokens.bin, from 0 (lines + 1 of them)
        manifest.json  format and version, dataset, tokenizer, vocabulary fingerprint,
                       counts, the id type and the source files' sizes and times

    st = store.open_or_build(Source(...), cache_dir, ctx)   # built once per job
    tokens = st.lines(lo, hi)         # a split: lines [lo, hi), ids read on demand

Built in a temporary folder beside its place and renamed there when complete (files and
folder synced first), so an interrupted build leaves nothing a later run trusts. A store
that is damaged, from other sources, another vocabulary or an older format is rebuilt,
with a line saying why; one from a newer format is refused.
"""
import gc
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import monitor
from data import DataError
from utils import UserError, check_version, sync_folder

FORMAT = "bert-example-token-store"
VERSION = 1
CHUNK_CHARS = 1 << 22  # text handed to a worker at a time (~4 MB): memory is a few of these


# --------------------------------------------------------------------------- every core

def cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def chunks(lines, chars=None):
    """Lists of consecutive lines of about `chars` (CHUNK_CHARS) characters each."""
    chars = chars or CHUNK_CHARS
    piece, size = [], 0
    for line in lines:
        piece.append(line)
        size += len(line)
        if size >= chars:
            yield piece
            piece, size = [], 0
    if piece:
        yield piece


def _serve(fn, tasks, results):
    """A worker: fn on each (k, item) of tasks until None; results get (k, ok, value)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    gc.disable()  # pieces make many small lists and no cycles: collecting costs 15-20%
    for k, item in iter(tasks.get, None):
        try:
            results.put((k, True, fn(item)))
        except Exception as e:  # sent back and raised in the parent
            results.put((k, False, e))


def ordered_map(fn, items, workers):
    """fn(item) for each item, yielded in order, computed by `workers` forked processes
    with at most 2 x workers items in flight (memory stays bounded by a few items, not the
    input). In this process where workers is 1 or fork is not available (Linux only:
    fork is unsafe on macOS and absent on Windows)."""
    if workers <= 1 or not sys.platform.startswith("linux"):
        yield from map(fn, items)
        return
    import multiprocessing as mp
    ctx = mp.get_context("fork")  # fn and its data reach the workers without pickling
    tasks, results = ctx.Queue(), ctx.Queue()
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    procs = [ctx.Process(target=_serve, args=(fn, tasks, results), daemon=True)
             for _ in range(workers)]
    try:
        for p in procs:
            p.start()
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
        items, sent, done, ready = iter(items), 0, 0, {}
        while True:
            while sent - done < 2 * workers:
                item = next(items, None)
                if item is None:
                    break
                tasks.put((sent, item))
                sent += 1
            if done == sent:
                break
            while done not in ready:
                try:
                    k, ok, value = results.get(timeout=1.0)
                    ready[k] = (ok, value)
                except queue.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise DataError(f"a tokenizing process ended with exit code {dead[0]} "
                                        "(out of memory?)") from None
            ok, value = ready.pop(done)
            done += 1
            if not ok:
                raise value
            yield value
        for _ in procs:
            tasks.put(None)
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        tasks.cancel_join_thread()


def useful_workers(workers, total_bytes=None):
    """No more workers than pieces of text (forking costs more than a small text)."""
    return max(1, min(workers, -(-total_bytes // CHUNK_CHARS))) if total_bytes else workers


def map_text(fn, lines, workers, desc, total_bytes=None, show=True):
    """fn(piece) for pieces of about CHUNK_CHARS characters of lines, in order, with
    progress (desc, by characters against total_bytes, where known); computed by
    `workers` processes, fewer where the text is only a few pieces."""
    workers = useful_workers(workers, total_bytes)
    bar = monitor.Progress(desc, total_bytes or None, "bytes", enabled=show)
    sizes = []  # the sizes of the pieces in flight, for the progress bar

    def counted(pieces):
        for piece in pieces:
            sizes.append(sum(len(line) for line in piece))
            yield piece
    for value in ordered_map(fn, counted(chunks(lines)), workers):
        bar.update(sizes.pop(0))
        yield value
    bar.close()


# --------------------------------------------------------------------------- reading

def _mapped(path, dtype, count):
    """A read-only numpy.memmap of a file's count values. Made anew for each read and
    dropped after it, so that the pages a long run reads do not stay in its resident
    memory (nanoGPT does the same)."""
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class Tokens:
    """Lines [lo, hi) of a store: len() token ids, read on demand, positions counted from
    the first id of line lo."""

    def __init__(self, store, lo, hi):
        self.store, self.lo, self.hi = store, lo, hi
        first_last = store.offsets(np.array([lo, hi]))
        self.begin, self.end = int(first_last[0]), int(first_last[1])

    def __len__(self):
        return self.end - self.begin

    @property
    def num_lines(self):
        return self.hi - self.lo

    def read(self, starts, length):
        """(len(starts), length) ids: the runs of `length` ids from each start."""
        if len(starts) == 0 or length == 0:
            return np.zeros((len(starts), length), self.store.dtype)
        ids = self.store.ids()
        return self.store.checked(ids[self.begin + np.asarray(starts)[:, None] + np.arange(length)])

    def read_ranges(self, starts, ends):
        """[ids[s:e] for s, e in zip(starts, ends)], copied out of the file."""
        if len(self) == 0:
            return [np.zeros(0, self.store.dtype) for _ in starts]
        ids = self.store.ids()
        return [self.store.checked(np.array(ids[self.begin + s:self.begin + e]))
                for s, e in zip(starts, ends)]

    def line_bounds(self, lines):
        """(starts, ends) of lines (numbers within this split), as positions."""
        lines = np.asarray(lines, dtype=np.int64) + self.lo
        return self.store.offsets(lines) - self.begin, self.store.offsets(lines + 1) - self.begin

    def lines_with(self, min_tokens, step=1 << 22):
        """The numbers of the lines with at least min_tokens ids (int32 where they fit:
        the one array here that grows with the corpus, 4 bytes per such line)."""
        found = []
        for lo in range(self.lo, self.hi, step):
            hi = min(lo + step, self.hi)
            bounds = self.store.offsets(np.arange(lo, hi + 1))
            found.append(np.flatnonzero(np.diff(bounds) >= min_tokens) + (lo - self.lo))
        lines = np.concatenate(found) if found else np.zeros(0, np.int64)
        return lines.astype(np.int32 if self.num_lines < 2 ** 31 else np.int64)


@dataclass
class Store:
    """A built store (see the module docstring)."""
    folder: Path
    manifest: dict
    owner: object = None  # what keeps the folder while the store is used (a temporary one)

    @property
    def dtype(self):
        return np.dtype(self.manifest["dtype"])

    @property
    def num_tokens(self):
        return self.manifest["tokens"]

    @property
    def num_lines(self):
        return self.manifest["lines"]

    def ids(self):
        return _mapped(self.folder / "tokens.bin", self.dtype, self.num_tokens)

    def checked(self, ids):
        """ids, refused where one lies past the vocabulary (a damaged tokens.bin: the ids
        carry no checksum, which would cost a read of the whole file at every start)."""
        if ids.size and int(ids.max()) >= self.manifest["vocab_size"]:
            raise DataError(f"token store {self.folder} holds the id {int(ids.max())}, past its "
                            f"vocabulary of {self.manifest['vocab_size']}: it is damaged; delete "
                            "the folder to rebuild it")
        return ids

    def offsets(self, lines):
        """The offsets of the given line numbers (0 to num_lines)."""
        return np.asarray(_mapped(self.folder / "lines.idx", np.int64, self.num_lines + 1)[lines])

    def offsets_in_order(self, step=1 << 22):
        """Whether the line offsets run from 0 to the number of tokens without going back
        (a pass over lines.idx, 8 bytes a line: a second for 100M lines)."""
        last = 0
        for lo in range(0, self.num_lines + 1, step):
            chunk = self.offsets(np.arange(lo, min(lo + step, self.num_lines + 1)))
            if chunk[0] < last or (np.diff(chunk) < 0).any():
                return False
            last = chunk[-1]
        return last == self.num_tokens and self.offsets(np.array([0]))[0] == 0

    def lines(self, lo, hi):
        return Tokens(self, lo, hi)


# --------------------------------------------------------------------------- what a store holds

@dataclass
class Source:
    """What to tokenize into a store: the files of a dataset, read line by line with
    read_lines(files) and made into ids with encode(lines) -> (the ids of the lines one
    after another, each line's number of ids), by the tokenizer named `tokenizer` with
    vocab."""
    dataset: str
    files: list
    read_lines: Callable
    encode: Callable
    tokenizer: str
    vocab: object

    def folder(self, cache_dir):
        paths = "\n".join(str(Path(p).resolve()) for p in self.files)
        digest = hashlib.sha256(paths.encode()).hexdigest()[:16]
        return Path(cache_dir) / f"{self.dataset}-{self.tokenizer}-{digest}"

    def files_seen(self):
        """The source files as the manifest records them."""
        out = []
        for p in self.files:
            st = os.stat(p)
            out.append(dict(path=str(Path(p).resolve()), bytes=st.st_size, mtime_ns=st.st_mtime_ns))
        return out


def _why_not(folder, source):
    """(a Store, None) when the store in folder holds what source asks for, else (None,
    the reason it does not, for the line that says it is rebuilt)."""
    path = folder / "manifest.json"
    if not path.is_file():
        return None, None  # not built yet
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        version, fmt = m.get("version"), m.get("format")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None, "its manifest.json is unreadable"
    if fmt != FORMAT or not isinstance(version, int):
        return None, "its manifest.json is not a token store's"
    if version > VERSION:
        check_version(path, "token store's manifest", version, (VERSION,))
    if version < VERSION:
        return None, f"it has format version {version}, this code writes {VERSION}"
    try:
        if m["dataset"] != source.dataset or m["tokenizer"] != source.tokenizer:
            return None, f"it was made from {m['dataset']} with the {m['tokenizer']} tokenizer"
        if m["vocab_fingerprint"] != source.vocab.fingerprint or m["vocab_size"] != len(source.vocab):
            return None, "it was made with another vocabulary"
        if m["sources"] != source.files_seen():
            return None, "its source files changed since (size or time)"
        dtype, tokens, lines = np.dtype(m["dtype"]), m["tokens"], m["lines"]
        if dtype.name not in ("uint16", "uint32") or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in (tokens, lines)):
            raise TypeError(m["dtype"])
    except (KeyError, TypeError, ValueError):
        return None, "its manifest.json is incomplete or damaged"
    for name, want in (("tokens.bin", tokens * dtype.itemsize), ("lines.idx", (lines + 1) * 8)):
        have = (folder / name).stat().st_size if (folder / name).is_file() else -1
        if have != want:
            return None, f"its {name} holds {max(have, 0):,} bytes where {want:,} are expected"
    st = Store(folder, m)
    if lines < 0 or tokens < 0 or not st.offsets_in_order():
        return None, "its lines.idx is damaged"
    return st, None


# --------------------------------------------------------------------------- building

def _encode(source, lines, dtype):
    """What a worker computes for a piece: its ids as the store's type, tokens per line."""
    ids, lengths = source.encode(lines)
    return np.asarray(ids).astype(dtype), lengths


def _clear_leftovers(folder):
    """Remove the temporary folders of builds of this store that were interrupted (their
    process, on this host, is gone)."""
    host = socket.gethostname()
    for tmp in folder.parent.glob(f".{folder.name}.*.tmp"):
        parts = tmp.name[len(folder.name) + 2:-len(".tmp")].removesuffix(".old").rsplit(".", 1)
        if len(parts) != 2 or parts[0] != host or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def build(source, folder, workers=None, show=True, why=None):
    """Tokenize source into a store at folder, with `workers` processes (every core by
    default); returns the Store. why: the reason an existing store is rebuilt. show: print
    progress and the line that says what was built."""
    folder = Path(folder)
    seen = source.files_seen()
    workers = useful_workers(workers or cores(), sum(f["bytes"] for f in seen))
    vocab = source.vocab
    dtype = np.dtype(np.uint16 if len(vocab) <= 1 << 16 else np.uint32)
    more = len(source.files) - 1
    name = f"{source.dataset} {Path(source.files[0]).name}{f' and {more} more' if more else ''}"
    if why:
        print(f"| token store {folder}: {why}; rebuilding it", flush=True)
    tmp = folder.parent / f".{folder.name}.{socket.gethostname()}.{os.getpid()}.tmp"
    start = time.time()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        num_tokens, num_lines = 0, 0
        with open(tmp / "tokens.bin", "wb") as ids_file, open(tmp / "lines.idx", "wb") as idx_file:
            idx_file.write(np.zeros(1, np.int64).tobytes())
            for ids, lengths in map_text(lambda lines: _encode(source, lines, dtype),
                                         source.read_lines(source.files),
                                         workers, f"tokenizing {name}",
                                         sum(f["bytes"] for f in seen), show):
                ids_file.write(ids.tobytes())
                idx_file.write((num_tokens + np.cumsum(lengths)).tobytes())
                num_tokens += len(ids)
                num_lines += len(lengths)
            for f in (ids_file, idx_file):
                f.flush()
                os.fsync(f.fileno())
        manifest = dict(format=FORMAT, version=VERSION, dataset=source.dataset,
                        tokenizer=source.tokenizer, vocab_fingerprint=vocab.fingerprint,
                        vocab_size=len(vocab), dtype=dtype.name, tokens=num_tokens,
                        lines=num_lines, sources=seen)
        with open(tmp / "manifest.json", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        sync_folder(tmp)
        if folder.exists():  # a store found wrong: moved away, then the new one in its place
            old = folder.parent / f".{folder.name}.{socket.gethostname()}.{os.getpid()}.old.tmp"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        sync_folder(folder.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write the token store {folder}: {e.strerror or e}; free space "
                        "there or pass --cache-dir with a writable folder") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.time() - start
    if show:
        print(f"| token store {folder}: built from {name}, {num_tokens:,} tokens of {num_lines:,} lines "
              f"in {seconds:.1f} s ({num_tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s, "
              f"{workers} process{'es' if workers > 1 else ''})", flush=True)
    return Store(folder, manifest)


def open_or_build(source, cache_dir, ctx, show=True):
    """The store of source under cache_dir, built where it is missing or wrong, once per
    job (ctx.once: rank 0 with every core while the others wait; a node that does not
    share rank 0's disk builds its own)."""
    folder = source.folder(cache_dir)

    def work():
        found, why = _why_not(folder, source)
        if found is None:
            build(source, folder, show=show, why=why)

    ctx.once(work, lambda: _why_not(folder, source)[0] is not None)
    found, why = _why_not(folder, source)
    if found is None:  # written and then changed under us: say so rather than read it
        raise UserError(f"token store {folder} is not usable after it was built ({why}); is "
                        "another job writing the same --cache-dir?")
    return found
