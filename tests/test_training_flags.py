"""The training flags beyond the original: AdamW schedule, gradient accumulation,
mixed precision and torch.compile."""
import argparse

import pytest
import torch

import train
from conftest import TINY, run_script, write_squad, write_wikitext
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


def test_fused_adamw_is_the_default_and_updates_as_the_plain_one():
    """--adamw-kernel fused (the default, where torch has it) and default give the same
    update up to rounding."""
    results = {}
    for kernel in ("fused", "default"):
        torch.manual_seed(0)
        model = MLMTask(50, 16, 2, 32, 2, 0.0)
        args = argparse.Namespace(optimizer="adamw", lr=1e-2, warmup=2, weight_decay=0.01,
                                  epochs=1, grad_accum=1, adamw_kernel=kernel)
        opt = train.Optimizer(args, model, steps_per_epoch=10)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        src = torch.randint(5, 50, (4, 9))
        for _ in range(10):
            model(src).logsumexp(-1).mean().backward()
            opt.step(scaler)
        results[kernel] = (opt.opt.defaults["fused"], [p.detach().clone() for p in model.parameters()])
    fused_here = train.fused_adamw(list(model.parameters()))
    assert fused_here == (tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4))
    assert results["fused"][0] == (fused_here or None) and results["default"][0] is None
    for a, b in zip(results["fused"][1], results["default"][1]):
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


@pytest.mark.parametrize("flags", [["--amp", "bf16"], ["--optimizer", "adamw", "--warmup", "3",
                                                        "--lr", "1e-3", "--compile"],
                                   ["--mask-draw", "per-sequence", "--max-predictions", "2",
                                    "--mask-mode", "bert", "--compile"]])
def test_flags_run_end_to_end(tmp_path, flags):
    wt = write_wikitext(tmp_path / "wt", (150, 30, 30))
    proc = run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", *flags, cwd=tmp_path)
    assert "| End of training |" in proc.stdout
