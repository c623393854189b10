"""data.py: the tokenizer, the vocabulary, masking and Batches."""
import numpy as np
import pytest
import torch

import data


# ----------------------------------------------------------------- tokenizer and vocabulary

@pytest.mark.parametrize("text, tokens", [
    ("Hello, World!", ["hello", ",", "world", "!"]),
    ('He said "no"; then: left.', ["he", "said", "no", "then", "left", "."]),
    ("It's 1 @,@ 200 m (long)?", ["it", "'", "s", "1", "@", ",", "@", "200", "m", "(", "long", ")", "?"]),
    ("a<br />b", ["a", "b"]),
    ("Über  Straße\tÉcole", ["über", "straße", "école"]),
])
def test_basic_english(text, tokens):
    assert data.basic_english(text) == tokens
    assert data.Tokenizer()(text) == tokens


@pytest.mark.parametrize("text", [
    'The "Eiffel" Tower, built in 1889; is 330 m tall.',
    "say \"a\"b c's: İstanbul and ΟΔΟΣ go",
    "repeated word word word . . .",
])
def test_spans_recover_each_token(text):
    tokens, spans = data.Tokenizer().tokenize_with_spans(text)
    assert len(tokens) == len(spans)
    last = 0
    for tok, (s, e) in zip(tokens, spans):
        assert s >= last
        assert text[s:e].lower().replace('"', "") == tok
        last = e


def test_align_finds_a_token_at_or_after_pos_only():
    assert data._align('say ab"c ab', "abc", 0) == (4, 8)  # a removed '"' inside the token
    assert data._align("abc ab", "ab", 1) == (4, 6)
    assert data._align("abc a", "a", 5) == (-1, -1)  # not the text's last 'a', before pos
    assert data._align("abc", "abd", 0) == (-1, -1)


def test_vocab_order_and_round_trip(tmp_path):
    vocab = data.Vocab.build([["b", "a", "c", "a"], ["c", "d", "<unk>"]])
    assert vocab.itos == data.SPECIALS + ["a", "c", "b", "d"]
    assert vocab["a"] == 5 and vocab["never-seen"] == data.UNK and vocab["<cls>"] == data.CLS
    path = tmp_path / "vocab.txt"
    path.write_text(vocab.to_text())
    loaded = data.Vocab.load(path)
    assert loaded.itos == vocab.itos and loaded.fingerprint == vocab.fingerprint
    assert path.read_text().splitlines()[:3] == [data.VOCAB_HEADER, "<unk>", "<pad>"]


@pytest.mark.parametrize("content", [
    "not a vocabulary\n", data.VOCAB_HEADER + "\n", data.VOCAB_HEADER + "\n<unk>\n<pad>\n",
    data.VOCAB_HEADER + "\n" + "\n".join(data.SPECIALS + ["a", "a"]) + "\n",
    data.VOCAB_HEADER + "\n" + "\n".join(data.SPECIALS + ["", "b"]) + "\n",
])
def test_corrupt_vocab_is_refused(tmp_path, content):
    path = tmp_path / "vocab.txt"
    path.write_text(content)
    with pytest.raises(data.DataError, match=str(path)):
        data.Vocab.load(path)


def test_binary_vocab_is_refused(tmp_path):
    path = tmp_path / "vocab.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(data.DataError):
        data.Vocab.load(path)


# ----------------------------------------------------------------- readers


# ----------------------------------------------------------------- masking

