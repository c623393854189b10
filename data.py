"""Tokens and batches for the three tasks: the tokenizer, the vocabulary, masked-LM
masking and `Batches` (corpus.py reads the files, store.py keeps their token ids,
samples.py makes the pretraining samples from them).

The tokenizer and vocabulary are torchtext's when torchtext imports (its last
release needs torch 2.3.x), and this file's own equivalents otherwise; the same
corpus gives the same token ids either way. Nothing here knows about the model.
"""
import collections
import hashlib
import re
from dataclasses import dataclass

import numpy as np
import torch

from dist import shard_range
from utils import check_version

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
VOCAB_VERSION = 1
VOCAB_HEADER = f"# bert-example vocabulary v{VOCAB_VERSION}"


@dataclass(frozen=True)
class Roles:
    """The ids of the special tokens, by role; words have ids from first_word on (BERT's
    masking draws its random words there)."""
    unk: int
    pad: int
    mask: int
    cls: int
    sep: int
    first_word: int


BASIC_ROLES = Roles(UNK, PAD, MASK, CLS, SEP, len(SPECIALS))  # this project's word vocabulary


class DataError(Exception):
    """A problem with the user's data files; the message says what to do."""


# --------------------------------------------------------------------------- tokenizer

# torchtext's basic_english rules, applied in order after lower-casing; then runs of
# whitespace become one space and the line is split there. torchtext writes them as
# regular expressions; each matches one literal string, so str.replace does the same.
_BASIC_ENGLISH = [("'", " '  "), ('"', ""), (".", " . "), ("<br />", " "), (",", " , "), ("(", " ( "),
                  (")", " ) "), ("!", " ! "), ("?", " ? "), (";", " "), (":", " ")]
# The same on UTF-8 bytes, where none of these ASCII characters is part of another one.
_BASIC_ENGLISH_BYTES = [(a.encode(), b.encode()) for a, b in _BASIC_ENGLISH]


