import json
import math
import re
import types

import numpy as np
import pytest
import torch

import data
import checkpoint
import monitor
import cloze
import squad
from conftest import SQUAD_PARAGRAPHS, TINY, run_script, write_squad, write_wikitext


# ----------------------------------------------------------------- SQuAD

def test_squad_reader_maps_answers_to_tokens_exactly(tmp_path):
    paras = squad.read_squad(write_squad(tmp_path / "s.json"))
    vocab = data.Vocab.build(data.basic_english(p[0]) for p in SQUAD_PARAGRAPHS)
    examples, f = squad.squad_features(paras, data.Tokenizer(), vocab, 64)
    assert len(examples) == 9 == len(f.start)
    for i, ex in enumerate(examples):
        (s, e), = ex["gold"]
        assert ex["context"][ex["spans"][s][0]:ex["spans"][e][1]] == ex["answers"][0]
        c = int(f.ctx_start[i])
        assert int(f.start[i]) == s + c and int(f.end[i]) == e + c
        ids = f.input_ids[i]
        assert ids[0] == data.CLS and ids[c - 1] == data.SEP and f.token_types[i, c - 1] == 0
        assert f.token_types[i, c] == 1
        assert ids[s + c:e + c + 1].tolist() == vocab.lookup_indices(data.basic_english(ex["answers"][0]))


def test_answer_token_span_inside_words_and_unicode():
    text = "Ünïcode “quotes” and İstanbul, 20–18 score."
    tokens, spans = data.Tokenizer().tokenize_with_spans(text)
    start = text.index("İstanbul")
    s, e = squad.answer_token_span(spans, start, start + len("İstanbul"))
    assert text[spans[s][0]:spans[e][1]] == "İstanbul"
    start = text.index("18")  # inside the token '20–18': the covering token is taken
    s, e = squad.answer_token_span(spans, start, start + 2)
    assert text[spans[s][0]:spans[e][1]] == "20–18"


@pytest.mark.parametrize("content, match", [
    ("{not json", "cannot read SQuAD file"),
    ('{"data": [{"paragraphs": [{"qas": []}]}]}', "not in the SQuAD v1.1 format"),
    ('{"data": []}', "holds no SQuAD paragraphs"),
    ('{"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "v2", "question": "q?", '
     '"answers": [], "is_impossible": true}]}]}]}', "question v2 has no answer"),
    ('{"data": [{"paragraphs": [{"context": "abc def", "qas": [{"id": "x", "question": "q?", '
     '"answers": [{"text": "def", "answer_start": 0}]}]}]}]}', "question x: answer 'def' is not at"),
])
def test_malformed_squad_is_refused(tmp_path, content, match):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(data.DataError, match=match):
        squad.read_squad(tmp_path / "bad.json")


def test_doc_stride_windows_reach_late_answers(tmp_path):
    context = " ".join(f"w{i}" for i in range(60)) + " answer here " + " ".join(
        f"w{i}" for i in range(60, 100)) + " ."  # the answer is tokens 60-61 of 103
    path = tmp_path / "long.json"
    write_squad(path, [(context, [("where is it?", "answer here")])])
    paras = squad.read_squad(path)
    vocab = data.Vocab.build([data.basic_english(context)])
    tok = data.Tokenizer()
    _, one = squad.squad_features(paras, tok, vocab, 32)
    assert len(one.start) == 1 and one.start[0] == -1  # cut off: unreachable
    _, train = squad.squad_features(paras, tok, vocab, 32, training=True)
    assert len(train.start) == 0  # left out of training, as the original did
    ex, f = squad.squad_features(paras, tok, vocab, 32, doc_stride=10)
    budget = 32 - 4 - 3  # bptt - question tokens - <cls> <sep> <sep>
    assert f.window.tolist() == list(range(0, 103 - budget + 10, 10))[:len(f.window)]
    assert int(f.window[-1]) + int(f.window_len[-1]) == 103  # the end is covered
    inside = (f.start >= 0).nonzero().flatten()
    assert f.window[inside].tolist() == [40, 50, 60]  # overlapping windows all hold it
    for i in inside.tolist():
        pos = int(f.start[i]) - int(f.ctx_start[i]) + int(f.window[i])
        assert ex[0]["context"][ex[0]["spans"][pos][0]:].startswith("answer here")
    _, tr = squad.squad_features(paras, tok, vocab, 32, doc_stride=10, training=True)
    assert len(tr.start) == len(f.start) and (tr.start == 0).sum() == len(f.start) - len(inside)


