"""Tokenizer, vocabulary, corpus readers and batching for the three tasks.

The tokenizer and vocabulary are torchtext's when torchtext imports (its last
release needs torch 2.3.x), and this file's own equivalents otherwise; the same
corpus gives the same token ids either way. Nothing here knows about the model.
"""
import collections
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch

import monitor

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

# Where the corpora come from. The original S3 address answers 403; the author's mirror
# serves the same zips but refuses Python's default User-Agent.
SOURCES = {
    "WikiText2": dict(folder="wikitext-2", zip="wikitext-2-v1.zip",
                      url="https://wikitext.smerity.com/wikitext-2-v1.zip",
                      md5="542ccefacc6c27f945fb54453812b3cd"),
    "WikiText103": dict(folder="wikitext-103", zip="wikitext-103-v1.zip",
                        url="https://wikitext.smerity.com/wikitext-103-v1.zip",
                        md5="9ddaacaf6af0710eda8c456decff7832"),
    "EnWik9": dict(folder=".", zip="enwik9.zip", url="http://mattmahoney.net/dc/enwik9.zip",
                   md5="3e773f8a1577fda2e27f871ca17f31fd"),
}
DATASETS = ["WikiText2", "WikiText103", "BookCorpus", "EnWik9", "WMTNewsCrawl"]
SPLITS = ("train", "valid", "test")


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
    src = SOURCES[dataset]
    zip_path = data_dir / src["zip"]
    if not zip_path.is_file():
        where = f"put {wanted} (or {src['zip']}) in {data_dir}, or pass --data-dir"
        if not allow_download:
            raise DataError(f"{dataset} not found: {where}")
        try:
            download(src["url"], zip_path, src["md5"])
        except DataError as e:
            raise DataError(f"{dataset} not found and {e}; {where}") from None
    print(f"| extracting {zip_path}", flush=True)
    safe_extract(zip_path, data_dir)
    return True


def wikitext_files(dataset, data_dir, allow_download=True):
    """{split: path} for wiki.{split}.tokens[.gz] in data_dir, data_dir/<folder>, or the zip."""
    folder = SOURCES[dataset]["folder"]
    names = {s: f"wiki.{s}.tokens" for s in SPLITS}
    wanted = "wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens"
    for attempt in range(2):
        for d in (data_dir, data_dir / folder):
            found = {s: find_file(d, n) for s, n in names.items()}
            if all(found.values()):
                return found
        if attempt == 0:
            _fetch_zip(dataset, data_dir, allow_download, wanted)
    raise DataError(f"{SOURCES[dataset]['zip']} in {data_dir} does not hold {wanted}")


def open_text(path):
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_lines(paths, enwik=False):
    for p in paths:
        if enwik:
            yield from enwik9_filter(p)
            continue
        try:
            with open_text(p) as f:
                yield from f
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise DataError(f"cannot read {p}: {e}") from None


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


def corpus_sources(dataset, data_dir, allow_download=True):
    """{split: (files, line_fraction_range)} for an MLM/NS corpus.

    WikiText has its own splits. A folder of .txt files (BookCorpus), EnWik9 and
    WMTNewsCrawl are cut by lines: the first 80% train, the next 10% valid, the rest
    test (EnWik9 as the original; WMTNewsCrawl's valid/test are WikiText-2's, as the
    original's were).
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    data_dir = Path(data_dir)
    whole = {"train": (0.0, 0.8), "valid": (0.8, 0.9), "test": (0.9, 1.0)}
    if dataset in ("WikiText2", "WikiText103"):
        return {s: ([p], (0.0, 1.0)) for s, p in wikitext_files(dataset, data_dir,
                                                                allow_download).items()}
    if dataset == "BookCorpus":
        files = sorted(p for p in data_dir.rglob("*") if p.suffix in (".txt", ".gz")
                       and p.is_file())
        if not files:
            raise DataError(f"BookCorpus: no .txt files in {data_dir}; BookCorpus is not public, "
                            "put your own folder of plain-text books there or pass --data-dir")
        return {s: (files, r) for s, r in whole.items()}
    if dataset == "EnWik9":
        path = data_dir / "enwik9"
        if not path.is_file():
            _fetch_zip("EnWik9", data_dir, allow_download, "enwik9")
        return {s: ([path], r) for s, r in whole.items()}
    files = sorted(p for p in data_dir.glob("news*") if p.is_file())
    if not files:
        raise DataError(f"WMTNewsCrawl: no news.* files (e.g. news.2010.en.shuffled) in "
                        f"{data_dir}; download them from the WMT site or pass --data-dir")
    wt2 = wikitext_files("WikiText2", data_dir, allow_download)
    return {"train": (files, (0.0, 1.0)), "valid": ([wt2["valid"]], (0.0, 1.0)),
            "test": ([wt2["test"]], (0.0, 1.0))}


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
    lines = read_lines(files, enwik=dataset == "EnWik9")
    if frac != (0.0, 1.0):
        n = sum(1 for _ in read_lines(files, enwik=dataset == "EnWik9"))
        lo, hi = _line_range(n, frac)
        lines = (line for i, line in enumerate(lines) if lo <= i < hi)
    return (tokenizer(line) for line in lines)


def load_split(dataset, sources, split, vocab, tokenizer, cache_dir=None):
    """Token ids of one split: (ids int64 tensor (T,), line offsets int64 array (L+1,)).

    The ids of the whole source are cached in cache_dir, keyed on the files' size and
    time and on the vocabulary, so a second run skips tokenization.
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
        lines = monitor.progress(read_lines(files, enwik=dataset == "EnWik9"),
                                 f"tokenizing {dataset} {split}", unit="lines")
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


