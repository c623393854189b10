"""Tokenizer, vocabulary, corpus readers and batching for the three tasks.

The tokenizer and vocabulary are torchtext's when torchtext imports (its last
release needs torch 2.3.x), and this file's own equivalents otherwise; the same
corpus gives the same token ids either way. Nothing here knows about the model.
"""
import collections
import gzip
import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import monitor
from dist import shard_range

try:  # torchtext 0.18 imports only beside torch 2.3.x; elsewhere its C++ library fails
    import torchtext
    torchtext.disable_torchtext_deprecation_warning()  # we know; that is why it is optional
    from torchtext.data.utils import get_tokenizer as _tt_get_tokenizer
    from torchtext.vocab import build_vocab_from_iterator as _tt_build_vocab
    from torchtext.vocab import vocab as _tt_vocab
    HAS_TORCHTEXT = True
except (ImportError, OSError, RuntimeError):
    HAS_TORCHTEXT = False

BACKEND = "torchtext" if HAS_TORCHTEXT else "builtin"
SPECIALS = ["<unk>", "<pad>", "<MASK>", "<cls>", "<sep>"]
UNK, PAD, MASK, CLS, SEP = range(len(SPECIALS))
VOCAB_HEADER = "# bert-example vocabulary v1"


class DataError(Exception):
    """A problem with the user's data files; the message says what to do."""


# --------------------------------------------------------------------------- tokenizer

# torchtext's basic_english rules, applied in order after lower-casing.
_BASIC_ENGLISH = [(re.compile(p), r) for p, r in [
    (r"\'", " '  "), (r"\"", ""), (r"\.", " . "), (r"<br \/>", " "), (r",", " , "),
    (r"\(", " ( "), (r"\)", " ) "), (r"\!", " ! "), (r"\?", " ? "), (r"\;", " "),
    (r"\:", " "), (r"\s+", " ")]]


def basic_english(line):
    line = line.lower()
    for pattern, replacement in _BASIC_ENGLISH:
        line = pattern.sub(replacement, line)
    return line.split()


class Tokenizer:
    """One interface for every tokenizer: text -> tokens, optionally with character spans.

    basic_english lower-cases and drops `"`, `;`, `:` and `<br />`, so spans are found
    by aligning each token back to the raw text; span (s, e) means text[s:e].
    """

    name = "basic_english"

    def __init__(self, backend=BACKEND):
        self._split = _tt_get_tokenizer("basic_english") if backend == "torchtext" else basic_english

    def __call__(self, text):
        return self._split(text)

    def tokenize_with_spans(self, text):
        tokens = self._split(text)
        lowered = text.lower()
        if len(lowered) == len(text):
            to_raw = None
        else:  # a few characters lower-case to two (e.g. 'İ'): map back index by index
            to_raw = [i for i, c in enumerate(text) for _ in c.lower()] + [len(text)]
        spans, pos = [], 0
        for tok in tokens:
            start, end = _align(lowered, tok, pos)
            if start < 0:
                raise DataError(f"could not align token {tok!r} to the text {text[:60]!r}...")
            spans.append((start, end) if to_raw is None else (to_raw[start], to_raw[end]))
            pos = end
        return tokens, spans


def _align(text, tok, pos):
    """Find tok in text at or after pos, allowing removed '"' characters inside it."""
    start = text.find(tok[0], pos)
    while start >= 0:
        i, j = start, 0
        while i < len(text) and j < len(tok):
            if text[i] == tok[j]:
                j += 1
            elif text[i] != '"':
                break
            i += 1
        if j == len(tok):
            return start, i
        start = text.find(tok[0], start + 1)
    return -1, -1


# --------------------------------------------------------------------------- vocabulary

