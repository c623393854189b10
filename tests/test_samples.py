"""samples.py: the order of an epoch, masked-LM blocks and next-sentence pairs read from a
token store, and data.Batches serving them."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import samples
from conftest import id_store
from model import BertModel, NextSentenceTask


# ----------------------------------------------------------------- order

@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_shuffle_is_a_permutation_per_key(n):
    shuffle = samples.Shuffle(n, 5, 1, samples.ORDER)
    order = shuffle(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(shuffle(np.arange(n)[::-1]), order[::-1])  # any positions, any order
    if n >= 64:
        assert not np.array_equal(order, np.arange(n))
        other = samples.Shuffle(n, 5, 2, samples.ORDER)(np.arange(n))  # next epoch
        assert (other != order).mean() > 0.9
        assert np.array_equal(samples.Shuffle(n, 5, 1, samples.ORDER)(np.arange(n)), order)


def test_shuffle_moves_samples_anywhere():
    """Where the first 100 of 10,000 samples land is spread over the whole epoch."""
    order = samples.Shuffle(10_000, 0, 1, samples.ORDER)(np.arange(10_000))
    where = np.argsort(order)[:100]
    assert np.histogram(where, bins=4, range=(0, 10_000))[0].min() >= 10


def test_uniform_draws():
    u = samples.uniform(np.arange(100_000), samples.draw_key(1, 2))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 9_000
    assert np.array_equal(samples.uniform([7, 3], samples.draw_key(1, 2)), u[[7, 3]])


# ----------------------------------------------------------------- masked-LM blocks

def test_blocks_are_contiguous_and_served_in_any_order(tmp_path):
    tokens = id_store(tmp_path, [range(i * 10, i * 10 + 10) for i in range(10)])  # ids 0..99
    blocks = samples.Blocks(tokens, 4, torch.device("cpu"))
    assert len(blocks) == 25
    assert blocks[torch.tensor([1, 24])].tolist() == [[4, 5, 6, 7], [96, 97, 98, 99]]
    assert blocks[torch.tensor([3])].dtype == torch.long
    order = samples.Shuffle(25, 0, 1, samples.ORDER)
    served = list(data.Batches(blocks, batch_size=6, drop_last=True, order=order))
    assert len(served) == 4 and all(b.shape == (6, 4) for b in served)
    firsts = torch.cat(served)[:, 0] // 4
    assert firsts.tolist() == order(np.arange(24)).tolist()


def test_batches_start_where_asked_and_shard_the_same_global_batches():
    rows = torch.arange(40)
    order = samples.Shuffle(40, 3, 1, samples.ORDER)
    whole = [b.tolist() for (b,) in data.Batches(rows, batch_size=8, order=order, drop_last=True)]
    assert sorted(sum(whole, [])) == list(range(40))
    later = data.Batches(rows, batch_size=8, order=order, drop_last=True, start=3)
    assert [b.tolist() for (b,) in later] == whole[3:]
    for world in (2, 4):
        per_rank = [[b for (b,) in data.Batches(rows, batch_size=8 // world, order=order, rank=r,
                                                world=world, drop_last=True, start=1)]
                    for r in range(world)]
        assert [torch.cat(parts).tolist() for parts in zip(*per_rank)] == whole[1:]
    many = torch.arange(2000)  # 250 batches: more than Batches asks the order for at once
    order = samples.Shuffle(2000, 3, 2, samples.ORDER)
    for start in (0, 70):
        served = torch.cat([b for (b,) in data.Batches(many, batch_size=8, order=order, start=start)])
        assert served.tolist() == order(np.arange(start * 8, 2000)).tolist()


# ----------------------------------------------------------------- next-sentence pairs

def _lines(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(len(data.SPECIALS), 500, size=n) for n in lengths]


def test_pairs_labels_types_and_separators(tmp_path):
    lines = _lines([30] * 2000)
    pairs = samples.Pairs(id_store(tmp_path, lines), 10, 0.3, 64, (0, 1))
    inputs, types, labels = pairs[torch.arange(2000)]
    assert inputs.shape == types.shape == (2000, 65) and labels.shape == (2000,)
    assert (labels == 0).sum() == 600  # exactly frac_ns of the pairs
    assert torch.all(inputs[:, 0] == data.CLS)
    for i, (row, tt, label) in enumerate(zip(inputs[:50], types[:50], labels[:50])):
        seps = (row == data.SEP).nonzero().flatten().tolist()
        assert len(seps) == 2
        if label:
            assert seps[1] == 32  # cls + the 30 tokens of the line + 2 seps, padded after
        assert torch.all(row[seps[1] + 1:] == data.PAD)
        assert torch.all(tt[:seps[0] + 1] == 0) and torch.all(tt[seps[0] + 1:] == 1)
        a, b = row[1:seps[0]].tolist(), row[seps[0] + 1:seps[1]].tolist()
        assert 1 <= len(a) <= 29 and a == lines[i][:len(a)].tolist()
        assert (b == lines[i][len(a):].tolist()) == bool(label)


def test_a_pair_is_the_same_whoever_reads_it(tmp_path):
    """Reading pairs in other batches, or another epoch's draw, changes nothing of a draw."""
    pairs = samples.Pairs(id_store(tmp_path, _lines([40] * 300)), 10, 0.5, 48, (7, 1))
    together = pairs[torch.arange(300)]
    apart = [torch.cat(x) for x in zip(pairs[torch.arange(0, 300, 2)], pairs[torch.arange(1, 300, 2)])]
    for whole, parts in zip(together, apart):
        assert torch.equal(whole[0::2], parts[:150]) and torch.equal(whole[1::2], parts[150:])
    assert not torch.equal(pairs.redraw((7, 2))[torch.arange(300)][0], together[0])
    assert torch.equal(pairs.redraw((7, 1))[torch.arange(300)][0], together[0])