def test_span_decoding():
    S = 10
    s = torch.full((3, S), -5.0)
    e = torch.full((3, S), -5.0)
    s[0, 6], e[0, 4] = 9.0, 9.0   # best start after best end: must not be chosen as is
    e[0, 7] = 1.0
    s[1, 2], e[1, 9] = 5.0, 5.0   # too long for max_answer_len 4 / 9 is outside the context
    e[1, 4] = 2.0
    s[2, 0], e[2, 0] = 50.0, 50.0  # <cls> is outside the context
    s[2, 5], e[2, 5] = 1.0, 1.0
    ctx_start = torch.tensor([3, 2, 3])
    wlen = torch.tensor([6, 6, 6])
    score, start, end = squad.best_spans(s, e, ctx_start, wlen, 4)
    assert torch.all(start <= end) and torch.all(end - start < 4)
    assert (start.tolist(), end.tolist()) == ([6, 2, 5], [7, 4, 5])
    assert score[0] == 10.0


def test_expected_f1_decoding():
    """Where the start is spread over three words before one sure end, the most probable
    span is the last word alone, but the span of highest expected F1 is the middle one;
    a sure span is its own choice; the limits of best_spans hold."""
    S = 12
    s = torch.full((3, S), -20.0)
    e = torch.full((3, S), -20.0)
    s[0, 3], s[0, 4], s[0, 5], e[0, 5] = 0.0, 0.0, 0.1, 5.0
    s[1, 7], e[1, 8] = 9.0, 9.0
    s[2, 0], e[2, 0] = 50.0, 50.0  # <cls>: outside the context
    s[2, 4], e[2, 10] = 5.0, 5.0  # too long for max_answer_len 4
    e[2, 6] = 1.0
    ctx_start, wlen = torch.tensor([2, 2, 2]), torch.tensor([9, 9, 9])
    _, bs, be = squad.best_spans(s, e, ctx_start, wlen, 4)
    score, start, end = squad.expected_f1_spans(s, e, ctx_start, wlen, 4)
    assert (bs.tolist(), be.tolist()) == ([5, 7, 4], [5, 8, 6])
    assert (start.tolist(), end.tolist()) == ([4, 7, 4], [5, 8, 6])
    assert torch.allclose(score, torch.tensor([5.1, 18.0, 6.0]))  # the best span's score
    # a low temperature leans toward the most probable span
    _, cold_s, cold_e = squad.expected_f1_spans(s, e, ctx_start, wlen, 4, temperature=0.01)
    assert (cold_s.tolist(), cold_e.tolist()) == (bs.tolist(), be.tolist())