class Vocab:
    """Token <-> id map with the specials first; unknown tokens map to <unk>.

    Backed by a torchtext.vocab.Vocab where torchtext imports (backend 'torchtext'),
    by a dict otherwise ('builtin'); both give the same ids.
    """

    def __init__(self, itos, backend=BACKEND):
        self.itos = list(itos)
        if self.itos[:len(SPECIALS)] != SPECIALS:
            raise DataError(f"vocabulary must start with the specials {SPECIALS}")
        self.stoi = {tok: i for i, tok in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise DataError("vocabulary has a token twice")
        self.fingerprint = hashlib.sha256("\n".join(self.itos).encode()).hexdigest()
        self._tt = None
        if backend == "torchtext":
            self._tt = _tt_vocab(collections.OrderedDict((t, 1) for t in self.itos), min_freq=1)
            self._tt.set_default_index(UNK)

    def __len__(self):
        return len(self.itos)

    def __getitem__(self, token):
        return self.stoi.get(token, UNK)

    def lookup_indices(self, tokens):
        if self._tt is not None:
            return self._tt.lookup_indices(list(tokens))
        get = self.stoi.get
        return [get(t, UNK) for t in tokens]

    @classmethod
    def build(cls, token_lists, backend=BACKEND):
        """Specials, then tokens by descending count, ties in string order (as torchtext)."""
        if backend == "torchtext":
            tt = _tt_build_vocab(token_lists, specials=SPECIALS, special_first=True)
            return cls(tt.get_itos(), backend)
        counter = collections.Counter()
        for tokens in token_lists:
            counter.update(tokens)
        ordered = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls(SPECIALS + [t for t, _ in ordered if t not in SPECIALS], backend)

    def to_text(self):
        """The file format: a header line, then one token per line in id order."""
        return VOCAB_HEADER + "\n" + "\n".join(self.itos) + "\n"

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            raise DataError(f"vocabulary file {path} not found; pass --save-vocab with the file "
                            "that mlm_task.py wrote") from None
        except OSError as e:
            raise DataError(f"cannot read vocabulary file {path}: {e}") from None
        except UnicodeDecodeError:
            lines = ["(binary)"]  # e.g. a pickled vocabulary of the original example
        if lines[0] != VOCAB_HEADER:
            raise DataError(f"{path} is not a vocabulary file of this project (first line should "
                            f"be {VOCAB_HEADER!r}); delete it to rebuild it, or pass --save-vocab")
        itos = lines[1:-1] if lines[-1] == "" else lines[1:]
        if not itos or any(not t or " " in t for t in itos):
            raise DataError(f"vocabulary file {path} is corrupt (empty or malformed lines); "
                            "delete it to rebuild it")
        try:
            return cls(itos)
        except DataError as e:
            raise DataError(f"vocabulary file {path} is corrupt: {e}; delete it to rebuild it") from None


# --------------------------------------------------------------------------- files

SPLITS = ("train", "valid", "test")
WHOLE = (0.0, 1.0)  # a line range: all of a file's lines


@dataclass(frozen=True)
class Download:
    """Where a corpus's zip comes from, and the folder it unpacks to."""
    folder: str
    zip: str
    url: str
    md5: str


def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest, md5, timeout=60):
    """Fetch url to dest through a temporary file; keep it only if its MD5 matches."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"| downloading {url} -> {dest}", flush=True)
    req = urllib.request.Request(url, headers={"User-Agent": "torchtext-bert-example/1.0"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {getattr(e, 'reason', e)}") from None
    got = md5sum(tmp)
    if got != md5:
        tmp.unlink()
        raise DataError(f"download of {url} has MD5 {got}, expected {md5}; nothing was kept")
    os.replace(tmp, dest)
    return dest


def safe_extract(zip_path, target):
    """Extract a zip, refusing members that would land outside target."""
    target = Path(target).resolve()
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.namelist():
                if not (target / member).resolve().is_relative_to(target):
                    raise DataError(f"{zip_path} has a member outside its folder: {member!r}")
            zf.extractall(target)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise DataError(f"{zip_path} is not a readable zip ({e}); delete it and "
                        "download it again") from None


def find_file(folder, name):
    """folder/name or folder/name.gz, whichever is a file; else None."""
    for cand in (folder / name, folder / (name + ".gz")):
        if cand.is_file():
            return cand
    return None


def _fetch_zip(dataset, data_dir, allow_download, wanted):
    """Make sure the dataset's zip is extracted in data_dir (downloading it if allowed)."""
    src = CORPORA[dataset].download
    zip_path = data_dir / src.zip
    if not zip_path.is_file():
        where = f"put {wanted} (or {src.zip}) in {data_dir}, or pass --data-dir"
        if not allow_download:
            raise DataError(f"{dataset} not found: {where}")
        try:
            download(src.url, zip_path, src.md5)
        except DataError as e:
            raise DataError(f"{dataset} not found and {e}; {where}") from None
    print(f"| extracting {zip_path}", flush=True)
    safe_extract(zip_path, data_dir)
    return True


