import re

import pytest
import torch

import data
import checkpoint
from conftest import TINY, run_script, write_wikitext

BATCH_LINE = re.compile(r"^\| epoch +\d+ \| +\d+/ +\d+ batches \| lr \d+\.\d{5} \| ms/batch +[\d.]+ "
                        r"\| loss +[\d.]+ \| ppl +[\d.]+$")
EPOCH_LINE = re.compile(r"^\| end of epoch +\d+ \| time: +[\d.]+s \| valid loss +[\d.]+ \| valid ppl +[\d.]+$")


def test_end_to_end_tiny(tmp_path, wikitext):
    proc = run_script("mlm_task.py", "--data-dir", wikitext, *TINY, "--epochs", "2", "--lr", "1",
                      cwd=tmp_path)
    lines = proc.stdout.splitlines()
    assert sum(bool(BATCH_LINE.match(l)) for l in lines) >= 2
    assert sum(bool(EPOCH_LINE.match(l)) for l in lines) == 2
    assert any(re.match(r"^\| End of training \| test loss +[\d.]+ \| test ppl +[\d.]+$", l) for l in lines)
    assert "=" * 89 in lines and "-" * 89 in lines
    log = (tmp_path / "mlm_loss.txt").read_text().splitlines()
    assert "emsize:    32" in log and "epoch   2 | train loss" in "\n".join(log)
    assert re.match(r"^test loss +\d+\.\d{5}$", log[-1])
    vocab = data.Vocab.load(tmp_path / "torchtext_bert_vocab.pt")
    enc = checkpoint.load_encoder(tmp_path / "mlm_bert.pt", vocab)
    assert enc.config["ninp"] == 32 and enc.config["nlayers"] == 2
    out = enc(torch.tensor([[data.CLS, 7, 8]]))
    assert out.shape == (1, 3, 32)
    full = checkpoint.load(tmp_path / "full_mlm_model.pt", "mlm_task")
    assert "mlm_head.weight" in full["model"]


def test_dry_run_and_vocab_reuse(tmp_path, wikitext):
    run_script("mlm_task.py", "--data-dir", wikitext, *TINY, "--dry-run", cwd=tmp_path)
    first = (tmp_path / "torchtext_bert_vocab.pt").read_text()
    proc = run_script("mlm_task.py", "--data-dir", wikitext, *TINY, "--dry-run", cwd=tmp_path)
    assert "read from torchtext_bert_vocab.pt" in proc.stdout
    assert (tmp_path / "torchtext_bert_vocab.pt").read_text() == first
    assert proc.stdout.count("| epoch   1 |     1/") == 1


def _fails(tmp_path, *args, match):
    proc = run_script("mlm_task.py", *args, cwd=tmp_path, check=False)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert re.search(match, proc.stderr), proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2  # usage line + one error line at most
    return proc


def test_bad_inputs(tmp_path, wikitext):
    _fails(tmp_path, "--data-dir", tmp_path / "missing", *TINY, match="data folder .* does not exist")
    _fails(tmp_path, "--dataset", "PennTreebank", *TINY, match="invalid choice: 'PennTreebank'")
    _fails(tmp_path, "--data-dir", wikitext, *TINY, "--nhead", "3", match="--nhead 3 must divide --emsize 32")
    _fails(tmp_path, "--data-dir", wikitext, *TINY, "--mask_frac", "1.5", match="--mask_frac")
    _fails(tmp_path, "--data-dir", wikitext, *TINY, "--emsize", "0", match="--emsize must be positive")
    _fails(tmp_path, "--data-dir", wikitext, *TINY, "--save", tmp_path / "no" / "x.pt", match="does not exist")
    _fails(tmp_path, "--data-dir", wikitext, *TINY, "--batch_size", "4000", match="fewer than one batch")
    (tmp_path / "empty").mkdir()
    _fails(tmp_path, "--data-dir", tmp_path / "empty", *TINY, match="WikiText2 not found.*put wiki.train.tokens")


