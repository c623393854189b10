"""store.py: the token store, built once with every core, read back, rebuilt when wrong;
and corpus.py's vocabulary counting, which shares its workers."""
import json
import os
import socket

import numpy as np
import pytest

import corpus
import data
import dist
import store
import utils
from conftest import id_store, id_vocab, write_wikitext


def _stores(tmp_path, wikitext, cache="cache", tokenizer=None, vocab=None):
    sources = corpus.corpus_sources("WikiText2", wikitext)
    tokenizer = tokenizer or data.Tokenizer()
    vocab = vocab or data.Vocab.from_counts(corpus.count_vocab("WikiText2", sources, tokenizer))
    return corpus.load_corpus("WikiText2", sources, vocab, tokenizer, tmp_path / cache,
                              dist.Context()), vocab


def test_lines_at_once_are_the_tokenizer_line_by_line(tmp_path):
    lines = ['The "Eiffel" Tower, built in 1889; is 330 m tall.\n', "\n", "a<br />b (c)!\n",
             "ÜBER  Straße\tÉcole: İstanbul\n", "It's 1 @,@ 200 m?", " x . y \n",
             'a<br" />b<br/>c <BR />d <br />.<br />', "'quoted'; (a:b) !? \x0b\u2028 z\n"]
    tok = data.Tokenizer()
    assert tok.tokenize_lines(lines) == [data.basic_english(line) for line in lines]
    assert tok.tokenize_lines(["a\nb", "c"]) == [["a", "b"], ["c"]]  # a newline inside a line
    vocab = data.Vocab.build(data.basic_english(line) for line in lines[:4])
    ids, lengths = corpus.line_encoder("WikiText2", tok, vocab)(lines + ["a\x00b\n"])
    assert lengths.tolist() == [len(data.basic_english(line)) for line in lines + ["a\x00b"]]
    assert ids.tolist() == vocab.lookup_indices(sum((data.basic_english(x) for x in lines + ["a\x00b"]), []))


def test_the_store_holds_every_line_as_ids(tmp_path, wikitext, capsys):
    splits, vocab = _stores(tmp_path, wikitext)
    tok = data.Tokenizer()
    lines = list(corpus.read_lines([wikitext / "wiki.valid.tokens"]))
    valid = splits["valid"]
    assert valid.num_lines == len(lines) and len(valid) == sum(len(tok(x)) for x in lines)
    starts, ends = valid.line_bounds(np.arange(len(lines)))
    for i in (0, 3, len(lines) - 1):
        assert valid.read_ranges([starts[i]], [ends[i]])[0].tolist() == vocab.lookup_indices(tok(lines[i]))
    assert valid.read(np.array([0, 5]), 3).tolist() == [
        valid.read_ranges([0], [3])[0].tolist(), valid.read_ranges([5], [8])[0].tolist()]
    folders = sorted((tmp_path / "cache").iterdir())
    assert len(folders) == 3 and capsys.readouterr().out.count("built from WikiText2") == 3
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    assert manifest["format"] == store.FORMAT and manifest["version"] == store.VERSION
    assert manifest["dtype"] == "uint16" and manifest["vocab_fingerprint"] == vocab.fingerprint
    assert (folders[0] / "tokens.bin").stat().st_size == 2 * manifest["tokens"]


def test_a_second_run_reads_the_store_without_tokenizing(tmp_path, wikitext, monkeypatch, capsys):
    first, vocab = _stores(tmp_path, wikitext)
    capsys.readouterr()
    monkeypatch.setattr(data.Tokenizer, "tokenize_lines", lambda self, lines: 1 / 0)
    again, _ = _stores(tmp_path, wikitext, vocab=vocab)
    assert capsys.readouterr().out == ""
    for split in corpus.SPLITS:
        assert again[split].read(np.array([0]), len(again[split])).tolist() == \
               first[split].read(np.array([0]), len(first[split])).tolist()


def test_every_core_builds_the_same_store_and_counts(tmp_path, monkeypatch):
    """Pieces tokenized by two processes and joined in order give what one process gives,
    for the store and for the vocabulary's counts."""
    monkeypatch.setattr(store, "CHUNK_CHARS", 2000)  # many pieces of a small corpus
    wt = write_wikitext(tmp_path / "wt", (600, 10, 10))
    sources = corpus.corpus_sources("WikiText2", wt)
    tok = data.Tokenizer()
    counts = [corpus.count_vocab("WikiText2", sources, tok, workers=w) for w in (1, 2)]
    assert counts[0] == counts[1]
    vocab = data.Vocab.from_counts(counts[0])
    assert vocab.itos == data.Vocab.build(tok(x) for x in corpus.read_lines([wt / "wiki.train.tokens"])).itos
    built = []
    for w in (1, 2):
        source = store.Source("WikiText2", [wt / "wiki.train.tokens"], corpus.read_lines,
                              corpus.line_encoder("WikiText2", tok, vocab), tok.name, vocab)
        built.append(store.build(source, tmp_path / f"s{w}", workers=w, show=False))
    for name in ("tokens.bin", "lines.idx"):
        assert (tmp_path / "s1" / name).read_bytes() == (tmp_path / "s2" / name).read_bytes()
    assert built[1].num_lines == 600


def test_a_large_vocabulary_takes_32_bit_ids(tmp_path):
    tokens = id_store(tmp_path, [[1, 70_000, 65_535]], vocab_size=80_000)
    assert tokens.store.dtype == np.uint32 and tokens.read(np.array([0]), 3).tolist() == [[1, 70_000, 65_535]]
    assert id_store(tmp_path / "small", [[1, 65_535]], vocab_size=1 << 16).store.dtype == np.uint16