def wikitext_files(dataset, data_dir, allow_download=True):
    """{split: path} for wiki.{split}.tokens[.gz] in data_dir, data_dir/<folder>, or the zip."""
    folder = CORPORA[dataset].download.folder
    names = {s: f"wiki.{s}.tokens" for s in SPLITS}
    wanted = "wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens"
    for attempt in range(2):
        for d in (data_dir, data_dir / folder):
            found = {s: find_file(d, n) for s, n in names.items()}
            if all(found.values()):
                return found
        if attempt == 0:
            _fetch_zip(dataset, data_dir, allow_download, wanted)
    raise DataError(f"{CORPORA[dataset].download.zip} in {data_dir} does not hold {wanted}")


def open_text(path):
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def text_lines(path):
    """The lines of a plain-text file (or .gz)."""
    try:
        with open_text(path) as f:
            yield from f
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def read_lines(paths, read=text_lines):
    """The lines of several files, each read with read(path)."""
    for p in paths:
        yield from read(p)


_WIKIFIL = [(re.compile(p, re.I if i else 0), r) for i, (p, r) in enumerate([
    (r"<ref[^<]*</ref>", ""), (r"<[^>]*>", ""), (r"\[http:[^] ]*", "["),
    (r"\|(thumb|left|right|\d+px)", ""), (r"\[\[image:[^\[\]]*\|", ""),
    (r"\[\[category:([^|\]]*)[^]]*\]\]", r"[[\1]]"), (r"\[\[[a-z\-]*:[^\]]*\]\]", ""),
    (r"\[\[[^\|\]]*\|", "[["), (r"\{\{[^}]*\}\}", ""), (r"\{[^}]*\}", ""),
    (r"[\[\]]", ""), (r"&[^;]*;", " ")])]
_DIGITS = str.maketrans({str(d): f" {w} " for d, w in enumerate(
    "zero one two three four five six seven eight nine".split())})


def enwik9_filter(path):
    """The visible article text of a Wikipedia XML dump, reduced in the manner of Matt
    Mahoney's wikifil.pl (lower-case letters and spaces, digits spelled out), line by
    line rather than by XML record; one line of output per non-empty line of text."""
    in_text = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if "<text " in line:
                in_text = True
            if "#redirect" in line.lower():
                in_text = False
            if not in_text:
                continue
            if "</text>" in line:
                in_text = False
            line = line.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
            for pattern, repl in _WIKIFIL:
                line = pattern.sub(repl, line)
            line = re.sub(r"[^a-z]+", " ", line.lower().translate(_DIGITS)).strip()
            if line:
                yield line + "\n"


# Each corpus's splits: (data folder, allow_download) -> {split: (files, line range)}.
# Corpora without splits of their own are cut by lines: the first 80% train, the next
# 10% valid, the rest test.
BY_LINES = {"train": (0.0, 0.8), "valid": (0.8, 0.9), "test": (0.9, 1.0)}


def _wikitext_splits(name):
    def splits(data_dir, allow_download):
        return {s: ([p], WHOLE) for s, p in wikitext_files(name, data_dir, allow_download).items()}
    return splits


def _bookcorpus_splits(data_dir, allow_download):
    files = sorted(p for p in data_dir.rglob("*") if p.suffix in (".txt", ".gz") and p.is_file())
    if not files:
        raise DataError(f"BookCorpus: no .txt files in {data_dir}; BookCorpus is not public, "
                        "put your own folder of plain-text books there or pass --data-dir")
    return {s: (files, r) for s, r in BY_LINES.items()}


def _enwik9_splits(data_dir, allow_download):
    path = data_dir / "enwik9"
    if not path.is_file():
        _fetch_zip("EnWik9", data_dir, allow_download, "enwik9")
    return {s: ([path], r) for s, r in BY_LINES.items()}


