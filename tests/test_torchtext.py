"""Only where torchtext imports (torch 2.3.x): its tokenizer and vocabulary give the
same tokens and ids as this project's own implementation."""
import pytest

import data
from conftest import SQUAD_PARAGRAPHS, WORDS

pytestmark = pytest.mark.skipif(not data.HAS_TORCHTEXT, reason="torchtext does not import here")

TEXTS = [
    " = Valkyria Chronicles III = \n",
    " The game 's 1 @,@ 200 @-@ page manual ( in Japanese ) sold 3 @.@ 5 million copies ; "
    "\"Senjō no Valkyria\" : <unk> ! Really ? Yes . \n",
    "Ünïcode “curly quotes”, naïve café — İstanbul and ΟΔΟΣ; e.g. U.S.-born <br />line",
    "Specials <unk> <pad> <MASK> <cls> <sep> stay tokens; tabs\tand\nnewlines  collapse.",
    "It's isn't they're 'quoted' \"double\" (paren) [bracket] {brace} 50% $3.50 #1 a/b c-d",
] + [context for context, _ in SQUAD_PARAGRAPHS]


def test_tokenizers_agree():
    from torchtext.data.utils import get_tokenizer
    tt = get_tokenizer("basic_english")
    for text in TEXTS:
        assert data.basic_english(text) == tt(text)
        assert data.Tokenizer("builtin")(text) == data.Tokenizer("torchtext")(text) == tt(text)


def test_vocabularies_agree():
    corpus = [data.basic_english(t) for t in TEXTS] + [WORDS * 3, ["b", "a", "c", "a"]]
    built = data.Vocab.build(corpus, backend="builtin")
    tt = data.Vocab.build(corpus, backend="torchtext")
    assert built.itos == tt.itos and built.fingerprint == tt.fingerprint
    tokens = [tok for line in corpus for tok in line] + ["never-seen", "<cls>", "<sep>"]
    assert built.lookup_indices(tokens) == tt.lookup_indices(tokens)
    assert tt.lookup_indices(["never-seen"]) == [data.UNK]


def test_squad_paragraph_ids_agree():
    context, _ = SQUAD_PARAGRAPHS[1]
    corpus = [data.basic_english(context)]
    for backend in ("builtin", "torchtext"):
        tok, vocab = data.Tokenizer(backend), data.Vocab.build(corpus, backend=backend)
        tokens, spans = tok.tokenize_with_spans(context)
        ids = vocab.lookup_indices(tokens)
        if backend == "builtin":
            expected = (ids, spans)
        assert (ids, spans) == expected


def test_wordpiece_ids_agree(tmp_path):
    """torchtext's BERTTokenizer and the tokenizers library give the same WordPiece ids on
    WikiText and SQuAD text, uncased and cased."""
    pytest.importorskip("tokenizers")
    import wordpiece
    lines = TEXTS * 3 + [" ".join(WORDS)] * 3
    for lower in (True, False):
        itos = wordpiece.train_vocab(lines, 300, lower_case=lower)
        path = tmp_path / f"vocab_{lower}.txt"
        path.write_text("\n".join(itos) + "\n", encoding="utf-8")
        vocab = wordpiece.load_vocab(path, lower)
        ours = wordpiece.WordPiece(path, lower, backend="builtin")
        theirs = wordpiece.WordPiece(path, lower, backend="torchtext")
        for text in TEXTS:
            assert vocab.lookup_indices(ours(text)) == vocab.lookup_indices(theirs(text)), text
            assert any("##" in t for t in ours(text)) or len(ours(text)) < 3