def basic_english(line):
    line = line.lower()
    for literal, replacement in _BASIC_ENGLISH:
        line = line.replace(literal, replacement)
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

    def tokenize_lines(self, lines):
        """[self(line) for line in lines]."""
        text = self.normalize_lines(lines)
        if text is None:
            return [self._split(line) for line in lines]
        return [part.split() for part in text.split("\n")]

    def normalize_lines(self, lines):
        """The lines' text after basic_english's rules, one line per newline, whose split()
        gives the tokens: made at once for many lines (no rule matches across a newline)
        and on bytes, which is several times faster than one line at a time. None where
        that cannot be done (the torchtext backend, or a newline inside a line)."""
        text = "\n".join(line[:-1] if line.endswith("\n") else line for line in lines)
        if self._split is not basic_english or text.count("\n") != len(lines) - 1:
            return None
        text = text.lower().encode("utf-8", "surrogatepass")
        for literal, replacement in _BASIC_ENGLISH_BYTES:
            text = text.replace(literal, replacement)
        return text.decode("utf-8", "surrogatepass")

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
    if start >= 0 and text.startswith(tok, start):  # the usual case, where no '"' was removed inside
        return start, start + len(tok)
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
    """Token <-> id map; unknown tokens map to the unknown token's id.

    This project's word vocabulary (basic_english) has the specials first, in SPECIALS'
    order, and is backed by a torchtext.vocab.Vocab where torchtext imports (backend
    'torchtext'), by a dict otherwise ('builtin'); both give the same ids. Another
    vocabulary (wordpiece.py's) gives its own roles and a tag for its fingerprint.

    fingerprint: sha256 of the tokens (and the tag), which checkpoints keep, so that a
    model is never used with another vocabulary or tokenizer.
    """

    def __init__(self, itos, backend=BACKEND, roles=None, tag=""):
        self.itos = list(itos)
        if roles is None and self.itos[:len(SPECIALS)] != SPECIALS:
            raise DataError(f"vocabulary must start with the specials {SPECIALS}")
        self.roles = roles or BASIC_ROLES
        self.stoi = {tok: i for i, tok in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise DataError("vocabulary has a token twice")
        digest = hashlib.sha256("\n".join(self.itos).encode()).hexdigest()
        self.fingerprint = f"{tag}:{digest}" if tag else digest
        self._tt = None
        if backend == "torchtext" and roles is None:
            self._tt = _tt_vocab(collections.OrderedDict((t, 1) for t in self.itos), min_freq=1)
            self._tt.set_default_index(UNK)

    def __len__(self):
        return len(self.itos)

    def __getitem__(self, token):
        return self.stoi.get(token, self.roles.unk)

    def lookup_indices(self, tokens):
        if self._tt is not None:
            return self._tt.lookup_indices(list(tokens))
        get, unk = self.stoi.get, self.roles.unk
        return [get(t, unk) for t in tokens]

    @classmethod
    def build(cls, token_lists, backend=BACKEND):
        """Specials, then tokens by descending count, ties in string order (as torchtext)."""
        if backend == "torchtext":
            tt = _tt_build_vocab(token_lists, specials=SPECIALS, special_first=True)
            return cls(tt.get_itos(), backend)
        counter = collections.Counter()
        for tokens in token_lists:
            counter.update(tokens)
        return cls.from_counts(counter, backend)

    @classmethod
    def from_counts(cls, counter, backend=BACKEND):
        """The vocabulary build() makes, from the tokens' counts (counted in pieces, in
        parallel: corpus.count_vocab)."""
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
        version = re.fullmatch(r"# bert-example vocabulary v(\d+)", lines[0])
        if version and int(version.group(1)) != VOCAB_VERSION:
            check_version(path, "vocabulary file", int(version.group(1)), (VOCAB_VERSION,))
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


# --------------------------------------------------------------------------- MLM masking

def add_cls(block, cls=CLS):
    """(N, S) -> (N, S+1) with <cls> (the id cls) in front of every row."""
    return torch.cat([torch.full_like(block[:, :1], cls), block], dim=1)


def mask_tokens(tokens, mask_frac, vocab_size, mode="mask", generator=None, roles=BASIC_ROLES,
                continues=None):
    """Choose masked positions per token and corrupt them (the original's masking).

    tokens (N, S) -> inputs (N, S), masked (N, S) bool, targets (M,) = tokens[masked].
    Each non-special token (<unk> included) is masked with probability mask_frac, never
    <cls>, <sep>, <pad>. mode 'mask' writes <MASK> at every masked position (the
    original); mode 'bert' writes <MASK> at 80%, a random word at 10%, keeps 10%;
    mode 'whole-word' is 'bert' with the pieces of a word masked together: each word is
    masked with probability mask_frac, its pieces being the token that starts it and the
    tokens after it that `continues` (a (V,) bool tensor: WordPiece's ## pieces) marks.
    At least one position per batch is masked so the loss is always defined (a check
    that reads the device once per batch, as M does).
    """
    maskable = _maskable(tokens, roles)
    draw = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    if mode == "whole-word":
        draw = draw.gather(1, word_starts(tokens, continues))
    masked = (draw < mask_frac) & maskable
    if not masked.any():
        flat = maskable.flatten().nonzero().flatten()
        if len(flat) == 0:
            raise DataError("a batch has no token that can be masked")
        pick = flat[torch.randint(len(flat), (1,), generator=generator, device=tokens.device)]
        masked.view(-1)[pick] = True
    return _corrupt(tokens, masked, mode, vocab_size, generator, roles), masked, tokens[masked]


def predictions_per_sequence(length, mask_frac, cap=0):
    """BERT's number of masked positions in a sequence of `length` tokens: round(mask_frac
    * length), at least 1, at most cap (when cap > 0; BERT's max_predictions_per_seq)."""
    k = max(1, round(mask_frac * length))
    return min(k, cap) if cap > 0 else k


def mask_per_sequence(tokens, mask_frac, vocab_size, mode="mask", generator=None,
                      roles=BASIC_ROLES, cap=0, continues=None):
    """BERT's masking: exactly P = predictions_per_sequence(S, mask_frac, cap) positions
    per sequence, drawn uniformly without replacement among its maskable tokens (those
    mask_tokens may mask), then corrupted as mask_tokens does. Mode 'whole-word' draws
    words instead, in a random order, while all their pieces fit in the P slots (at
    least the first word's first piece: a sequence with a maskable token always has a
    masked one), as BERT's whole-word masking does.

    tokens (N, S) -> inputs (N, S), index (N, P) long (ascending), valid (N, P) bool,
    targets (N, P) = tokens at index. A sequence with fewer than P maskable tokens masks
    all of them and its other slots are not valid (the loss ignores them). Every shape
    follows from tokens' shape alone and nothing is read back from the device, so a GPU
    step never waits and torch.compile sees fixed shapes. A sequence with a maskable
    token always has a masked one: the loss is defined without a check.
    """
    s = tokens.size(1)
    p = min(s, predictions_per_sequence(s, mask_frac, cap))
    maskable = _maskable(tokens, roles)
    draw = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    if mode == "whole-word":
        index, valid = _whole_words(draw, tokens, maskable, p, continues)
    else:
        # The P smallest draws among the maskable tokens (the others are pushed past
        # them): a uniform sample without replacement.
        index = draw.masked_fill(~maskable, 2.0).topk(p, dim=1, largest=False).indices
        index = index.sort(dim=1).values
        valid = maskable.gather(1, index)
    masked = torch.zeros_like(maskable).scatter_(1, index, valid)
    inputs = _corrupt(tokens, masked, mode, vocab_size, generator, roles)
    return inputs, index, valid, tokens.gather(1, index)


def word_starts(tokens, continues):
    """(N, S) long: the position of the token that starts each token's word, the token
    itself where `continues` (a (V,) bool tensor, or None: every token is a word) does not
    mark it as a continuation. A row that starts inside a word counts its first piece as
    the start."""
    position = torch.arange(tokens.size(1), device=tokens.device).expand_as(tokens)
    if continues is None:
        return position
    return torch.where(continues[tokens], 0, position).cummax(dim=1).values


def _whole_words(draw, tokens, maskable, p, continues):
    """mask_per_sequence's P slots, filled with whole words: each word takes its first
    piece's draw, the maskable tokens are sorted by it (a stable sort: a word's pieces
    stay together, in order), and a token is taken when its whole word ends within the
    first P."""
    s = tokens.size(1)
    position = torch.arange(s, device=tokens.device)
    starts = word_starts(tokens, continues)
    key = draw.gather(1, starts).masked_fill(~maskable, 2.0)  # the others sort last
    order = key.sort(dim=1, stable=True)
    word = starts.gather(1, order.indices)
    last = torch.ones_like(maskable)
    last[:, :-1] = word[:, 1:] != word[:, :-1]
    # the rank in the sorted order where each token's word ends
    ends = torch.where(last, position, s).flip(1).cummin(dim=1).values.flip(1)
    taken = ((ends < p) | (position == 0)) & (order.values < 2.0)
    index, by = order.indices[:, :p].sort(dim=1)
    return index, taken[:, :p].gather(1, by)


def _maskable(tokens, roles):
    """Tokens that may be masked: words and <unk>, never <cls>, <sep>, <pad>, <mask>."""
    return (tokens == roles.unk) | (tokens >= roles.first_word)


def _corrupt(tokens, masked, mode, vocab_size, generator, roles):
    """tokens with the masked positions corrupted: all <MASK> ('mask'), or BERT's 80% <MASK>,
    10% a random word, 10% unchanged ('bert')."""
    inputs = tokens.clone()
    if mode == "mask":
        return inputs.masked_fill_(masked, roles.mask)
    rule = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    inputs.masked_fill_(masked & (rule < 0.8), roles.mask)
    swap = masked & (rule >= 0.8) & (rule < 0.9)
    randoms = torch.randint(roles.first_word, vocab_size, tokens.shape,
                            generator=generator, device=tokens.device)
    return torch.where(swap, randoms, inputs)


class Batches:
    """Aligned items served in batches along dim 0.

    Batches(x, y, batch_size=2): x (P, ...), y (P, ...) -> (x[i:i+2], y[i:i+2]), ...
    Batches(w, batch_size=2) with one item that is not a tensor (squad.Windows, Blocks,
    Pairs: anything with len, .device and indexing by a tensor of rows on that device)
    -> w[i:i+2], ...
    Order: as stored; shuffle=True, a torch.randperm per (seed, epoch), for items held in
    memory; or order=samples.Shuffle(...), computed per position, for the samples of a
    corpus of any size. With world > 1 each global batch holds batch_size rows per rank
    and rank gets its share (dist.shard_range), so a job of any size sees the same global
    batches (the last, partial one dropped when drop_last). start: the first batch to
    serve (a resumed run starts there without reading the ones before). Each batch is
    read while the step of the one before runs (one ahead).
    """

    def __init__(self, *items, batch_size, shuffle=False, seed=0, epoch=0, rank=0, world=1,
                 drop_last=False, order=None, start=0):
        self.items, self.batch_size, self.rank, self.world = items, batch_size, rank, world
        self.one = len(items) == 1 and not torch.is_tensor(items[0])
        self.device = items[0].device
        self.size = batch_size * world
        rows = len(items[0])
        self.stop = rows - rows % self.size if drop_last else rows
        self.order, self.start, self.perm = order, start, None
        self.window = (0, np.zeros(0, np.int64))  # order's samples at some positions, from one call
        if shuffle:
            g = torch.Generator().manual_seed(seed * 1000003 + epoch)
            self.perm = torch.randperm(rows, generator=g).to(self.device)

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

    def _batch(self, b):
        start = b * self.size
        lo, hi = shard_range(min(self.size, self.stop - start), self.rank, self.world)
        if lo == hi:
            return None
        if self.order is None:
            idx = torch.arange(start + lo, start + hi)
        else:  # asked for 64 batches at a time: each call costs as much for 1 as for 10,000
            first, samples = self.window
            if not (first <= start + lo and start + hi <= first + len(samples)):
                samples = self.order(np.arange(start + lo, min(start + lo + 64 * self.size, self.stop)))
                first, self.window = start + lo, (start + lo, samples)
            idx = torch.from_numpy(samples[start + lo - first:start + hi - first])
        idx = idx.to(self.device)
        if self.perm is not None:
            idx = self.perm[idx]
        return self.items[0][idx] if self.one else tuple(t[idx] for t in self.items)

    def __iter__(self):
        batches = (self._batch(b) for b in range(self.start, len(self)))
        ahead = next(batches, None)
        for batch in batches:
            if ahead is not None:
                yield ahead
            ahead = batch
        if ahead is not None:
            yield ahead