def _newscrawl_splits(data_dir, allow_download):
    """News Crawl's files for training; WikiText-2's valid and test, as the original."""
    files = sorted(p for p in data_dir.glob("news*") if p.is_file())
    if not files:
        raise DataError(f"WMTNewsCrawl: no news.* files (e.g. news.2010.en.shuffled) in "
                        f"{data_dir}; download them from the WMT site or pass --data-dir")
    wt2 = wikitext_files("WikiText2", data_dir, allow_download)
    return {"train": (files, WHOLE), "valid": ([wt2["valid"]], WHOLE),
            "test": ([wt2["test"]], WHOLE)}


@dataclass(frozen=True)
class Corpus:
    """A text corpus of the masked-LM and next-sentence tasks (--dataset)."""
    name: str
    splits: Callable  # (data folder, allow_download) -> {split: (files, line range)}
    download: Optional[Download] = None  # where its zip comes from, if anywhere
    read: Callable = text_lines  # path -> its lines of text


# The registry: adding a corpus is adding an entry (and its splits function above).
# The original S3 address of WikiText answers 403; the author's mirror serves the same
# zips but refuses Python's default User-Agent (download() sends its own).
CORPORA = {c.name: c for c in [
    Corpus("WikiText2", _wikitext_splits("WikiText2"), Download(
        "wikitext-2", "wikitext-2-v1.zip", "https://wikitext.smerity.com/wikitext-2-v1.zip",
        "542ccefacc6c27f945fb54453812b3cd")),
    Corpus("WikiText103", _wikitext_splits("WikiText103"), Download(
        "wikitext-103", "wikitext-103-v1.zip", "https://wikitext.smerity.com/wikitext-103-v1.zip",
        "9ddaacaf6af0710eda8c456decff7832")),
    Corpus("BookCorpus", _bookcorpus_splits),
    Corpus("EnWik9", _enwik9_splits, Download(
        ".", "enwik9.zip", "http://mattmahoney.net/dc/enwik9.zip",
        "3e773f8a1577fda2e27f871ca17f31fd"), read=lambda p: enwik9_filter(p)),
    Corpus("WMTNewsCrawl", _newscrawl_splits),
]}
DATASETS = list(CORPORA)


def corpus_sources(dataset, data_dir, allow_download=True):
    """{split: (files, line_fraction_range)} for an MLM/NS corpus of the registry."""
    if dataset not in CORPORA:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return CORPORA[dataset].splits(Path(data_dir), allow_download)


def dataset_dir(dataset, data_dir=None):
    """The folder to read (and download into): --data-dir if given, else .data/<dataset>."""
    if data_dir is None:
        path = Path(".data") / dataset
        path.mkdir(parents=True, exist_ok=True)
        return path
    path = Path(data_dir)
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist; pass --data-dir with the folder "
                        f"that holds the {dataset} files")
    return path


def _line_range(n, frac):
    return int(n * frac[0]), int(n * frac[1])


def count_tokens_for_vocab(dataset, sources, tokenizer):
    """Token lists of the train split, for Vocab.build (a generator: nothing is kept)."""
    files, frac = sources["train"]
    read = CORPORA[dataset].read
    lines = read_lines(files, read)
    if frac != WHOLE:
        n = sum(1 for _ in read_lines(files, read))
        lo, hi = _line_range(n, frac)
        lines = (line for i, line in enumerate(lines) if lo <= i < hi)
    return (tokenizer(line) for line in lines)