def _files(folder):
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("damage, why", [
    (lambda f: f.joinpath("tokens.bin").write_bytes(f.joinpath("tokens.bin").read_bytes()[:-6]),
     "tokens.bin holds"),
    (lambda f: f.joinpath("lines.idx").unlink(), "lines.idx holds 0 bytes"),
    (lambda f: f.joinpath("manifest.json").write_text("{not json"), "manifest.json is unreadable"),
    (lambda f: _edit(f, version=0), "format version 0, this code writes 1"),
    (lambda f: _edit(f, vocab_fingerprint="other"), "another vocabulary"),
    (lambda f: _edit(f, tokens="many"), "manifest.json is incomplete"),
    (lambda f: _edit(f, dtype="float64"), "manifest.json is incomplete"),
    (lambda f: f.joinpath("lines.idx").write_bytes(b"\1" * f.joinpath("lines.idx").stat().st_size),
     "lines.idx is damaged"),
])
def test_a_wrong_store_is_rebuilt_saying_why(tmp_path, wikitext, capsys, damage, why):
    first, vocab = _stores(tmp_path, wikitext)
    folder = first["valid"].store.folder
    damage(folder)
    capsys.readouterr()
    again, _ = _stores(tmp_path, wikitext, vocab=vocab)
    out = capsys.readouterr().out
    assert f"| token store {folder}: " in out and why in out and "rebuilding it" in out
    assert out.count("built from") == 1  # that store alone
    assert again["valid"].read(np.array([0]), 5).tolist() == first["valid"].read(np.array([0]), 5).tolist()


def _edit(folder, **fields):
    path = folder / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_a_changed_source_or_vocabulary_is_rebuilt(tmp_path, wikitext, capsys):
    first, vocab = _stores(tmp_path, wikitext)
    with open(wikitext / "wiki.test.tokens", "a") as f:
        f.write(" the cat sat \n")
    capsys.readouterr()
    again, _ = _stores(tmp_path, wikitext, vocab=vocab)
    out = capsys.readouterr().out
    assert "source files changed since" in out and out.count("built from") == 1
    assert again["test"].num_lines == first["test"].num_lines + 1
    other = data.Vocab(vocab.itos[:-1])
    _stores(tmp_path, wikitext, vocab=other)
    assert capsys.readouterr().out.count("made with another vocabulary") == 3


def test_a_store_of_a_newer_format_is_refused(tmp_path, wikitext):
    first, vocab = _stores(tmp_path, wikitext)
    _edit(first["train"].store.folder, version=store.VERSION + 1)
    with pytest.raises(utils.UserError, match=r"manifest.json is a token store's manifest of format "
                                              r"version 2, newer than the versions this code reads \(1\)"):
        _stores(tmp_path, wikitext, vocab=vocab)


def test_an_interrupted_build_leaves_nothing_to_trust(tmp_path, monkeypatch):
    vocab = id_vocab()
    text = tmp_path / "ids.txt"
    text.write_text("1 2 3\n" * 5000)
    folder = tmp_path / "cache" / "store"
    calls, interrupted = [], []

    def encode(lines):
        calls.append(1)
        if len(calls) == 3 and not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt  # Ctrl-C in the middle of the build
        return np.array([int(t) for line in lines for t in line.split()]), np.full(len(lines), 3)
    monkeypatch.setattr(store, "CHUNK_CHARS", 1000)
    source = store.Source("ids", [text], corpus.read_lines, encode, "ids", vocab)
    with pytest.raises(KeyboardInterrupt):
        store.build(source, folder, workers=1, show=False)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
    # a build killed outright leaves its temporary folder; the next build clears it
    dead = tmp_path / "cache" / f".store.{socket.gethostname()}.999999999.tmp"
    dead.mkdir(parents=True)
    (dead / "manifest.json").write_text("{}")
    built = store.build(source, folder, workers=1, show=False)
    assert not dead.exists() and built.num_lines == 5000


def test_a_store_that_cannot_be_written_is_one_line(tmp_path, wikitext):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(utils.UserError, match=r"cannot write the token store .*a_file/WikiText2.*pass "
                                              r"--cache-dir with a writable folder"):
        _stores(tmp_path, wikitext, cache="a_file")


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "CHUNK_CHARS", 100)

    def die(piece):
        os._exit(9)
    with pytest.raises(data.DataError, match="exit code 9"):
        list(store.ordered_map(die, [[str(i)] for i in range(10)], workers=2))


def test_wikitext_marks_for_a_subword_tokenizer_in_pieces():
    """corpus.line_tokenizer reads WikiText's <unk> as the tokenizer's unknown token: here
    checked with basic_english standing in for a subword tokenizer (test_wordpiece.py has
    WordPiece's)."""
    class Sub(data.Tokenizer):
        unk_text = "[UNK]"
    tokenize = corpus.line_tokenizer("WikiText2", Sub())
    assert tokenize([" a <unk> b 1 @,@ 200 <unk>\n", "<unk>\n", "c\n"]) == [
        ["a", "[UNK]", "b", "1", ",", "200", "[UNK]"], ["[UNK]"], ["c"]]
    words = data.Tokenizer()  # a word tokenizer reads the lines as they are
    assert corpus.line_tokenizer("WikiText2", words)([" a <unk> b\n"]) == [["a", "<unk>", "b"]]