def load_corpus(dataset, sources, vocab, tokenizer, cache_dir=None):
    """{split: (ids, line offsets)} for train, valid and test (see load_split)."""
    return {s: load_split(dataset, sources, s, vocab, tokenizer, cache_dir or None) for s in SPLITS}


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
    """Aligned tensors served in batches along dim 0, reshuffled per epoch with a seed.

    Batches(x, y, batch_size=2): x (P, ...), y (P, ...) -> (x[i:i+2], y[i:i+2]), ...
    With world > 1 each global batch holds batch_size rows per rank and rank gets its
    own slice, so a job of any size sees the same global batches (the last, partial
    one dropped when drop_last).
    """

    def __init__(self, *tensors, batch_size, shuffle=False, seed=0, epoch=0, rank=0, world=1,
                 drop_last=False):
        self.tensors, self.batch_size, self.rank, self.world = tensors, batch_size, rank, world
        self.size = batch_size * world
        rows = len(tensors[0])
        self.stop = rows - rows % self.size if drop_last else rows
        self.order = None
        if shuffle:
            g = torch.Generator().manual_seed(seed * 1000003 + epoch)
            self.order = torch.randperm(rows, generator=g).to(tensors[0].device)

    def __len__(self):
        return -(-self.stop // self.size)

    @staticmethod
    def count(rows, batch_size, world=1, drop_last=False, rank=0):
        """len() of Batches over rows without building them."""
        size = batch_size * world
        return rows // size if drop_last else -(-rows // size)

    def __iter__(self):
        for start in range(0, self.stop, self.size):
            end = min(start + self.size, self.stop)
            mine = torch.arange(start, end).tensor_split(self.world)[self.rank]
            if len(mine) == 0:
                continue
            idx = mine.to(self.tensors[0].device)
            if self.order is not None:
                idx = self.order[idx]
            yield tuple(t[idx] for t in self.tensors)


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


# --------------------------------------------------------------------------- SQuAD v1.1

SQUAD = {"train-v1.1.json": "981b29407e0affa3b1b156f72073b945",
         "dev-v1.1.json": "3e85deb501d4e538b6bc56f786231552"}
SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"


def squad_file(data_dir, name, allow_download=True):
    """data_dir/name (or name.gz); the official files are downloaded when absent."""
    data_dir = Path(data_dir)
    found = find_file(data_dir, name)
    if found:
        return found
    if name in SQUAD and allow_download:
        try:
            return download(SQUAD_URL + name, data_dir / name, SQUAD[name])
        except DataError as e:
            raise DataError(f"SQuAD file {name} not found in {data_dir} and {e}; put it there "
                            "or pass --data-dir / --train-file / --dev-file") from None
    raise DataError(f"SQuAD file {name} not found in {data_dir}; put it there or pass "
                    "--data-dir / --train-file / --dev-file")


def read_squad(path):
    """Paragraphs of a SQuAD v1.1 file: [{'context', 'qas': [{'id', 'question',
    'answers': [(text, char_start), ...]}]}], checked against the format."""
    try:
        with open_text(path) as f:
            articles = json.load(f)["data"]
        paragraphs = []
        for article in articles:
            for para in article["paragraphs"]:
                ctx = para["context"]
                qas = []
                for qa in para["qas"]:
                    answers = [(a["text"], int(a["answer_start"])) for a in qa["answers"]]
                    if not answers:
                        raise DataError(f"{path}: question {qa['id']} has no answer; this is a "
                                        "SQuAD v1.1 reader (v2.0 files are not supported)")
                    for text, start in answers:
                        if ctx[start:start + len(text)] != text:
                            raise DataError(f"{path}: question {qa['id']}: answer {text!r} is not "
                                            f"at answer_start {start} of its context")
                    qas.append(dict(id=qa["id"], question=qa["question"], answers=answers))
                paragraphs.append(dict(context=ctx, qas=qas))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read SQuAD file {path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is not in the SQuAD v1.1 format (problem at {e!r})") from None
    if not paragraphs:
        raise DataError(f"{path} holds no SQuAD paragraphs")
    return paragraphs


# --------------------------------------------------------------------------- cloze questions

_CLOZE_SKIP = frozenset(
    "the a an of in on at to and or for by with from as is was were be been are it its this that "
    "which who he she they his her their also but not had has have after before during into than "
    "then there these those when while where would could can may does did will should being such "
    "some other more most only both each over through about between within without however "
    "although because against under until upon very many much what them whom whose onto made "
    "make first later several".split())
_MONTHS = frozenset("January February March April May June July August September October "
                    "November December".split())
_NUMBER = re.compile(r"[0-9][0-9,.]*")


def _cloze_answer(words, rng):
    """(i, j): the answer span words[i:j] of a sentence, or None. A run of up to four
    capitalised words or numbers not at the sentence start (the names, dates and
    amounts SQuAD asks about); in three sentences of ten, and where there is no such
    run, single words of more than three letters are candidates too."""
    def named(w):
        return bool(_NUMBER.fullmatch(w)) or (len(w) > 1 and w[:1].isupper() and w.isalpha()
                                              and w.lower() not in _CLOZE_SKIP)
    runs, i = [], 1
    while i < len(words):
        if named(words[i]):
            j = i + 1
            while j < len(words) and j - i < 4 and named(words[j]):
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    if not runs or rng.random() < 0.3:
        runs += [(k, k + 1) for k, w in enumerate(words)
                 if w.isalpha() and len(w) > 3 and w.lower() not in _CLOZE_SKIP]
    return rng.choice(runs) if runs else None


def _cloze_wh(answer):
    first = answer[0]
    if re.fullmatch(r"1[0-9]{3}|20[0-9]{2}", first) or first in _MONTHS:
        return "when"
    if _NUMBER.fullmatch(first):
        return "how many"
    return "who" if first[:1].isupper() else "what"


def cloze_questions(lines, seed=0, max_words=90, drop=0.25):
    """Questions without labels from running text, in read_squad's form: span-selection
    pretraining for SQuAD. lines: WikiText lines (a line is a paragraph; headings,
    ' = Title = ', are skipped; ' @-@ ', ' @,@ ', ' @.@ ' are joined back). Each
    paragraph is cut into contexts of whole sentences, up to max_words words. From every
    sentence of 8 to 40 words one answer span is taken (_cloze_answer); its question is a
    wh-word for the span's kind (when, how many, who, what) followed by the sentence
    without the span, each remaining word dropped with probability drop and `<unk>`
    words left out, so that the model must find the sentence by its words and pick what
    the question lacks, as in SQuAD. The same lines and seed give the same questions."""
    rng = random.Random(seed)
    paragraphs, count = [], 0
    for line in lines:
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
            line = line.replace(a, b)
        sentences, current = [], []
        for word in line.split():
            current.append(word)
            if word in (".", "!", "?"):
                sentences.append(current)
                current = []
        if current:
            sentences.append(current)
        contexts, current, words = [], [], 0
        for sentence in sentences:
            if current and words + len(sentence) > max_words:
                contexts.append(current)
                current, words = [], 0
            current.append(sentence)
            words += len(sentence)
        if current:
            contexts.append(current)
        for context in contexts:
            text = " ".join(w for sentence in context for w in sentence)
            qas, offset = [], 0
            for sentence in context:
                span = _cloze_answer(sentence, rng) if 8 <= len(sentence) <= 40 else None
                if span is not None:
                    i, j = span
                    answer = " ".join(sentence[i:j])
                    body = sentence[:-1] if sentence[-1] in (".", "!", "?") else sentence
                    kept = [w for k, w in enumerate(body) if not i <= k < j and w != "<unk>"
                            and rng.random() >= drop]
                    start = offset + sum(len(w) + 1 for w in sentence[:i])
                    count += 1
                    qas.append(dict(id=f"cloze-{count}",
                                    question=" ".join([_cloze_wh(sentence[i:j])] + kept) + " ?",
                                    answers=[(answer, start)]))
                offset += sum(len(w) + 1 for w in sentence)
            if qas:
                paragraphs.append(dict(context=text, qas=qas))
    return paragraphs


def answer_token_span(spans, char_start, char_end):
    """First and last token overlapping text[char_start:char_end]; (-1, -1) if none."""
    first = next((i for i, (s, e) in enumerate(spans) if e > char_start), None)
    last = next((i for i in range(len(spans) - 1, -1, -1) if spans[i][0] < char_end), None)
    if first is None or last is None or first > last:
        return -1, -1
    return first, last


def squad_features(paragraphs, tokenizer, vocab, bptt, doc_stride=None, training=False):
    """Model inputs for SQuAD: <cls> question <sep> context window <sep>, padded to bptt.

    Without doc_stride each question gets one window, the start of its context (the
    original). With doc_stride, windows start every doc_stride context tokens until
    the end of the context is covered. In training, a window that does not hold the
    (first) answer is left out without doc_stride (as the original did) and points at
    <cls> with it (as BERT's run_squad does).

    Returns (examples, features): examples[k] = dict(id, context, answers, spans);
    features = dict of tensors: input_ids, token_types (F, bptt), match (F, bptt) 1 at a
    context token whose word (the token's text, so `<unk>` words too) is also a word of
    the question, punctuation aside; start, end (F,) answer
    positions in the input (-1 when not inside), example (F,), ctx_start (F,) input
    position of the window's first context token, window (F,) its context-token index.
    """
    examples, rows = [], []
    shown = monitor.Progress("preparing SQuAD windows", sum(len(p["qas"]) for p in paragraphs),
                             "questions")
    for para in paragraphs:
        ctx_tokens, spans = tokenizer.tokenize_with_spans(para["context"])
        ctx_ids = vocab.lookup_indices(ctx_tokens)
        for qa in para["qas"]:
            q_tokens = tokenizer(qa["question"])
            q_ids = vocab.lookup_indices(q_tokens)
            q_words = {t for t in q_tokens if any(c.isalnum() for c in t)}
            ctx_match = [int(t in q_words) for t in ctx_tokens]
            budget = bptt - len(q_ids) - 3
            if budget < 1:
                raise DataError(f"question {qa['id']} has {len(q_ids)} tokens, which leaves no "
                                f"room for its context in --bptt {bptt}; raise --bptt")
            gold = [answer_token_span(spans, s, s + len(t)) for t, s in qa["answers"]]
            k = len(examples)
            examples.append(dict(id=qa["id"], context=para["context"], spans=spans,
                                 answers=[t for t, _ in qa["answers"]], gold=gold))
            step = min(doc_stride, budget) if doc_stride else None
            w = 0
            while True:
                window = ctx_ids[w:w + budget]
                ctx_start = len(q_ids) + 2
                s, e = gold[0] if gold else (-1, -1)
                inside = s >= w and 0 <= e < w + len(window)
                target = (s - w + ctx_start, e - w + ctx_start) if inside else (-1, -1)
                if training and not inside and doc_stride:
                    target = (0, 0)  # BERT: a window without the answer points at <cls>
                if not (training and target[0] < 0):
                    rows.append((k, [CLS] + q_ids + [SEP] + window + [SEP], ctx_start, w,
                                 len(window), target, ctx_match[w:w + budget]))
                if step is None or w + budget >= len(ctx_ids):
                    break
                w += step
            shown.update()
    shown.close()
    n = len(rows)
    input_ids = torch.full((n, bptt), PAD, dtype=torch.long)
    types = torch.ones((n, bptt), dtype=torch.long)
    match = torch.zeros((n, bptt), dtype=torch.long)
    meta = torch.zeros((n, 6), dtype=torch.long)
    for i, (k, seq, ctx_start, w, wlen, (s, e), window_match) in enumerate(rows):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        types[i, :ctx_start] = 0
        match[i, ctx_start:ctx_start + wlen] = torch.tensor(window_match, dtype=torch.long)
        meta[i] = torch.tensor([s, e, k, ctx_start, w, wlen])
    names = ("start", "end", "example", "ctx_start", "window", "window_len")
    features = dict(input_ids=input_ids, token_types=types, match=match,
                    **{name: meta[:, j] for j, name in enumerate(names)})
    return examples, features


def best_spans(start_logits, end_logits, ctx_start, window_len, max_answer_len,
               with_total=False):
    """Best span per row with start <= end < start + max_answer_len inside the context.

    start_logits, end_logits (F, S); ctx_start, window_len (F,) -> (score, start, end),
    each (F,), positions in the input; with_total, also the logsumexp of the scores of
    all those spans (score - total is the best span's log-probability among them).
    """
    F_, S = start_logits.shape
    pos = torch.arange(S, device=start_logits.device)
    in_ctx = (pos >= ctx_start[:, None]) & (pos < (ctx_start + window_len)[:, None])  # (F, S)
    scores = start_logits[:, :, None] + end_logits[:, None, :]  # (F, S start, S end)
    gap = pos[None, :] - pos[:, None]  # end - start
    allowed = (gap >= 0) & (gap < max_answer_len)  # (S, S)
    allowed = allowed[None] & in_ctx[:, :, None] & in_ctx[:, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    best, flat = scores.view(F_, -1).max(dim=1)
    if with_total:
        return best, flat // S, flat % S, torch.logsumexp(scores.view(F_, -1), dim=1)
    return best, flat // S, flat % S
