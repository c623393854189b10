"""squad.py: SQuAD files, windows and features, span decoding."""

import pytest
import torch

import data
import squad
from conftest import SQUAD_PARAGRAPHS, write_squad


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


def test_match_feature_marks_context_words_of_the_question():
    paras = [dict(context="Paris is big. Zorblax lives in Paris.", qas=[dict(
        id="a", question="Where does Zorblax live?", answers=[("Paris", 0)])])]
    tok = data.Tokenizer()
    vocab = data.Vocab.build([tok("paris is big . lives in where does")])
    _, f = squad.squad_features(paras, tok, vocab, 32)
    c = int(f.ctx_start[0])
    ctx = tok("Paris is big. Zorblax lives in Paris.")
    marked = [t for t, m in zip(ctx, f.match[0, c:c + len(ctx)].tolist()) if m]
    assert marked == ["zorblax"]  # an <unk> word still matches by its text; '.' never does
    assert f.match[0, :c].sum() == 0
