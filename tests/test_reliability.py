"""No lost work, no code from data, clear errors: resume after SIGKILL, stop on signals,
non-finite losses, atomic writes, and a table of bad inputs."""
import argparse
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import data
import checkpoint
import dist
import monitor
import train
import utils
from conftest import ROOT, TINY, run_script, script_env, write_squad, write_wikitext
from model import MLMTask

RUN = ["--epochs", "2", "--lr", "1", "--dropout", "0.1", "--log-interval", "1", "--save-every", "5"]


def _start(tmp_path, wt, *extra):
    env = script_env()
    return subprocess.Popen([sys.executable, str(ROOT / "mlm_task.py"), "--data-dir", str(wt), *TINY,
                             *RUN, *extra], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(proc, text):
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"{text!r} never printed: {proc.stderr.read()}")


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _epochs(log_path):
    return [l for l in log_path.read_text().splitlines() if l.startswith(("epoch", "test"))]


def test_killed_and_stopped_runs_resume_to_the_same_weights(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (300, 40, 40))
    runs = {name: tmp_path / name for name in ("whole", "killed", "stopped")}
    for d in runs.values():
        d.mkdir()
    whole = _start(runs["whole"], wt)
    # SIGKILL in the middle of epoch 1, after the state of batch 10 was saved
    killed = _start(runs["killed"], wt)
    _wait_for(killed, "| epoch   1 |    12/")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (runs["killed"] / "mlm_state.pt").is_file() and not (runs["killed"] / "mlm_bert.pt").exists()
    # SIGUSR1 (SLURM's warning before the time limit) in epoch 2: saved at the next step
    stopped = _start(runs["stopped"], wt)
    _wait_for(stopped, "| epoch   2 |     3/")
    stopped.send_signal(signal.SIGUSR1)
    out, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 128 + signal.SIGUSR1, err
    assert "state saved to mlm_state.pt: run the same command with --resume" in out
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    for name in ("killed", "stopped"):
        resumed = run_script("mlm_task.py", "--data-dir", wt, *TINY, *RUN, "--resume", cwd=runs[name])
        assert "| resuming from mlm_state.pt: epoch" in resumed.stdout
        for f in ("full_mlm_model.pt", "mlm_bert.pt"):  # bitwise, on CPU
            assert _same(_weights(runs["whole"] / f), _weights(runs[name] / f)), (name, f)
        assert _epochs(runs["whole"] / "mlm_loss.txt") == _epochs(runs[name] / "mlm_loss.txt")
        assert not (runs[name] / "mlm_state.pt").exists()  # the run is complete


def test_sigterm_stops_cleanly(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (300, 40, 40))
    proc = _start(tmp_path, wt, "--save-every", "0")
    _wait_for(proc, "| epoch   1 |     2/")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    state = torch.load(tmp_path / "mlm_state.pt", weights_only=True)
    assert state["kind"] == "mlm_task_state" and state["epoch"] == 1 and state["step"] >= 2


def _trainer(tmp_path, loss_values, **flags):
    torch.manual_seed(0)
    model = MLMTask(20, 8, 2, 16, 1, 0.0)
    args = argparse.Namespace(**{**dict(amp="none", clip=0.5, dry_run=False, log_interval=2, epochs=1,
                                        checkpoint="None", resume=False, state_file="",
                                        save_every=0, skip_nonfinite=False, seed=0, lr=0.1,
                                        optimizer="sgd", grad_accum=1), **flags})
    values = iter(loss_values)

    def loss_fn(model, batch):
        return model(batch).mean() * 0 + next(values)

    task = train.Task("mlm_task", loss_fn, lambda e, start: [torch.ones(2, 3, dtype=torch.long)] * (4 - start), 4,
                      lambda m: dict(loss=1.0), lambda split, r: "ok", str(tmp_path / "best.pt"), "fp")
    return train.Trainer(args, dist.Context(), model, model, task, monitor.Recorder(None))


