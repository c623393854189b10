"""The text corpora of the masked-LM and next-sentence tasks: a registry of data sets
(files, downloads with checksums, split rules), reading their lines, counting their
vocabulary, and their token ids in token stores (store.py), built once.

    sources = corpus_sources("WikiText2", dataset_dir("WikiText2", "DIR"))
    splits = load_corpus("WikiText2", sources, vocab, tokenizer, ".data/cache", ctx)  # {split: Tokens}

Adding a corpus is adding an entry to CORPORA (and the function that finds its splits).
"""
import collections
import gzip
import hashlib
import itertools
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

import dist
import store
from data import DataError

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


_WIKITEXT_JOINS = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")]


def wikitext_plain(line):
    """A WikiText line with its split number and hyphen marks joined again ("1 @,@ 000"
    -> "1,000", "long @-@ term" -> "long-term"), as a subword tokenizer should read it."""
    for marked, plain in _WIKITEXT_JOINS:
        line = line.replace(marked, plain)
    return line


@dataclass(frozen=True)
class Corpus:
    """A text corpus of the masked-LM and next-sentence tasks (--dataset)."""
    name: str
    splits: Callable  # (data folder, allow_download) -> {split: (files, line range)}
    download: Optional[Download] = None  # where its zip comes from, if anywhere
    read: Callable = text_lines  # path -> its lines of text
    plain: Optional[Callable] = None  # line -> the line without the corpus's own marks
    unk: Optional[str] = None  # the corpus's mark of a word left out of its vocabulary


def line_tokenizer(dataset, tokenizer):
    """lines -> their token lists, as a store of dataset holds them. A word tokenizer
    (basic_english) reads the lines as they are. A subword one (with an unk_text:
    WordPiece) reads Corpus.plain's form, with each of the corpus's unknown-word marks as
    its own unknown token, instead of pieces such as < un ##k >."""
    c, unk = CORPORA[dataset], getattr(tokenizer, "unk_text", None)
    if unk is None or (c.plain is None and c.unk is None):
        return tokenizer.tokenize_lines

    def tokenize(lines):
        parts, pieces = [], []  # the text between unknown-word marks; how many per line
        for line in lines:
            line = c.plain(line) if c.plain else line
            split = line.split(c.unk) if c.unk else [line]
            parts += split
            pieces.append(len(split))
        tokens, out = iter(tokenizer.tokenize_lines(parts)), []
        for n in pieces:
            line_tokens = next(tokens)
            for _ in range(n - 1):
                line_tokens = line_tokens + [unk] + next(tokens)
            out.append(line_tokens)
        return out
    return tokenize


_LINE_END = "\x00"  # a mark between lines' tokens that no token holds


def line_encoder(dataset, tokenizer, vocab):
    """lines -> (their token ids one line after another, each line's number of ids), as
    line_tokenizer and vocab make them: what a token store holds. basic_english's builtin
    rules run over many lines at once (Tokenizer.normalize_lines), and one split() then
    makes their tokens with a mark where each line ends."""
    tokenize = line_tokenizer(dataset, tokenizer)
    normalize = getattr(tokenizer, "normalize_lines", None)
    marked = {**vocab.stoi, _LINE_END: -1}  # made once, before the workers are forked
    unk = vocab.roles.unk

    def encode(lines):
        text = normalize(lines) if normalize is not None else None
        if text is not None and _LINE_END not in text:
            tokens = (text + "\n").replace("\n", f" {_LINE_END} ").split()
            ids = np.fromiter(map(marked.get, tokens, itertools.repeat(unk)), np.int64, len(tokens))
            ends = np.flatnonzero(ids < 0)
            return ids[ids >= 0], np.diff(ends, prepend=-1) - 1
        per_line = tokenize(lines)
        return (np.array(vocab.lookup_indices(list(itertools.chain.from_iterable(per_line))), np.int64),
                np.array([len(t) for t in per_line], np.int64))
    return encode


def vocabulary_lines(dataset, lines):
    """lines to train a subword vocabulary on: Corpus.plain's form, unknown-word marks left
    out (they are no words to learn)."""
    c = CORPORA[dataset]
    for line in lines:
        line = c.plain(line) if c.plain else line
        yield line.replace(c.unk, " ") if c.unk else line


# The registry: adding a corpus is adding an entry (and its splits function above).
# The original S3 address of WikiText answers 403; the author's mirror serves the same
# zips but refuses Python's default User-Agent (download() sends its own).
CORPORA = {c.name: c for c in [
    Corpus("WikiText2", _wikitext_splits("WikiText2"), Download(
        "wikitext-2", "wikitext-2-v1.zip", "https://wikitext.smerity.com/wikitext-2-v1.zip",
        "542ccefacc6c27f945fb54453812b3cd"), plain=wikitext_plain, unk="<unk>"),
    Corpus("WikiText103", _wikitext_splits("WikiText103"), Download(
        "wikitext-103", "wikitext-103-v1.zip", "https://wikitext.smerity.com/wikitext-103-v1.zip",
        "9ddaacaf6af0710eda8c456decff7832"), plain=wikitext_plain, unk="<unk>"),
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


def count_vocab(dataset, sources, tokenizer, show=True, workers=None):
    """The tokens' counts over the train split (for Vocab.from_counts), counted in pieces
    by every core."""
    files, frac = sources["train"]
    read = CORPORA[dataset].read
    lines = read_lines(files, read)
    if frac != WHOLE:
        lo, hi = _line_range(sum(1 for _ in read_lines(files, read)), frac)
        lines = itertools.islice(lines, lo, hi)
    def count(piece):
        text = tokenizer.normalize_lines(piece)
        if text is not None:
            return collections.Counter(text.split())
        return collections.Counter(itertools.chain.from_iterable(tokenizer.tokenize_lines(piece)))

    counts = collections.Counter()
    pieces = store.map_text(count, lines, workers or store.cores(), f"counting {dataset}'s vocabulary",
        int(sum(os.stat(p).st_size for p in files) * (frac[1] - frac[0])), show)
    for piece in pieces:
        counts.update(piece)
    return counts


def load_corpus(dataset, sources, vocab, tokenizer, cache_dir, ctx, show=True):
    """{split: store.Tokens} for train, valid and test: each split's lines of the token
    store of its files, built where missing (once per job: store.open_or_build).
    cache_dir '' or None: stores in a temporary folder of this process, removed at exit."""
    stores, out = {}, {}
    for split in SPLITS:
        files, frac = sources[split]
        key = tuple(str(p) for p in files)
        if key not in stores:
            source = store.Source(dataset, list(files), lambda fs: read_lines(fs, CORPORA[dataset].read),
                                  line_encoder(dataset, tokenizer, vocab), tokenizer.name, vocab)
            if cache_dir:  # whichever process builds a store says so
                stores[key] = store.open_or_build(source, cache_dir, ctx, show)
            else:
                tmp = tempfile.TemporaryDirectory(prefix="bert-tokens-")
                stores[key] = store.open_or_build(source, tmp.name, dist.Context(), show and ctx.main)
                stores[key].owner = tmp  # the folder goes when the store does
        lo, hi = _line_range(stores[key].num_lines, frac)
        out[split] = stores[key].lines(lo, hi)
    return out