def load_split(dataset, sources, split, vocab, tokenizer, cache_dir=None, show=True):
    """Token ids of one split: (ids int64 tensor (T,), line offsets int64 array (L+1,)).

    The ids of the whole source are cached in cache_dir, keyed on the files' size and
    time and on the vocabulary, so a second run skips tokenization. show: print progress.
    """
    files, frac = sources[split]
    key = hashlib.sha256("|".join(
        [dataset, tokenizer.name, vocab.fingerprint, "v1"]
        + [f"{Path(p).resolve()}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p in files]
    ).encode()).hexdigest()[:24]
    cache = Path(cache_dir) / f"{dataset}-{key}.npz" if cache_dir else None
    ids = offsets = None
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                ids, offsets = z["ids"], z["offsets"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            ids = None  # a damaged cache is rebuilt, never trusted
    if ids is None:
        chunks, lengths = [], []
        lines = monitor.progress(read_lines(files, CORPORA[dataset].read),
                                 f"tokenizing {dataset} {split}", unit="lines", enabled=show)
        for line in lines:
            toks = vocab.lookup_indices(tokenizer(line))
            chunks.append(np.asarray(toks, dtype=np.int32))
            lengths.append(len(toks))
        ids = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        if cache is not None:
            _save_cache(cache, ids, offsets)
    lo, hi = _line_range(len(offsets) - 1, frac)
    offsets = offsets[lo:hi + 1]
    ids = torch.from_numpy(ids[offsets[0]:offsets[-1]].astype(np.int64))
    return ids, offsets - offsets[0]


def load_corpus(dataset, sources, vocab, tokenizer, cache_dir=None, show=True):
    """{split: (ids, line offsets)} for train, valid and test (see load_split)."""
    return {s: load_split(dataset, sources, s, vocab, tokenizer, cache_dir or None, show)
            for s in SPLITS}


def _save_cache(path, ids, offsets):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, ids=ids, offsets=offsets)
        os.replace(tmp, path)
    except OSError as e:  # caching is an optimisation; results do not depend on it
        print(f"| warning: could not write token cache {path}: {e}")


# --------------------------------------------------------------------------- MLM batches

def mlm_blocks(ids, batch_size, bptt, split="train"):
    """Cut a token stream into (num_batches, batch_size, bptt) contiguous blocks.

    ids: a b c d e f g h ...  ->  batch 0 = [[a b c] [d e f]] (bptt 3, batch 2); the tail
    that does not fill a whole batch is dropped, as the original did.
    """
    per_batch = batch_size * bptt
    num = len(ids) // per_batch
    if num == 0:
        raise DataError(f"the {split} split has {len(ids)} tokens, fewer than one batch of "
                        f"--batch_size {batch_size} x --bptt {bptt} = {per_batch}; "
                        "use a smaller batch or bptt, or more data")
    return ids[:num * per_batch].view(num, batch_size, bptt)


def add_cls(block):
    """(N, S) -> (N, S+1) with <cls> in front of every row."""
    return torch.cat([torch.full_like(block[:, :1], CLS), block], dim=1)


def mask_tokens(tokens, mask_frac, vocab_size, mode="mask", generator=None):
    """Choose masked positions per token and corrupt them.

    tokens (N, S) -> inputs (N, S), masked (N, S) bool, targets (M,) = tokens[masked].
    Each non-special token (<unk> included) is masked with probability mask_frac, never
    <cls>, <sep>, <pad>. mode 'mask' writes <MASK> at every masked position (the
    original); mode 'bert' writes <MASK> at 80%, a random word at 10%, keeps 10%.
    At least one position per batch is masked so the loss is always defined.
    """
    maskable = (tokens == UNK) | (tokens >= len(SPECIALS))
    draw = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    masked = (draw < mask_frac) & maskable
    if not masked.any():
        flat = maskable.flatten().nonzero().flatten()
        if len(flat) == 0:
            raise DataError("a batch has no token that can be masked")
        pick = flat[torch.randint(len(flat), (1,), generator=generator, device=tokens.device)]
        masked.view(-1)[pick] = True
    targets = tokens[masked]
    inputs = tokens.clone()
    if mode == "mask":
        inputs[masked] = MASK
    else:
        rule = torch.rand(tokens.shape, generator=generator, device=tokens.device)
        inputs[masked & (rule < 0.8)] = MASK
        swap = masked & (rule >= 0.8) & (rule < 0.9)
        randoms = torch.randint(len(SPECIALS), vocab_size, tokens.shape,
                                generator=generator, device=tokens.device)
        inputs[swap] = randoms[swap]
    return inputs, masked, targets


class Batches:
    """Aligned items served in batches along dim 0, reshuffled per epoch with a seed.

    Batches(x, y, batch_size=2): x (P, ...), y (P, ...) -> (x[i:i+2], y[i:i+2]), ...
    Batches(w, batch_size=2) with one item that is not a tensor (e.g. squad.Windows, any
    object with len, .device and indexing by a tensor of rows) -> w[i:i+2], ...
    With world > 1 each global batch holds batch_size rows per rank and rank gets its
    share (dist.shard_range), so a job of any size sees the same global batches (the
    last, partial one dropped when drop_last).
    """

    def __init__(self, *items, batch_size, shuffle=False, seed=0, epoch=0, rank=0, world=1,
                 drop_last=False):
        self.items, self.batch_size, self.rank, self.world = items, batch_size, rank, world
        self.one = len(items) == 1 and not torch.is_tensor(items[0])
        self.device = items[0].device
        self.size = batch_size * world
        rows = len(items[0])
        self.stop = rows - rows % self.size if drop_last else rows
        self.order = None
        if shuffle:
            g = torch.Generator().manual_seed(seed * 1000003 + epoch)
            self.order = torch.randperm(rows, generator=g).to(self.device)

    def __len__(self):
        return -(-self.stop // self.size)

    @staticmethod
    def count(rows, batch_size, world=1, drop_last=False, rank=0):
        """len() of Batches over rows without building them."""
        size = batch_size * world
        return rows // size if drop_last else -(-rows // size)

    def rows_of(self, rank):
        """The rows (before shuffling) that rank gets, in the order it gets them."""
        return torch.cat([torch.arange(start + lo, start + hi) for start in range(0, self.stop, self.size)
                          for lo, hi in [shard_range(min(self.size, self.stop - start), rank,
                                                     self.world)]] or [torch.zeros(0, dtype=torch.long)])

    def __iter__(self):
        for start in range(0, self.stop, self.size):
            lo, hi = shard_range(min(self.size, self.stop - start), self.rank, self.world)
            if lo == hi:
                continue
            idx = torch.arange(start + lo, start + hi).to(self.device)
            if self.order is not None:
                idx = self.order[idx]
            yield self.items[0][idx] if self.one else tuple(t[idx] for t in self.items)


# --------------------------------------------------------------------------- next sentence

def pack_pair(a, b, bptt, out_ids, out_types):
    """Write <cls> a <sep> b <sep>, cut to bptt+1 tokens, into out_ids / out_types (rows
    pre-filled with <pad> / 1); token type 0 for <cls>, A and the first <sep>."""
    seq = np.concatenate([[CLS], a, [SEP], b, [SEP]])[:bptt + 1]
    out_ids[:len(seq)] = seq
    out_types[:min(len(a) + 2, bptt + 1)] = 0


def ns_pairs(ids, offsets, min_sentence_len, frac_ns, bptt, generator):
    """Next-sentence examples from the lines of a corpus, as the original built them.

    Every line with at least max(2, min_sentence_len) tokens is split at a random point
    into (A, B); for frac_ns of the pairs, B is replaced by the A of another pair and
    the label becomes 0 (not next); otherwise 1 (is next).
    Returns inputs (P, bptt+1), token types (P, bptt+1), labels (P,).
    """
    ids = ids.numpy()
    lengths = np.diff(offsets)
    lines = np.flatnonzero(lengths >= max(2, min_sentence_len))
    n = len(lines)
    if n < 2:
        raise DataError(f"only {n} lines have at least {min_sentence_len} tokens; next-sentence "
                        "pairs need more (lower --min_sentence_len or use more data)")
    starts, lens = offsets[lines], lengths[lines]
    cut = (torch.rand(n, generator=generator).numpy() * (lens - 1)).astype(np.int64) + 1
    partner = np.arange(n)
    negatives = torch.randperm(n, generator=generator)[:int(n * frac_ns)].numpy()
    # another pair's A for each negative: j = i + k (mod n) with k in [1, n-1], never i itself
    shift = torch.randint(1, n, (len(negatives),), generator=generator).numpy()
    partner[negatives] = (negatives + shift) % n
    labels = np.ones(n, dtype=np.int64)
    labels[negatives] = 0
    inputs = np.full((n, bptt + 1), PAD, dtype=np.int64)
    types = np.ones((n, bptt + 1), dtype=np.int64)
    for i in range(n):
        a = ids[starts[i]:starts[i] + cut[i]]
        if labels[i]:
            b = ids[starts[i] + cut[i]:starts[i] + lens[i]]
        else:
            j = partner[i]
            b = ids[starts[j]:starts[j] + cut[j]]
        pack_pair(a, b, bptt, inputs[i], types[i])
    return torch.from_numpy(inputs), torch.from_numpy(types), torch.from_numpy(labels)
