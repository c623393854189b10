"""train.py: the optimizer and its schedule, gradient accumulation, resuming after a
kill or a signal (Ctrl-C too), non-finite losses, one writer per run."""
import argparse
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import dist
import monitor
import train
import utils
from conftest import ROOT, TINY, run_script, script_env, write_squad, write_wikitext
from model import MLMTask


def test_adamw_warmup_then_linear_decay():
    model = MLMTask(20, 8, 2, 16, 1, 0.0)
    args = argparse.Namespace(optimizer="adamw", lr=1.0, warmup=4, weight_decay=0.01, epochs=2,
                              grad_accum=2)
    opt = train.Optimizer(args, model, steps_per_epoch=11)
    assert opt.plateau is None
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    lrs = []
    for _ in range(12):  # 2 epochs x ceil(11 / 2) = 12 optimizer steps
        lrs.append(opt.lr)
        opt.step(scaler)
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] > lrs[5] > lrs[-1] > 0 and opt.lr == 0.0
    no_decay = [g for g in opt.opt.param_groups if g["weight_decay"] == 0.0][0]["params"]
    assert all(p.dim() == 1 for p in no_decay) and len(no_decay) > 0
    opt.end_of_epoch(improved=True)
    assert opt.lr == 0.0  # AdamW's schedule ignores validation
    sgd = train.Optimizer(argparse.Namespace(optimizer="sgd", lr=6.0), model, 5)
    assert isinstance(sgd.opt, torch.optim.SGD) and sgd.schedule is None
    sgd.end_of_epoch(improved=True)
    assert sgd.lr == 6.0
    sgd.end_of_epoch(improved=False)
    assert sgd.lr == pytest.approx(0.6)  # the original's decay after an epoch without gain


def test_adamw_is_fused_where_torch_has_it_and_updates_as_the_plain_one():
    """AdamW runs as one fused kernel where torch has one (on the CPU from torch 2.4) and
    gives the update of torch's plain AdamW up to rounding."""
    results = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = MLMTask(50, 16, 2, 32, 2, 0.0)
        args = argparse.Namespace(optimizer="adamw", lr=1e-2, warmup=2, weight_decay=0.01,
                                  epochs=1, grad_accum=1)
        opt = train.Optimizer(args, model, steps_per_epoch=10)
        if not fused:
            opt.opt.defaults["fused"] = None
            for group in opt.opt.param_groups:
                group["fused"] = None
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        src = torch.randint(5, 50, (4, 9))
        for _ in range(10):
            model(src).logsumexp(-1).mean().backward()
            opt.step(scaler)
        results[fused] = [p.detach().clone() for p in model.parameters()]
    fused_here = train.fused_adamw(list(model.parameters()))
    assert fused_here == (tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4))
    for a, b in zip(results[True], results[False]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_grad_accum_matches_the_larger_batch(tmp_path):
    """QA losses are means over equal-sized batches, so 2 x 4 accumulated equals 8."""
    wt = write_wikitext(tmp_path / "wt", (150, 30, 30))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--dry-run", cwd=tmp_path)
    write_squad(tmp_path / "train.json", copies=8)  # 72 questions: 9 batches of 8
    write_squad(tmp_path / "dev.json", prefix="d")
    qa = ["--bert-model", "mlm_bert.pt", "--train-file", "train.json", "--dev-file", "dev.json",
          "--bptt", "48", "--dropout", "0", "--epochs", "1", "--lr", "0.5", "--log-interval", "3"]
    run_script("qa_task.py", *qa, "--batch_size", "8", "--save", "a.pt", cwd=tmp_path)
    run_script("qa_task.py", *qa, "--batch_size", "4", "--grad-accum", "2", "--save", "b.pt",
               "--optimizer", "sgd", cwd=tmp_path)
    a, b = (torch.load(tmp_path / f, weights_only=True)["model"] for f in ("a.pt", "b.pt"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


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
                                        save_every=0, seed=0, lr=0.1, profile=None,
                                        optimizer="sgd", grad_accum=1), **flags})
    values = iter(loss_values)

    def loss_fn(model, batch):
        (rows,) = batch
        return model(rows).mean() * 0 + next(values)

    batches = lambda e, start: data.Batches(torch.ones(8, 3, dtype=torch.long), batch_size=2, start=start)
    task = train.Task("mlm_task", loss_fn, batches, 4,
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


def test_a_second_run_on_the_same_files_is_refused_and_a_dead_ones_lock_never_blocks(tmp_path):
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