def test_negative_b_is_the_a_of_another_pair(tmp_path):
    pairs = samples.Pairs(id_store(tmp_path, _lines([12] * 50)), 2, 1.0, 40, (3, 1))
    inputs, _, labels = pairs[torch.arange(50)]
    assert torch.all(labels == 0)
    starts = {tuple(r[1:(r == data.SEP).nonzero()[0]].tolist()): i for i, r in enumerate(inputs)}
    for i, r in enumerate(inputs):
        seps = (r == data.SEP).nonzero().flatten()
        b = tuple(r[seps[0] + 1:seps[1]].tolist())
        assert starts[b] != i  # B is another pair's A, never its own


def test_min_sentence_len_filter_and_cut(tmp_path):
    tokens = id_store(tmp_path, _lines([5, 80, 59, 60, 200]))
    pairs = samples.Pairs(tokens, 60, 0.0, 32, (0, 1))
    inputs, types, _ = pairs[torch.arange(len(pairs))]
    assert len(inputs) == 3  # the lines of 80, 60 and 200 tokens
    assert inputs.shape[1] == 33 and torch.all(inputs[:, -1] != data.PAD)  # long pairs are cut
    with pytest.raises(data.DataError, match="min_sentence_len"):
        samples.Pairs(tokens, 1000, 0.5, 32, (0, 1))


def test_next_sentence_pairs_are_learnable(tmp_path):
    """Lines drawn from 20 disjoint 'topics': B follows A iff both come from one topic,
    which a small model learns in a few steps (so the pairs, token types and padding
    mask carry the signal)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    lines = [rng.integers(5 + t * 10, 15 + t * 10, size=30) for t in rng.integers(20, size=400)]
    x, types, y = samples.Pairs(id_store(tmp_path, lines), 10, 0.5, 64, (0, 1))[torch.arange(400)]
    model = NextSentenceTask(BertModel(205, 64, 4, 128, 2, 0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(150):
        idx = torch.randint(len(x), (32,))
        loss = F.cross_entropy(model(x[idx], types[idx], key_padding_mask=x[idx] == data.PAD), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model.eval()(x, types, key_padding_mask=x == data.PAD).argmax(1) == y).float().mean()
    assert acc > 0.9