def test_shape_feature_marks_what_lower_casing_hides():
    assert [squad.token_shape(t) for t in ("the", "The", "NASA", "1990", "(", "I", "iPhone",
                                           "戦場", "3rd")] == [1, 2, 3, 4, 5, 2, 1, 5, 4]
    para = [dict(context="In 1990 NASA launched the Hubble telescope.",
                 qas=[dict(id="q", question="What did NASA launch in 1990?",
                           answers=[("the Hubble telescope", 25)])])]
    tok = data.Tokenizer()
    vocab = data.Vocab.build([tok(para[0]["context"] + " " + para[0]["qas"][0]["question"])])
    _, plain = squad.squad_features(para, tok, vocab, 48)
    _, shaped = squad.squad_features(para, tok, vocab, 48, shape=True)
    assert torch.equal(plain.input_ids, shaped.input_ids) and torch.equal(plain.start, shaped.start)
    assert torch.equal(shaped.match % 2, plain.match)  # the exact-match bit is kept
    c = int(plain.ctx_start[0])
    #       <cls> what did nasa launch in 1990 ? <sep>
    assert (shaped.match[0, :c] // 2).tolist() == [0, 2, 1, 3, 1, 1, 4, 5, 0]
    #       in 1990 nasa launched the hubble telescope . <sep>
    assert (shaped.match[0, c:c + 9] // 2).tolist() == [2, 4, 3, 1, 1, 2, 1, 5, 0]


def test_span_loss_is_the_cross_entropy_over_the_allowed_spans():
    """--loss span: -log softmax of the answer's span among the spans best_spans may
    choose (an answer longer than max_answer_len counted too), checked span by span; its
    gradient pushes down the spans the start-end loss leaves alone."""
    torch.manual_seed(0)
    S, L = 16, 5
    s, e = torch.randn(4, S, requires_grad=True), torch.randn(4, S, requires_grad=True)
    w = types.SimpleNamespace(start=torch.tensor([3, 5, 6, 4]), end=torch.tensor([4, 5, 15, 4]),
                              ctx_start=torch.tensor([3, 3, 3, 4]),
                              window_len=torch.tensor([12, 12, 13, 10]))
    loss = squad.window_loss(s, e, w, "span", L)
    expected = []
    for i in range(4):
        lo, hi = int(w.ctx_start[i]), int(w.ctx_start[i] + w.window_len[i])
        spans = [(a, b) for a in range(lo, hi) for b in range(a, min(a + L, hi))]
        if (int(w.start[i]), int(w.end[i])) not in spans:  # row 2: 10 tokens long
            spans.append((int(w.start[i]), int(w.end[i])))
        scores = torch.stack([s[i, a] + e[i, b] for a, b in spans])
        expected.append(torch.logsumexp(scores, 0) - s[i, w.start[i]] - e[i, w.end[i]])
    assert torch.allclose(loss, torch.stack(expected).mean())
    assert torch.allclose(squad.window_loss(s, e, w, "span", L, reduction="sum"), loss * 4)
    start_end = squad.window_loss(s, e, w)
    assert torch.allclose(start_end, (torch.nn.functional.cross_entropy(s, w.start)
                                      + torch.nn.functional.cross_entropy(e, w.end)) / 2)
    loss.backward()
    assert s.grad[0, :3].abs().sum() == 0 and s.grad[0, 3:15].abs().sum() > 0  # <cls>, question


# ----------------------------------------------------------------- the pipeline

def test_pipeline_mlm_ns_qa(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (200, 40, 40))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", cwd=tmp_path)
    common = ["--batch_size", "8", "--bptt", "48", "--log-interval", "5", "--epochs", "2"]
    ns = run_script("ns_task.py", "--bert-model", "mlm_bert.pt", "--dataset", "WikiText2",
                    "--data-dir", wt, "--min_sentence_len", "10", *common, cwd=tmp_path)
    assert re.search(r"^\| end of epoch +1 \| time: +[\d.]+s \| valid loss +[\d.]+ \| valid accuracy",
                     ns.stdout, re.M)
    assert re.search(r"^\| End of training \| test loss +[\d.]+ \| test ppl +[\d.]+ \| test accuracy",
                     ns.stdout, re.M)
    assert (tmp_path / "ns_loss.txt").read_text().splitlines()[-1].startswith("test loss")
    vocab = data.Vocab.load(tmp_path / "torchtext_bert_vocab.pt")
    assert checkpoint.load_encoder(tmp_path / "ns_bert.pt", vocab).config["ninp"] == 32
    write_squad(tmp_path / "train.json", copies=5)
    write_squad(tmp_path / "dev.json", prefix="d")
    qa = run_script("qa_task.py", "--bert-model", "ns_bert.pt", "--train-file", "train.json",
                    "--dev-file", "dev.json", *common, cwd=tmp_path)
    assert re.search(r"^\| end of epoch +2 \| time: +[\d.]+s \| valid loss +[\d.]+ \| exact +[\d.]+% \| "
                     r"f1 +[\d.]+%$", qa.stdout, re.M)
    assert re.search(r"^\| original-style token metrics \(\d+ of 9 questions\)", qa.stdout, re.M)
    assert re.search(r"^\| End of training \| dev loss", qa.stdout, re.M)
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert sorted(preds) == sorted(f"d{i}" for i in range(9))
    assert all(isinstance(v, str) for v in preds.values())
    ckpt = checkpoint.load(tmp_path / "qa_model.pt", "qa_task")
    assert "qa_span.weight" in ckpt["model"]
    # choosing on held-out training articles: the dev file is scored once, at the end
    held = run_script("qa_task.py", "--bert-model", "ns_bert.pt", "--train-file", "train.json",
                      "--dev-file", "dev.json", "--holdout-articles", "2", *common,
                      "--save", "held.pt", "--predictions", "held.json", "--loss-log", "held.txt",
                      cwd=tmp_path)
    assert "| train: 27 questions" in held.stdout and "| held-out articles (2): 18 questions" in held.stdout
    records = monitor.read_results(tmp_path / "held.jsonl")
    assert [r["questions"] for r in records if r["record"] == "valid"] == [18, 18]
    assert records[-1]["record"] == "test" and records[-1]["questions"] == 9
    assert re.search(r"^\| End of training \| test loss", held.stdout, re.M)
    assert sorted(json.loads((tmp_path / "held.json").read_text())) == sorted(f"d{i}" for i in range(9))
    for n, match in (("5", "has 5 articles: cannot hold out 5"), ("-1", "must be 0 .off. or positive")):
        bad = run_script("qa_task.py", "--bert-model", "ns_bert.pt", "--train-file", "train.json",
                         "--dev-file", "dev.json", "--holdout-articles", n, *common,
                         "--save", "held.pt", cwd=tmp_path, check=False)
        assert bad.returncode == 2 and re.search(match, bad.stderr) and "Traceback" not in bad.stderr
    # a step fed the wrong file: one clear line, exit 2, nothing overwritten
    before = (tmp_path / "ns_bert.pt").read_bytes()
    bad = run_script("ns_task.py", "--bert-model", "ns_model.pt", "--dataset", "WikiText2",
                     "--data-dir", wt, *common, cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "'ns_task' checkpoint where 'encoder' is expected" in bad.stderr
    assert (tmp_path / "ns_bert.pt").read_bytes() == before
    short = run_script("qa_task.py", "--bert-model", "ns_bert.pt", "--train-file", "train.json",
                       "--dev-file", "dev.json", "--bptt", "8", cwd=tmp_path, check=False)
    assert short.returncode == 2 and "raise --bptt" in short.stderr and "Traceback" not in short.stderr


def test_encoder_of_another_vocabulary_is_refused(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (100, 30, 30))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--dry-run", cwd=tmp_path)
    (tmp_path / "torchtext_bert_vocab.pt").write_text(
        data.VOCAB_HEADER + "\n" + "\n".join(data.SPECIALS + ["other", "words"]) + "\n")
    proc = run_script("ns_task.py", "--dataset", "WikiText2", "--data-dir", wt, cwd=tmp_path,
                      check=False)
    assert proc.returncode == 2 and "another vocabulary" in proc.stderr


def test_freeze_embeddings_keeps_the_word_vectors(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (150, 30, 30))
    key = "bert_embed.embed.weight"
    for epochs in ("2", "1"):  # the same seed, so the same initial vectors; they must not move
        run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", epochs, "--norm-first",
                   "--freeze-embeddings", "--save", f"mlm{epochs}.pt", cwd=tmp_path)
    two = checkpoint.load(tmp_path / "mlm2.pt", "encoder")["model"]
    enc = checkpoint.load(tmp_path / "mlm1.pt", "encoder")["model"]
    assert torch.equal(two[key], enc[key])
    assert not torch.equal(two["layers.0.linear1.weight"], enc["layers.0.linear1.weight"])
    (tmp_path / "mlm1.pt").rename(tmp_path / "mlm_bert.pt")
    write_squad(tmp_path / "train.json", copies=2)
    write_squad(tmp_path / "dev.json", prefix="d")
    common = ["--bert-model", "mlm_bert.pt", "--train-file", "train.json", "--dev-file", "dev.json",
              "--batch_size", "8", "--bptt", "48", "--epochs", "1", "--optimizer", "adamw",
              "--lr", "1e-2", "--match-feature"]
    proc = run_script("qa_task.py", *common, "--freeze-embeddings", cwd=tmp_path)
    assert "--freeze-embeddings: the word embeddings stay as loaded" in proc.stdout
    qa = checkpoint.load(tmp_path / "qa_model.pt", "qa_task")["model"]
    assert torch.equal(qa["bert_model." + key], enc[key])
    assert not torch.equal(qa["bert_model.layers.0.linear1.weight"], enc["layers.0.linear1.weight"])
    assert qa["bert_model.final_norm.weight"].shape == enc["final_norm.weight"].shape  # pre-LN kept
    run_script("qa_task.py", *common, "--save", "moved.pt", cwd=tmp_path)
    moved = checkpoint.load(tmp_path / "moved.pt", "qa_task")["model"]
    assert not torch.equal(moved["bert_model." + key], enc[key])


# ----------------------------------------------------------------- cloze questions

CLOZE_LINES = [
    " = Valkyria Chronicles III = \n",
    " \n",
    " The game began development in 2010 , carrying over a large portion of the work done on "
    "Valkyria Chronicles II . While it retained the standard features of the series , it also "
    "underwent multiple adjustments . The team wrote a role @-@ playing script of 1 @,@ 200 pages . \n",
    " Short line . \n",
]


def test_cloze_questions_hold_their_answers():
    paras = cloze.cloze_questions(CLOZE_LINES, seed=3, max_words=30)
    assert cloze.cloze_questions(CLOZE_LINES, seed=3, max_words=30) == paras  # reproducible
    assert len(paras) == 2  # the heading is skipped; two contexts of whole sentences, <= 30 words
    assert all(len(p["context"].split()) <= 30 for p in paras)
    assert "role-playing" in paras[1]["context"] and "1,200" in paras[1]["context"]
    qas = [qa for p in paras for qa in p["qas"]]
    assert len(qas) == 3  # one per sentence of 8 to 40 words ("Short line ." has none)
    assert len({qa["id"] for qa in qas}) == 3
    for p in paras:
        for qa in p["qas"]:
            (text, start), = qa["answers"]
            assert p["context"][start:start + len(text)] == text
            words = qa["question"].split()
            assert words[0] in ("when", "how", "who", "what") and words[-1] == "?"
            assert text not in " ".join(words[1:])  # the question lacks what it asks for
    kinds = {qa["answers"][0][0]: qa["question"].split()[0] for qa in qas}
    for text, wh in kinds.items():
        if text in ("2010", "1,200"):
            assert wh == {"2010": "when", "1,200": "how"}[text]
    others = cloze.cloze_questions(CLOZE_LINES, seed=4, max_words=30)
    assert [p["context"] for p in others] == [p["context"] for p in paras]


def test_short_cloze_questions_keep_words_beside_the_answer():
    """window (lo, hi): the question is a wh-word and a run of lo to hi words of the
    sentence beside the answer (some dropped), not the whole sentence."""
    lines = CLOZE_LINES * 40
    paras = cloze.cloze_questions(lines, seed=5, max_words=30, drop=0.0, window=(3, 5))
    assert paras == cloze.cloze_questions(lines, seed=5, max_words=30, drop=0.0, window=(3, 5))
    longer = cloze.cloze_questions(lines, seed=5, max_words=30)
    assert [p["context"] for p in paras] == [p["context"] for p in longer]
    sizes = set()
    for p in paras:
        for qa in p["qas"]:
            (text, start), = qa["answers"]
            assert p["context"][start:start + len(text)] == text
            words = qa["question"].split()[:-1]
            words = words[2:] if words[:2] == ["how", "many"] else words[1:]
            sizes.add(len(words))
            # the kept words stand next to the answer: before it, then after it, in order
            before = p["context"][:start].split()
            after = p["context"][start + len(text):].split()
            assert any(before[len(before) - n:] == words[:n] and words[n:] == after[:len(words) - n]
                       for n in range(len(words) + 1))
    assert sizes <= {3, 4, 5} and len(sizes) > 1
    assert max(len(qa["question"].split()) for p in longer for qa in p["qas"]) > 8


def test_joined_contexts_run_across_paragraphs_but_not_headings():
    one = " The first paragraph has exactly nine words in it . \n"
    two = " A second paragraph follows with another nine words here . \n"
    lines = [" = Title = \n", one, " \n", two, " = = Section = = \n", one, two]
    alone = cloze.cloze_questions(lines, max_words=30, drop=0.0)
    joined = cloze.cloze_questions(lines, max_words=30, drop=0.0, join=True)
    assert len(alone) == 4 and len(joined) == 2  # two sections of two paragraphs each
    assert [p["context"] for p in joined] == [" ".join(x["context"] for x in alone[:2]),
                                              " ".join(x["context"] for x in alone[2:])]
    assert len(cloze.cloze_questions(lines, max_words=15, join=True)) == 4  # max_words holds
    for p in joined:
        for qa in p["qas"]:
            (text, start), = qa["answers"]
            assert p["context"][start:start + len(text)] == text


def test_mixed_answers_are_names_phrases_and_words():
    rng = __import__("random").Random(0)
    words = "In 1990 the Royal Navy sent a small fleet of armed ships to the Baltic Sea .".split()
    spans = [cloze._mixed_answer(words, rng) for _ in range(400)]
    texts = {" ".join(words[i:j]) for i, j in spans}
    assert all(0 < i < j <= len(words) - 1 for i, j in spans)  # never the first word or the mark
    named = {"1990", "Royal Navy", "Baltic Sea"}
    assert named <= texts and "the Royal Navy" in texts and "small fleet" in texts
    phrases = [t for t in texts if t not in named and " " in t]
    assert all(t.split()[-1].isalpha() and len(t.split()) <= 5 for t in phrases)
    share = sum(" ".join(words[i:j]) in named for i, j in spans) / len(spans)
    assert 0.3 < share < 0.5  # four in ten
    assert cloze._mixed_answer("and so it was .".split(), rng) is None


@pytest.mark.parametrize("sentence", [
    "In 1990 the Royal Navy sent a small fleet of armed ships to the Baltic Sea .",
    "The band , formed in Leeds , released the album Third Light , an early record .",
    "It was a very long and hard winter for all the people in the northern valleys",
])
def test_phrases_are_every_span_the_definition_allows(sentence):
    words = sentence.split()
    content = [cloze._content(w) for w in words]
    defined = [(k, k + n) for k in range(1, len(words)) for n in range(2, 6)
               if k + n <= len(words) and all(w.isalnum() for w in words[k:k + n])
               and (content[k] or words[k].lower() in ("the", "a", "an")) and content[k + n - 1]]
    assert cloze._phrases(words, content) == defined and defined


def test_question_words_stay_inside_the_sentence():
    rng = __import__("random").Random(0)
    body = "a b c d e f g h".split()
    for i, j in [(0, 1), (7, 8), (3, 5)]:
        for _ in range(50):
            kept = cloze._question_words(body, i, j, (4, 6), rng)
            assert 4 <= len(kept) <= 6 and body[i] not in kept
            assert kept == [w for w in body if w in kept]  # a run, around the answer
    assert cloze._question_words(body, 3, 5, None, rng) == "a b c f g h".split()


def test_cloze_contexts_for_a_subword_tokenizer():
    """With unk (WordPiece's [UNK]), WikiText's <unk> becomes that token in the contexts and
    is left out of the questions; everything else is as with the words' <unk>."""
    lines = [line.replace("Chronicles II", "<unk> II") for line in CLOZE_LINES]
    words, pieces = (cloze.cloze_questions(lines, seed=3, max_words=30, unk=u)
                     for u in ("<unk>", "[UNK]"))
    assert "<unk> II" in words[0]["context"] and "[UNK] II" in pieces[0]["context"]
    for a, b in zip(words, pieces):
        assert a["context"].replace("<unk>", "[UNK]") == b["context"]
        for qa, qb in zip(a["qas"], b["qas"]):
            assert qa["question"] == qb["question"] and "[UNK]" not in qb["question"]
            assert qa["answers"] == qb["answers"]  # the same length: no offset moves


def test_cloze_pretraining_then_squad(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (200, 40, 40))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", cwd=tmp_path)
    common = ["--bert-model", "mlm_bert.pt", "--batch_size", "8", "--bptt", "48", "--epochs", "1",
              "--optimizer", "adamw", "--lr", "1e-3", "--match-feature"]
    cloze = run_script("qa_task.py", *common, "--cloze-dir", wt, "--save", "cloze.pt",
                       "--predictions", "cloze.json", cwd=tmp_path)
    assert re.search(r"^\| --cloze-dir: \d+ questions made from wiki\.train\.tokens, \d+ from "
                     r"wiki\.valid\.tokens$", cloze.stdout, re.M)
    assert re.search(r"^\| End of training \| dev loss .*\n\| original-style token metrics "
                     r"\(\d+ of \d+ questions\)", cloze.stdout, re.M)
    test = monitor.read_results(tmp_path / "qa_loss.jsonl")[-1]
    answers = json.loads((tmp_path / "cloze.json").read_text())
    assert test["record"] == "test" and test["questions"] == len(answers) > 5
    assert all(k.startswith("cloze-") for k in answers)
    write_squad(tmp_path / "train.json", copies=2)
    write_squad(tmp_path / "dev.json", prefix="d")
    qa = run_script("qa_task.py", *common, "--train-file", "train.json", "--dev-file", "dev.json",
                    "--checkpoint", "cloze.pt", cwd=tmp_path)
    assert "| starting from the weights in cloze.pt" in qa.stdout
    before = checkpoint.load(tmp_path / "cloze.pt", "qa_task")["model"]
    after = checkpoint.load(tmp_path / "qa_model.pt", "qa_task")["model"]
    assert set(before) == set(after) and not torch.equal(before["qa_span.weight"],
                                                          after["qa_span.weight"])


def test_fresh_short_cloze_questions_every_epoch(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (200, 40, 40))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", cwd=tmp_path)
    args = ["--bert-model", "mlm_bert.pt", "--batch_size", "8", "--bptt", "48", "--epochs", "3",
            "--optimizer", "adamw", "--lr", "1e-3", "--match-feature", "--cloze-dir", wt,
            "--cloze-style", "short", "--log-interval", "1000"]
    fresh = run_script("qa_task.py", *args, "--cloze-fresh", "--loss-log", "fresh.txt", cwd=tmp_path)
    first = int(re.search(r"(\d+) windows with the answer inside", fresh.stdout).group(1))
    later = re.findall(r"^\| --cloze-fresh: epoch (\d) reads (\d+) other questions \(seed (\d)\), "
                       r"(\d+) windows$", fresh.stdout, re.M)
    assert [(e, s) for e, _, s, _ in later] == [("2", "1"), ("3", "2")]
    assert all(0 < int(n) <= first for *_, n in later)
    same = run_script("qa_task.py", *args, "--loss-log", "same.txt", cwd=tmp_path)
    assert "--cloze-fresh" not in same.stdout
    valid = [[r["loss"] for r in monitor.read_results(tmp_path / f) if r["record"] == "valid"]
             for f in ("fresh.jsonl", "same.jsonl")]
    assert valid[0][0] == valid[1][0] and valid[0][1:] != valid[1][1:]  # epoch 1 is the same
    for flag in (["--cloze-fresh"], ["--cloze-style", "short"]):
        bad = run_script("qa_task.py", "--bert-model", "mlm_bert.pt", *flag, cwd=tmp_path, check=False)
        assert bad.returncode != 0 and f"{flag[0]} is for span-selection pretraining: add --cloze-dir" in bad.stderr


def _tiny_squad_run(tmp_path, copies, epochs):
    """A tiny encoder in tmp_path, SQuAD files of `copies` training articles and one
    evaluation article, and qa_task.py flags that fine-tune it for `epochs`."""
    wt = write_wikitext(tmp_path / "wt", (200, 40, 40))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", cwd=tmp_path)
    write_squad(tmp_path / "train.json", copies=copies)
    write_squad(tmp_path / "dev.json", prefix="d")
    return ["--bert-model", "mlm_bert.pt", "--batch_size", "8", "--bptt", "48", "--epochs",
            str(epochs), "--optimizer", "adamw", "--lr", "1e-3", "--train-file", "train.json",
            "--dev-file", "dev.json", "--doc-stride", "16"]


def test_expected_f1_answers_end_to_end(tmp_path):
    common = _tiny_squad_run(tmp_path, copies=2, epochs=1)
    runs = {}
    for name, extra in (("best", []), ("ef1", ["--decode", "expected-f1"]),
                        ("cold", ["--decode", "expected-f1", "--decode-temperature", "1e-6"]),
                        ("span", ["--loss", "span"])):
        run_script("qa_task.py", *common, *extra, "--predictions", f"{name}.json",
                   "--loss-log", f"{name}.txt", cwd=tmp_path)
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
        record = monitor.read_results(tmp_path / f"{name}.jsonl")[-1]
        assert record["questions"] == len(runs[name]) > 0
    # the same model (same seed): only the choice of span differs; near 0 K it is the best span
    assert runs["cold"] == runs["best"]
    losses = {n: [r["loss"] for r in monitor.read_results(tmp_path / f"{n}.jsonl")]
              for n in ("best", "span")}
    assert all(math.isfinite(x) for x in losses["span"]) and losses["span"] != losses["best"]
    assert all(isinstance(v, str) for v in runs["ef1"].values())
    bad = run_script("qa_task.py", *common, "--decode-temperature", "0.5", cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "--decode-temperature is for --decode expected-f1" in bad.stderr


def test_decode_choose_picks_on_the_held_out_articles(tmp_path):
    common = _tiny_squad_run(tmp_path, copies=3, epochs=2) + ["--holdout-articles", "1"]
    proc = run_script("qa_task.py", *common, "--decode", "choose", "--predictions", "chosen.json",
                      "--loss-log", "chosen.txt", cwd=tmp_path)
    records = monitor.read_results(tmp_path / "chosen.jsonl")
    decoding = next(r for r in records if r["record"] == "decode")
    tried = decoding["tried"]
    assert [(t["decode"], t["temperature"]) for t in tried] == list(squad.DECODINGS)
    assert decoding["f1"] == max(t["f1"] for t in tried)  # the first of the highest
    assert tried.index(next(t for t in tried if t["f1"] == decoding["f1"])) == \
        [(t["decode"], t["temperature"]) for t in tried].index(
            (decoding["decode"], decoding["temperature"]))
    # the held-out scores of the kept model: 'best' is what the epochs were chosen with
    valid = [r for r in records if r["record"] == "valid"]
    assert tried[0]["f1"] == max(r["f1"] for r in valid)
    assert len(re.findall(r"^\| decoding on the held-out articles: ", proc.stdout, re.M)) == 5
    assert "| decoding chosen: " in proc.stdout
    # the evaluation file is scored once, with the chosen decoding, as --predict answers
    # with the flags the run printed
    extra = re.search(r"--predict answers the same with (.*)$", proc.stdout, re.M).group(1)
    extra = [] if "default" in extra else extra.split()
    assert extra == ([] if decoding["decode"] == "best" else
                     ["--decode", "expected-f1", "--decode-temperature", f"{decoding['temperature']:g}"])
    run_script("qa_task.py", "--predict", "--predict-file", "dev.json", "--bptt", "48",
               "--doc-stride", "16", *extra, "--predictions", "given.json", cwd=tmp_path)
    assert json.loads((tmp_path / "chosen.json").read_text()) == \
        json.loads((tmp_path / "given.json").read_text())
    for flags, message in ((["--holdout-articles", "0"], "add --holdout-articles N"),
                           (["--decode-temperature", "0.5"], "--decode choose chooses it")):
        bad = run_script("qa_task.py", *common, "--decode", "choose", *flags, cwd=tmp_path,
                         check=False)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


def test_keep_last_trains_on_every_article_and_scores_the_evaluation_file_once(tmp_path):
    common = _tiny_squad_run(tmp_path, copies=3, epochs=2)
    # the same run choosing on the dev file scores it after every epoch: the reference
    run_script("qa_task.py", *common, "--loss-log", "best.txt", "--save", "best.pt",
               "--predictions", "best.json", cwd=tmp_path)
    proc = run_script("qa_task.py", *common, "--keep", "last", "--loss-log", "last.txt",
                      "--save", "last.pt", "--predictions", "last.json", cwd=tmp_path)
    assert "| train: 27 questions" in proc.stdout  # all 3 articles
    assert "| evaluation, scored once at the end: 9 questions" in proc.stdout
    assert proc.stdout.count("nothing scored: the last epoch is kept") == 2
    records = monitor.read_results(tmp_path / "last.jsonl")
    assert not [r for r in records if r["record"] == "valid"]  # no file scored between epochs
    assert records[-1]["record"] == "test" and records[-1]["questions"] == 9
    # the kept model is the last epoch's: its score on the dev file is the reference's
    # epoch 2 (the same seed trains the same model)
    reference = [r for r in monitor.read_results(tmp_path / "best.jsonl") if r["record"] == "valid"]
    assert [r["epoch"] for r in reference] == [1, 2]
    assert records[-1]["f1"] == reference[1]["f1"]
    assert records[-1]["loss"] == pytest.approx(reference[1]["loss"], rel=1e-5)
    # with held-out articles, their scores are shown every epoch and the last epoch is kept
    held = run_script("qa_task.py", *common, "--keep", "last", "--holdout-articles", "1",
                      "--loss-log", "held.txt", "--save", "held.pt", "--predictions", "held.json",
                      cwd=tmp_path)
    assert "| train: 18 questions" in held.stdout and "nothing scored" not in held.stdout
    assert len([r for r in monitor.read_results(tmp_path / "held.jsonl") if r["record"] == "valid"]) == 2


def test_the_file_scored_at_the_end_is_read_before_training(tmp_path):
    common = _tiny_squad_run(tmp_path, copies=3, epochs=1)
    (tmp_path / "broken.json").write_text('{"data": [')
    for flags in ([], ["--keep", "last"], ["--holdout-articles", "1"]):
        bad = run_script("qa_task.py", *common, *flags, "--test-file", "broken.json",
                         "--save", "bad.pt", "--loss-log", "bad.txt", cwd=tmp_path, check=False)
        assert bad.returncode == 2 and "cannot read SQuAD file broken.json" in bad.stderr
        assert "Traceback" not in bad.stderr and "end of epoch" not in bad.stdout
        assert not (tmp_path / "bad.pt").exists()
    # trained blind on every article, a dev file it would never score is not read
    blind = [a if a != "dev.json" else "absent.json" for a in common]
    proc = run_script("qa_task.py", *blind, "--keep", "last", "--test-file", "dev.json",
                      "--loss-log", "blind.txt", cwd=tmp_path)
    assert "| evaluation, scored once at the end: 9 questions" in proc.stdout
    assert monitor.read_results(tmp_path / "blind.jsonl")[-1]["questions"] == 9


def test_squad_files_official_first_then_the_dev_split(tmp_path):
    with pytest.raises(data.DataError, match="neither train-v1.1.json"):
        squad.squad_files(tmp_path)
    for name in ("dev-split-train-v1.1.json", "dev-split-eval-v1.1.json.gz", "train-v1.1.json"):
        (tmp_path / name).write_text("{}")
    train, dev, label = squad.squad_files(tmp_path)  # the official pair is not complete
    assert (train.name, dev.name, label) == ("dev-split-train-v1.1.json", "dev-split-eval-v1.1.json.gz",
                                             "dev-split")
    (tmp_path / "dev-v1.1.json").write_text("{}")
    assert [p.name for p in squad.squad_files(tmp_path)[:2]] == ["train-v1.1.json", "dev-v1.1.json"]
    assert squad.squad_files(tmp_path)[2] == "dev"