def test_corrupt_vocab_and_checkpoint_are_refused_without_overwriting(tmp_path, wikitext):
    (tmp_path / "torchtext_bert_vocab.pt").write_bytes(b"\x80\x02garbage")
    (tmp_path / "mlm_bert.pt").write_text("previous result")
    _fails(tmp_path, "--data-dir", wikitext, *TINY, match="not a vocabulary file")
    assert (tmp_path / "mlm_bert.pt").read_text() == "previous result"
    (tmp_path / "torchtext_bert_vocab.pt").unlink()
    _fails(tmp_path, "--data-dir", wikitext, *TINY, "--checkpoint", tmp_path / "mlm_bert.pt",
           match="not a checkpoint this project can read")
    assert (tmp_path / "mlm_bert.pt").read_text() == "previous result"


def test_layouts_are_stored_and_followed_downstream(tmp_path, wikitext):
    """--layout: the original's layers, BERT's (no dropout between the FFN's projections,
    LayerNorm epsilon 1e-12) or pre-LayerNorm ones; the checkpoint rebuilds each, and a
    run started from another layout's model is refused by name."""
    vocab_of = lambda: data.Vocab.load(tmp_path / "torchtext_bert_vocab.pt")
    for layout in ("original", "bert", "pre-ln"):
        run_script("mlm_task.py", "--data-dir", wikitext, *TINY, "--dry-run", "--layout", layout,
                   "--dropout", "0.3", "--save", f"{layout}.pt", "--save-full", f"full_{layout}.pt",
                   cwd=tmp_path)
    original, bert, pre = (checkpoint.load_encoder(tmp_path / f"{name}.pt", vocab_of())
                           for name in ("original", "bert", "pre-ln"))
    assert not {"inner_dropout", "norm_first", "layer_norm_eps"} & set(original.config)
    assert original.layers[0].dropout.p == 0.3 and original.final_norm is None
    assert bert.config["inner_dropout"] is False and bert.config["layer_norm_eps"] == 1e-12
    assert all(layer.dropout.p == 0.0 and layer.dropout1.p == 0.3 and layer.dropout2.p == 0.3
               for layer in bert.layers)
    assert pre.config["norm_first"] is True and pre.final_norm is not None
    _fails(tmp_path, "--data-dir", wikitext, *TINY, "--dry-run", "--layout", "pre-ln", "--checkpoint",
           "full_original.pt", match="other sizes.*norm_first")


def test_tie_weights_shares_the_embeddings_with_the_output_projection(tmp_path, wikitext):
    from model import MLMTask
    tied, untied = MLMTask(100, 32, 2, 64, 2, tie_weights=True), MLMTask(100, 32, 2, 64, 2)
    assert tied.mlm_head.weight is tied.bert_model.bert_embed.embed.weight
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(untied) - count(tied) == 100 * 32
    run_script("mlm_task.py", "--data-dir", wikitext, *TINY, "--dry-run", "--tie-weights",
               "--optimizer", "adamw", "--lr", "1e-2", cwd=tmp_path)
    full = checkpoint.load(tmp_path / "full_mlm_model.pt", "mlm_task")["model"]
    assert torch.equal(full["mlm_head.weight"], full["bert_model.bert_embed.embed.weight"])
    # a tied model is not silently resumed untied, nor the other way round
    _fails(tmp_path, "--data-dir", wikitext, *TINY, "--dry-run", "--checkpoint",
           "full_mlm_model.pt", match="full_mlm_model.pt was trained with --tie-weights")
    run_script("mlm_task.py", "--data-dir", wikitext, *TINY, "--dry-run", "--save-full", "untied.pt",
               cwd=tmp_path)
    _fails(tmp_path, "--data-dir", wikitext, *TINY, "--dry-run", "--tie-weights", "--checkpoint",
           "untied.pt", match="untied.pt was trained without --tie-weights")


@pytest.mark.parametrize("flags", [["--amp", "bf16"], ["--optimizer", "adamw", "--warmup", "3",
                                                        "--lr", "1e-3", "--compile"],
                                   ["--mask-draw", "per-sequence", "--mask-mode", "bert", "--compile"],
                                   ["--cpu-kernels", "off", "--dropout", "0.1"]])
def test_flags_run_end_to_end(tmp_path, flags):
    wt = write_wikitext(tmp_path / "wt", (150, 30, 30))
    proc = run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", *flags, cwd=tmp_path)
    assert "| End of training |" in proc.stdout
