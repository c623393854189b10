"""No lost work, no code from data, clear errors: resume after SIGKILL, stop on signals,
non-finite losses, atomic writes, and a table of bad inputs."""
import json
import os

import pytest
import torch

import data
import checkpoint
from conftest import Payload, TINY, run_script, write_squad, write_wikitext


# ----------------------------------------------------------------- the bad-input table

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A finished tiny mlm run, a SQuAD pair and broken files, shared by the cases."""
    d = tmp_path_factory.mktemp("bad")
    wt = write_wikitext(d / "wt", (200, 40, 40))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--dry-run", cwd=d)
    write_squad(d / "train.json", copies=2)
    write_squad(d / "dev.json", prefix="d")
    (d / "empty").mkdir()
    write_wikitext(d / "emptyvalid", (200, 0, 40))
    (d / "zip").mkdir()
    (d / "zip" / "wikitext-2-v1.zip").write_bytes(b"PK\x03\x04 cut short")
    (d / "bad.json").write_text('{"data": [{"paragraphs": [')
    (d / "moved.json").write_text('{"data": [{"paragraphs": [{"context": "abc def", "qas": [{"id": "x", '
                                  '"question": "q?", "answers": [{"text": "def", "answer_start": 0}]}]}]}]}')
    (d / "othervocab.txt").write_text(data.VOCAB_HEADER + "\n" + "\n".join(data.SPECIALS + ["zz"]) + "\n")
    (d / "corrupt_vocab.pt").write_bytes(b"\x80\x04\x95 pickled vocabulary")
    torch.save({"format": "bert-example", "kind": "encoder", "x": Payload()}, d / "evil.pt")
    (d / "afolder").mkdir()
    newer = torch.load(d / "mlm_bert.pt", weights_only=True)
    torch.save({**newer, "version": checkpoint.VERSION + 1}, d / "newer.pt")
    (d / "newervocab.txt").write_text((d / "torchtext_bert_vocab.pt").read_text().replace(
        data.VOCAB_HEADER, f"# bert-example vocabulary v{data.VOCAB_VERSION + 1}"))
    _transformers_folder(d / "hf", hidden_size=24)  # its weights are 16 wide
    return d


def _transformers_folder(folder, **edits):
    """A transformers BERT folder (config.json, pytorch_model.bin, vocab.txt), its config
    edited."""
    import hf
    from model import BertModel
    folder.mkdir()
    itos = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(20)]
    (folder / "vocab.txt").write_text("\n".join(itos) + "\n")
    enc = BertModel(len(itos), 16, 2, 32, 1, 0.0, layer_norm_eps=1e-12, inner_dropout=False)
    config = {**hf.config_to_hf(enc.config, "BertModel"), **edits}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(hf.encoder_to_hf(enc.state_dict(), 1), folder / "pytorch_model.bin")


QA = ["--train-file", "train.json", "--dev-file", "dev.json", "--bert-model", "mlm_bert.pt"]
M = ["--data-dir", "wt", *TINY]
BAD_INPUTS = [  # (what, script, flags, the message the user sees, in part)
    ("missing data folder", "mlm_task.py", ["--data-dir", "nowhere", *TINY], "data folder nowhere does not exist"),
    ("no data files, offline", "mlm_task.py", ["--data-dir", "empty", *TINY], "WikiText2 not found"),
    ("empty split", "mlm_task.py", ["--data-dir", "emptyvalid", *TINY], "the valid split has 0 tokens"),
    ("truncated zip", "mlm_task.py", ["--data-dir", "zip", *TINY], "is not a readable zip"),
    ("malformed SQuAD JSON", "qa_task.py", [*QA, "--train-file", "bad.json"], "cannot read SQuAD file bad.json"),
    ("answer_start not matching the context", "qa_task.py", [*QA, "--dev-file", "moved.json"],
     "question x: answer 'def' is not at answer_start 0"),
    ("vocabulary file from another corpus", "ns_task.py", ["--save-vocab", "othervocab.txt"],
     "was trained with another vocabulary"),
    ("corrupt vocabulary file", "mlm_task.py", [*M, "--save-vocab", "corrupt_vocab.pt"], "is not a vocabulary file"),
    ("--checkpoint from a model of another size", "mlm_task.py", [*M, "--emsize", "64", "--checkpoint",
                                                                  "full_mlm_model.pt"], "holds a model of other sizes"),
    ("full-task checkpoint where an encoder is expected", "ns_task.py", ["--bert-model", "full_mlm_model.pt"],
     "'mlm_task' checkpoint where 'encoder' is expected"),
    ("missing --bert-model", "qa_task.py", [*QA, "--bert-model", "nope.pt"], "checkpoint nope.pt not found"),
    ("checkpoint from a newer version of this project", "ns_task.py", ["--bert-model", "newer.pt"],
     "newer.pt is a checkpoint of format version 2, newer than the versions this code reads (1)"),
    ("vocabulary file from a newer version", "mlm_task.py", [*M, "--save-vocab", "newervocab.txt"],
     "is a vocabulary file of format version 2, newer than the versions this code reads (1)"),
    ("transformers config.json that does not fit its weights", "qa_task.py",
     [*QA, "--bert-model", "hf", "--tokenizer", "wordpiece"],
     "config.json: hidden_size is 24, but the weights' embeddings.word_embeddings.weight has shape (25, 16)"),
    ("checkpoint that would run code", "qa_task.py", [*QA, "--bert-model", "evil.pt"],
     "evil.pt is not a checkpoint this project can read"),
    ("unknown --dataset", "mlm_task.py", ["--dataset", "PTB"], "argument --dataset: invalid choice: 'PTB'"),
    ("zero size", "mlm_task.py", [*M, "--emsize", "0"], "--emsize must be positive, got 0"),
    ("negative batch size", "ns_task.py", ["--batch_size", "-4"], "--batch_size must be positive, got -4"),
    ("--nhead not dividing --emsize", "mlm_task.py", [*M, "--nhead", "3"], "--nhead 3 must divide --emsize 32"),
    ("--save in a missing folder", "mlm_task.py", [*M, "--save", "no/such/dir/x.pt"], "cannot write no/such/dir/x.pt"),
    ("--save is a folder", "qa_task.py", [*QA, "--save", "afolder"], "cannot write afolder: it is a folder"),
    ("--mask_frac out of range", "mlm_task.py", [*M, "--mask_frac", "1.5"], "--mask_frac must be between 0 and 1"),
    ("--bptt shorter than a question", "qa_task.py", [*QA, "--bptt", "8"], "leaves no room for its context"),
    ("span selection without WikiText", "span_task.py", ["--bert-model", "mlm_bert.pt", "--data-dir", "empty"],
     "WikiText2 not found"),
    ("a question with --predict FILE", "qa_task.py", ["--predict", "dev.json", "--question", "Why?"],
     "--predict dev.json answers the questions of that file: drop --question"),
    ("--bptt longer than the model's positions", "mlm_task.py", [*M, "--bptt", "600"], "exceeds the model's 512"),
    ("--device cuda without CUDA", "mlm_task.py", [*M, "--device", "cuda"], "CUDA is not available"),
]
OUTPUTS = ["mlm_bert.pt", "full_mlm_model.pt", "torchtext_bert_vocab.pt", "ns_bert.pt", "qa_model.pt",
           "predictions.json", "mlm_loss.txt", "qa_loss.txt", "ns_loss.txt"]


@pytest.mark.parametrize("what, script, flags, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(workdir, what, script, flags, message):
    before = {f: (workdir / f).read_bytes() for f in OUTPUTS if (workdir / f).is_file()}
    proc = run_script(script, *flags, cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], proc.stderr
    assert err[0].startswith(f"{script}: error: ")
    assert {f: (workdir / f).read_bytes() for f in before} == before
    assert not (workdir / "pwned.txt").exists()
    if os.environ.get("BAD_INPUT_TABLE"):  # regenerates the README's table
        with open(os.environ["BAD_INPUT_TABLE"], "a") as f:
            args = [str(a) for a in flags]
            cut = next((i for i in range(len(args)) if args[i:i + len(TINY)] == TINY), None)
            args = args if cut is None else args[:cut] + args[cut + len(TINY):]
            pairs = dict(zip(args[::2], args[1::2]))  # a flag given twice: the last one counts
            shown = " ".join(f"{k} {v}" for k, v in pairs.items())
            f.write(f"| {what} | `python {script} {shown}` | `{err[0]}` |\n")


# ----------------------------------------------------------------- versions, one writer, Ctrl-C, durable writes