def test_resume_prefers_the_state_file_to_checkpoint(tmp_path, capsys):
    """A stopped run started with --checkpoint goes on from its state when requeued
    with the same command (--resume), rather than starting over from --checkpoint."""
    state, start = tmp_path / "state.pt", tmp_path / "start.pt"
    first = _trainer(tmp_path, [1.0] * 4, state_file=str(state))
    first.epoch, first.step = 1, 2
    first.save_state()
    checkpoint.save_task(start, first.raw, "mlm_task", "fp")
    _trainer(tmp_path, [1.0] * 4, checkpoint=str(start), resume=True, state_file=str(state))
    assert f"resuming from {state}: epoch 1, 2 batches done" in capsys.readouterr().out
    _trainer(tmp_path, [1.0] * 4, checkpoint=str(start), resume=False, state_file=str(state))
    assert f"starting from the weights in {start}" in capsys.readouterr().out


def test_nonfinite_loss_stops_naming_the_batch(tmp_path):
    with pytest.raises(utils.UserError, match="NaN or infinite at epoch 1, batch 3"):
        _trainer(tmp_path, [1.0, 2.0, float("nan"), 1.0]).fit()


def test_nonfinite_loss_can_be_skipped(tmp_path, capsys):
    train_log, _ = _trainer(tmp_path, [1.0, float("inf"), 3.0, 5.0], skip_nonfinite=True).fit()
    assert train_log == [3.0]  # the mean of the three finite steps
    assert "batch 2: loss inf, step skipped" in capsys.readouterr().out


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "mlm_bert.pt"
    target.write_bytes(b"good")

    def broken_save(obj, f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(utils.UserError) as e:
        checkpoint.atomic_save({"x": 1}, target)
    assert str(e.value) == (f"cannot write {target}: No space left on device; the previous file "
                            "is unchanged")
    assert target.read_bytes() == b"good" and os.listdir(tmp_path) == ["mlm_bert.pt"]


def test_a_folder_gone_before_saving_is_one_clear_error(tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(utils.UserError, match=f"cannot write {gone / 'log.txt'}: No such file or "
                                              "directory; nothing was written"):
        checkpoint.atomic_write_text(gone / "log.txt", "text")
    checkpoint.atomic_write_text(tmp_path / "log.txt", "text", main=False)  # not rank 0: no file
    assert os.listdir(tmp_path) == []


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_checkpoint_with_code_is_refused_unrun(tmp_path):
    torch.save({"format": "bert-example", "kind": "encoder", "x": Payload()}, tmp_path / "evil.pt")
    os.chdir(tmp_path)
    with pytest.raises(utils.UserError, match="not a checkpoint this project can read"):
        checkpoint.load(tmp_path / "evil.pt", "encoder")
    assert not (tmp_path / "pwned.txt").exists()


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
    ("--cloze-dir with a SQuAD file", "qa_task.py", [*QA, "--cloze-dir", "wt"],
     "--cloze-dir makes its own questions; drop --train-file"),
    ("--cloze-dir without WikiText", "qa_task.py", ["--bert-model", "mlm_bert.pt", "--cloze-dir", "empty"],
     "--cloze-dir empty holds no wiki.train.tokens and wiki.valid.tokens"),
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

def test_files_of_other_format_versions_are_refused_naming_the_versions(tmp_path):
    from model import BertModel
    enc = BertModel(20, 8, 2, 16, 1, 0.0)
    path = tmp_path / "enc.pt"
    for version, word in ((2, "newer than the versions"), (0, "not a version")):
        torch.save({**checkpoint.header("encoder", enc.config, "fp", model=enc.state_dict()),
                    "version": version}, path)
        with pytest.raises(utils.UserError, match=rf"enc.pt is a checkpoint of format version {version}, "
                                                  rf"{word} this code reads \(1\)"):
            checkpoint.load(path, "encoder")
    for version, word in ((2, "newer than the versions"), (0, "not a version")):
        (tmp_path / "v.txt").write_text(f"# bert-example vocabulary v{version}\n" + "\n".join(data.SPECIALS))
        with pytest.raises(utils.UserError, match=rf"v.txt is a vocabulary file of format version "
                                                  rf"{version}, {word} this code reads \(1\)"):
            data.Vocab.load(tmp_path / "v.txt")
    # results files: the first line says the version; files from before it are read
    rec = monitor.Recorder(str(tmp_path / "r.jsonl"))
    rec.start(append=False)
    rec.write(dict(record="valid", epoch=1, loss=1.0))
    rec.close()
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert '"record": "format"' in lines[0] and '"version": 1' in lines[0]
    assert [r["record"] for r in monitor.read_results(tmp_path / "r.jsonl")] == ["valid"]
    (tmp_path / "old.jsonl").write_text(lines[1] + "\n")
    assert [r["record"] for r in monitor.read_results(tmp_path / "old.jsonl")] == ["valid"]
    (tmp_path / "new.jsonl").write_text(lines[0].replace('"version": 1', '"version": 2') + "\n" + lines[1])
    with pytest.raises(utils.UserError, match=r"new.jsonl is a results file of format version 2, newer"):
        monitor.read_results(tmp_path / "new.jsonl")


def test_a_second_run_on_the_same_files_is_refused_and_a_dead_ones_lock_never_blocks(tmp_path):
    import socket
    wt = write_wikitext(tmp_path / "wt", (300, 40, 40))
    first = _start(tmp_path, wt, "--epochs", "100")
    _wait_for(first, "| epoch   1 |     2/")
    second = run_script("mlm_task.py", "--data-dir", wt, *TINY, *RUN, cwd=tmp_path, check=False)
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(err) == 1, second.stderr
    assert (f"another run is writing these files: process {first.pid} on {socket.gethostname()} "
            f"holds .mlm_state.pt.lock; wait for it to end") in err[0]
    assert "| epoch" not in second.stdout  # refused before training
    first.send_signal(signal.SIGKILL)
    first.wait()
    third = run_script("mlm_task.py", "--data-dir", wt, *TINY, "--dry-run", cwd=tmp_path)
    assert third.returncode == 0  # the dead run's lock went with it


def test_ctrl_c_stops_at_the_next_step_and_saves_the_state(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (300, 40, 40))
    proc = _start(tmp_path, wt, "--save-every", "0", "--epochs", "20")
    _wait_for(proc, "| epoch   1 |     3/")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    assert "Ctrl-C: stopping after this step to save the run's state" in err
    assert "state saved to mlm_state.pt: run the same command with --resume to go on" in out
    state = torch.load(tmp_path / "mlm_state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] >= 3
    resumed = run_script("mlm_task.py", "--data-dir", wt, *TINY, *RUN, "--resume", "--epochs", "1",
                         cwd=tmp_path)
    assert f"resuming from mlm_state.pt: epoch 1, {state['step']} batches done" in resumed.stdout


def test_a_second_ctrl_c_stops_at_once_leaving_every_file_whole(tmp_path, monkeypatch, capsys):
    """After the first Ctrl-C the default handler is back, so a second raises
    KeyboardInterrupt where the run is; a file being written is not left half-written, and
    the script ends with one line and status 130."""
    trainer = _trainer(tmp_path, [1.0] * 4)
    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, trainer._on_signal)
        trainer._on_signal(signal.SIGINT, None)
        assert trainer.signal == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    target = tmp_path / "state.pt"
    target.write_bytes(b"good")

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(target, interrupted)
    assert target.read_bytes() == b"good" and sorted(os.listdir(tmp_path)) == ["state.pt"]

    def main(args):
        raise KeyboardInterrupt
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        dist._run(main, argparse.Namespace(), (), "mlm_task.py")
    assert e.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip() == ("mlm_task.py: interrupted (Ctrl-C); every file is whole: "
                                               "as it was, or written to the end")


def test_atomic_writes_sync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import stat
    target, synced, real = tmp_path / "a.txt", [], os.fsync

    def fsync(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), target.exists()))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    checkpoint.atomic_write_text(target, "text")
    assert synced == [(False, False), (True, True)]  # the file, not yet renamed; then its folder
    assert target.read_text() == "text"