def _batch(n=64, s=129, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = data.add_cls(torch.randint(len(data.SPECIALS), vocab, (n, s - 1), generator=g))
    tokens[:, -7:] = data.PAD  # padding at the end of every row
    tokens[:, 40] = data.SEP
    return tokens


def test_masking_rate_and_never_specials():
    g = torch.Generator().manual_seed(1)
    rates = []
    for i in range(30):
        tokens = _batch(seed=i)
        inputs, masked, targets = data.mask_tokens(tokens, 0.15, 1000, "mask", g)
        maskable = tokens >= len(data.SPECIALS)
        assert not masked[~maskable].any()
        assert torch.equal(targets, tokens[masked])
        assert torch.all(inputs[masked] == data.MASK) and torch.equal(inputs[~masked], tokens[~masked])
        rates.append(masked.sum().item() / maskable.sum().item())
        # positions differ between the rows of one batch (the original masked the same columns)
        assert not torch.equal(masked[0], masked[1])
    assert abs(np.mean(rates) - 0.15) < 0.005


def test_bert_mode_80_10_10():
    g = torch.Generator().manual_seed(2)
    counts = np.zeros(3)
    for i in range(30):
        tokens = _batch(seed=i)
        inputs, masked, targets = data.mask_tokens(tokens, 0.15, 1000, "bert", g)
        got = inputs[masked]
        is_mask = got == data.MASK
        kept = got == targets
        counts += [is_mask.sum().item(), (~is_mask & ~kept).sum().item(), kept.sum().item()]
        assert torch.all(got >= data.MASK) and not torch.isin(got, torch.tensor([data.CLS, data.SEP, data.PAD])).any()
    shares = counts / counts.sum()
    # random replacements land on the original word 1/995 of the time: within tolerance
    assert abs(shares[0] - 0.8) < 0.01 and abs(shares[1] - 0.1) < 0.01 and abs(shares[2] - 0.1) < 0.01


def test_per_sequence_masking_counts_positions_and_specials():
    g = torch.Generator().manual_seed(3)
    tokens = _batch()  # 129 tokens a row, 7 padding, <cls> and one <sep>: 120 maskable
    maskable = tokens >= len(data.SPECIALS)
    p = data.predictions_per_sequence(129, 0.15)
    assert p == 19 and data.predictions_per_sequence(129, 0.15, cap=12) == 12
    hits = torch.zeros(tokens.shape)
    for _ in range(200):
        inputs, index, valid, targets = data.mask_per_sequence(tokens, 0.15, 1000, "mask", g)
        assert index.shape == valid.shape == targets.shape == (64, p)
        assert valid.all()  # every row has more than p maskable tokens
        assert torch.all(index[:, 1:] > index[:, :-1])  # distinct, ascending
        assert maskable.gather(1, index).all()  # never <cls>, <sep>, <pad>
        assert torch.equal(targets, tokens.gather(1, index))
        masked = torch.zeros_like(maskable).scatter_(1, index, True)
        assert torch.all(inputs[masked] == data.MASK) and torch.equal(inputs[~masked], tokens[~masked])
        hits += masked
    # uniform over the maskable positions: each is chosen p/120 of the time
    assert abs((hits[maskable] / 200).mean().item() - p / 120) < 1e-6
    # no position is favoured: per column (12,800 draws each) within 6 standard deviations
    columns = hits.sum(0)[maskable[0]] / (64 * 200)
    assert (columns - p / 120).abs().max().item() < 6 * (p / 120 * (1 - p / 120) / 12800) ** 0.5
    # capped, and in BERT's 80/10/10 mode
    inputs, index, valid, targets = data.mask_per_sequence(tokens, 0.15, 1000, "bert", g, cap=12)
    assert index.shape == (64, 12)
    got = inputs.gather(1, index)
    assert (got == data.MASK).float().mean() > 0.7 and (got == targets).float().mean() > 0.05


def test_per_sequence_masking_short_rows_and_no_device_reads():
    tokens = data.add_cls(torch.full((3, 19), 9))
    tokens[1, 4:] = data.PAD  # 3 maskable tokens: fewer than the 3 = round(0.15 * 20) slots?
    tokens[2, 1:] = data.PAD  # none at all
    inputs, index, valid, targets = data.mask_per_sequence(tokens, 0.15, 10, "mask")
    assert valid.sum(1).tolist() == [3, 3, 0]
    tokens[1, 3] = data.PAD  # now 2 maskable tokens, 3 slots: both masked, one slot not valid
    inputs, index, valid, targets = data.mask_per_sequence(tokens, 0.15, 10, "mask")
    assert valid.sum(1).tolist() == [3, 2, 0]
    assert torch.all(inputs[1, 1:3] == data.MASK)
    assert not (inputs[2] == data.MASK).any()
    # the shapes come from the input's shape alone: the same for any draw
    shapes = {tuple(data.mask_per_sequence(tokens, 0.15, 10, "bert")[1].shape) for _ in range(20)}
    assert shapes == {(3, 3)}


def test_at_least_one_position_is_masked():
    tokens = data.add_cls(torch.full((1, 3), 7))
    _, masked, targets = data.mask_tokens(tokens, 1e-9, 10, "mask")
    assert masked.sum() == 1 and targets.tolist() == [7]


def _pieces(seed=0, n=64, s=64, vocab=40):
    """Rows of WordPiece-like ids: ids 30 and up continue a word (## pieces)."""
    g = torch.Generator().manual_seed(seed)
    tokens = data.add_cls(torch.randint(len(data.SPECIALS), vocab, (n, s - 1), generator=g))
    tokens[:, -3:] = data.PAD
    continues = torch.arange(vocab) >= 30
    continues[:len(data.SPECIALS)] = False
    return tokens, continues


def _words(tokens, continues):
    """Each row's words as lists of positions, by a plain loop."""
    rows = []
    for row in tokens.tolist():
        words = []
        for i, t in enumerate(row):
            if continues[t] and words:
                words[-1].append(i)
            else:
                words.append([i])
        rows.append(words)
    return rows


def test_word_starts_point_at_the_first_piece():
    tokens, continues = _pieces()
    starts = data.word_starts(tokens, continues)
    for r, words in enumerate(_words(tokens, continues)):
        for w in words:
            assert starts[r, w].tolist() == [w[0]] * len(w)
    assert torch.equal(data.word_starts(tokens, None), torch.arange(64).expand(64, 64))


def test_whole_word_masking_masks_every_piece_of_a_word_or_none():
    g = torch.Generator().manual_seed(4)
    rates = []
    for i in range(20):
        tokens, continues = _pieces(seed=i)
        maskable = tokens >= len(data.SPECIALS)
        inputs, masked, targets = data.mask_tokens(tokens, 0.15, 40, "whole-word", g,
                                                   continues=continues)
        assert not masked[~maskable].any() and torch.equal(targets, tokens[masked])
        words = [w for row in _words(tokens, continues) for w in row]
        for r, row in enumerate(_words(tokens, continues)):
            for w in row:
                got = {bool(masked[r, i]) for i in w if maskable[r, i]}
                assert len(got) <= 1  # all or nothing
        rates.append(masked.sum().item() / maskable.sum().item())
        # corrupted as BERT's: mostly <MASK>, some random words, some kept
        assert 0.7 < (inputs[masked] == data.MASK).float().mean() < 0.9
    # words are masked at the rate; pieces follow their word, so the token rate is near it
    assert abs(np.mean(rates) - 0.15) < 0.02 and len(words) < 64 * 61
    # the word vocabulary: every token is a word, so it is 'bert' with the same draws
    tokens = _batch()
    a = data.mask_tokens(tokens, 0.15, 1000, "whole-word", torch.Generator().manual_seed(5))
    b = data.mask_tokens(tokens, 0.15, 1000, "bert", torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_whole_word_masking_per_sequence_fills_the_slots_with_whole_words():
    g = torch.Generator().manual_seed(6)
    for i in range(20):
        tokens, continues = _pieces(seed=i)
        maskable = tokens >= len(data.SPECIALS)
        p = data.predictions_per_sequence(64, 0.15)
        inputs, index, valid, targets = data.mask_per_sequence(tokens, 0.15, 40, "whole-word", g,
                                                               continues=continues)
        assert index.shape == valid.shape == targets.shape == (64, p)
        assert torch.all(index[:, 1:] > index[:, :-1]) and torch.equal(targets, tokens.gather(1, index))
        assert maskable.gather(1, index)[valid].all()
        masked = torch.zeros_like(maskable).scatter_(1, index, valid)
        assert torch.equal(inputs[~masked], tokens[~masked])
        for r, row in enumerate(_words(tokens, continues)):
            sizes = []
            for w in row:
                got = {bool(masked[r, i]) for i in w if maskable[r, i]}
                assert len(got) <= 1  # all or nothing
                if got == {True}:
                    sizes.append(sum(bool(maskable[r, i]) for i in w))
            # whole words while they fit in the P slots, at least one
            assert sizes and sum(sizes) <= p and valid[r].sum().item() == sum(sizes)
    # the word vocabulary: exactly P per row, as 'bert' with the same draws
    tokens = _batch()
    a = data.mask_per_sequence(tokens, 0.15, 1000, "whole-word", torch.Generator().manual_seed(7))
    b = data.mask_per_sequence(tokens, 0.15, 1000, "bert", torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[2].all() and a[1].shape == (64, 19)
