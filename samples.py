"""The samples of the pretraining tasks, read from a token store (store.Tokens) as they
are used: their order, masked-LM blocks and next-sentence pairs. Nothing here holds a
corpus: a batch is read from the store, made on the host and copied to the device.

    order = Shuffle(len(blocks), seed, epoch, ORDER)   # the samples of an epoch, per position
    batches = data.Batches(Blocks(tokens, bptt, device), batch_size=32, order=order)

Every random draw is a function of (seed, epoch, sample index) alone, so the same samples
come in the same global batches for any number of ranks, and a run resumes at any step.
"""
import copy

import numpy as np
import torch

from data import BASIC_ROLES, DataError

# --------------------------------------------------------------------------- sample order

_GOLDEN = 0x9E3779B97F4A7C15
# What a draw is for, mixed into its key so that draws of one (seed, epoch) are independent.
ORDER, NEGATIVE, CUT, PARTNER = range(1, 5)


def _mix(x):
    """splitmix64's finaliser on uint64 arrays (wrapping on overflow): a bijective hash
    whose every output bit depends on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def draw_key(*parts):
    """A uint64 key made from integers, e.g. (seed, epoch, ORDER)."""
    h = np.zeros(1, np.uint64)
    for p in parts:
        h = _mix((h ^ np.uint64(p & (2 ** 64 - 1))) + np.uint64(_GOLDEN))
    return h[0]


def uniform(index, key):
    """One float in [0, 1) per index: a function of (key, index) alone."""
    x = _mix(_mix(np.atleast_1d(index).astype(np.uint64) ^ key) + np.uint64(_GOLDEN))
    return (x >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


class Shuffle:
    """A pseudo-random permutation of range(n), one per key: shuffle(positions) gives the
    samples at those positions (numpy int64).

    Computed for any positions without holding the permutation (memory does not grow with
    n, and a run starts at any position): a 4-round Feistel network on the smallest even
    number of bits that holds n, a bijection there; a value past n is sent through it again
    until it lands below n (cycle walking: fewer than 4 times on average), which keeps it a
    bijection of range(n).
    """

    def __init__(self, n, *key):
        self.n = n
        self.half = (max(2, (n - 1).bit_length()) + 1) // 2
        self.keys = [draw_key(*key, r) for r in range(4)]

    def _feistel(self, x):
        half, mask = np.uint64(self.half), np.uint64((1 << self.half) - 1)
        left, right = x >> half, x & mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << half) | right

    def __call__(self, positions):
        out = self._feistel(np.atleast_1d(positions).astype(np.uint64))
        out_of_range = out >= self.n
        while out_of_range.any():
            out[out_of_range] = self._feistel(out[out_of_range])
            out_of_range = out >= self.n
        return out.astype(np.int64)


# --------------------------------------------------------------------------- samples of a corpus

def to_device(array, device):
    """A host array as a long tensor on device; to a GPU through pinned memory, with a
    copy the host does not wait for."""
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Blocks:
    """The masked-LM samples of a split of a token store (store.Tokens): sample i is ids
    [i * bptt, (i + 1) * bptt), the original's contiguous blocks (the ids after the last
    whole block are not used). blocks[rows] reads those samples from the store: a
    (len(rows), bptt) long tensor on `device`.

    ids: a b c d e f g h ...  ->  sample 0 = [a b c], sample 1 = [d e f] (bptt 3)
    """

    device = torch.device("cpu")  # where Batches puts the rows to read

    def __init__(self, tokens, bptt, device):
        self.tokens, self.bptt, self.target = tokens, bptt, device

    def __len__(self):
        return len(self.tokens) // self.bptt

    def __getitem__(self, rows):
        return to_device(self.tokens.read(rows.numpy() * self.bptt, self.bptt), self.target)


# --------------------------------------------------------------------------- next sentence

def pack_pair(a, b, bptt, out_ids, out_types, roles=BASIC_ROLES):
    """Write <cls> a <sep> b <sep>, cut to bptt+1 tokens, into out_ids / out_types (rows
    pre-filled with <pad> / 1); token type 0 for <cls>, A and the first <sep>."""
    seq = np.concatenate([[roles.cls], a, [roles.sep], b, [roles.sep]])[:bptt + 1]
    out_ids[:len(seq)] = seq
    out_types[:min(len(a) + 2, bptt + 1)] = 0


class Pairs:
    """Next-sentence examples of a split of a token store (store.Tokens), each made when
    it is read.

    The n lines with at least max(2, min_sentence_len) tokens make n pairs. Pair i of a
    draw (key: e.g. a seed and an epoch) is line i cut at a point drawn for i into (A, B).
    For floor(n * frac_ns) of the pairs, those a permutation of the draw puts first, B is
    replaced by the A of pair (i + k) mod n, k drawn for i in [1, n-1] (never its own), and
    the label is 0 (not next); otherwise 1. Every draw is a function of (key, i) alone, so
    a batch is made from its own lines, the same for any number of ranks.

    pairs[rows] -> inputs (N, bptt+1) <cls> A <sep> B <sep> padded or cut, token types
    (N, bptt+1) 0 up to the first <sep> and 1 after, labels (N,): long tensors on device.
    """

    device = torch.device("cpu")  # where Batches puts the rows to read

    def __init__(self, tokens, min_sentence_len, frac_ns, bptt, key, roles=BASIC_ROLES,
                 device=torch.device("cpu")):
        self.tokens, self.bptt, self.roles, self.target = tokens, bptt, roles, device
        self.lines = tokens.lines_with(max(2, min_sentence_len))
        self.n = n = len(self.lines)
        if n < 2:
            raise DataError(f"only {n} lines have at least {min_sentence_len} tokens; "
                            "next-sentence pairs need more (lower --min_sentence_len or use more data)")
        self.negatives = int(n * frac_ns)
        self._draw(key)

    def _draw(self, key):
        self.negative_rank = Shuffle(self.n, *key, NEGATIVE)
        self.cut_key, self.partner_key = draw_key(*key, CUT), draw_key(*key, PARTNER)

    def redraw(self, key):
        """The pairs of the same lines in another draw (the next epoch's)."""
        other = copy.copy(self)
        other._draw(key)
        return other

    def __len__(self):
        return self.n

    def _split_points(self, i):
        """(line start, cut, line end) of pairs i: A = [start, cut), B = [cut, end)."""
        start, end = self.tokens.line_bounds(self.lines[i])
        return start, start + 1 + (uniform(i, self.cut_key) * (end - start - 1)).astype(np.int64), end

    def __getitem__(self, rows):
        i = rows.numpy()
        start, cut, end = self._split_points(i)
        labels = (self.negative_rank(i) >= self.negatives).astype(np.int64)
        partner = (i + 1 + (uniform(i, self.partner_key) * (self.n - 1)).astype(np.int64)) % self.n
        other_start, other_cut, _ = self._split_points(partner)
        b_start = np.where(labels == 1, cut, other_start)
        b_end = np.where(labels == 1, end, other_cut)
        room = self.bptt  # no more of A or B than fits: the pair is cut to bptt + 1 tokens
        a = self.tokens.read_ranges(start, np.minimum(cut, start + room))
        b = self.tokens.read_ranges(b_start, np.minimum(b_end, b_start + room))
        inputs = np.full((len(i), self.bptt + 1), self.roles.pad, dtype=np.int64)
        types = np.ones((len(i), self.bptt + 1), dtype=np.int64)
        for r in range(len(i)):
            pack_pair(a[r], b[r], self.bptt, inputs[r], types[r], self.roles)
        return tuple(to_device(x, self.target) for x in (inputs, types, labels))
