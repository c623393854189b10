"""cpu_kernels.py: each kernel computes what model.py's plain path does (values and
gradients, to float rounding), and where it falls back."""
import copy

import pytest
import torch
import torch.nn.functional as F

import cpu_kernels
from model import MLMTask, MultiheadAttention

V, E, H, FF, L = 50, 32, 4, 64, 2


def tiny(dropout=0.0):
    torch.manual_seed(0)
    return MLMTask(V, E, H, FF, L, dropout)


def kernel_attention(*args, **kwargs):
    return cpu_kernels.install(MultiheadAttention(*args, **kwargs))


def plain_loss(x, weight, bias, targets):
    return F.cross_entropy(F.linear(x, weight, bias).float(), targets, reduction="sum")


def fused_loss(x, weight, bias, targets, buffers=None):
    return cpu_kernels.LinearCrossEntropy.apply(x, weight, bias, targets,
                                                {} if buffers is None else buffers)


@pytest.mark.parametrize("amp", [False, True])
def test_the_kernels_compute_the_plain_model(amp):
    """A masked-LM step of the whole model (dropout 0) with every kernel and without:
    the same loss and gradients, to float rounding (bf16 autocast: to its rounding)."""
    plain = tiny()
    fast = cpu_kernels.install(copy.deepcopy(plain))
    assert {type(m).__name__ for m in fast.modules()} >= {"Dropout", "MultiheadAttention", "MLMTask"}
    assert type(fast) is cpu_kernels.MLMTask and fast.state_dict().keys() == plain.state_dict().keys()
    src = torch.randint(5, V, (4, 20))
    masked = torch.rand(4, 20) < 0.3
    masked[:, 3] = True
    results = []
    for m in (plain, fast):
        m.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss = m(src, masked_positions=masked, targets=src[masked])
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in m.parameters()])
    tolerance = 3e-2 if amp else 1e-4
    for a, b in zip(*results):
        assert float((a - b).norm() / a.norm()) < tolerance


def test_cpu_dropout_rate_scale_and_gradient():
    from cpu_kernels import Dropout, dropout
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x, 0.3)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.005
    # each 64-bit draw serves four neighbours: every one of the four lanes drops at p
    per_lane = (y.detach().view(-1, 4) == 0).float().mean(0)
    assert torch.all((per_lane - 0.3).abs() < 0.01), per_lane
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes the same mask and scale
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    layer = Dropout(0.5).eval()
    assert layer(x) is x
    layer = Dropout(0.3).train()
    assert abs((layer(x) == 0).float().mean().item() - 0.3) < 0.005


def test_attention_dropout_path_matches_sdpa_without_dropout():
    torch.manual_seed(0)
    mha = kernel_attention(E, H, dropout=1e-9)  # takes the written-out CPU path
    x = torch.randn(2, 7, E)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    written = mha(x, pad)
    mha.dropout = 0.0  # SDPA
    assert torch.allclose(written, mha(x, pad), atol=1e-5)


def test_attention_dropout_path_is_as_exact_as_sdpa_under_bf16():
    """Under bf16 autocast the written-out path computes scores and softmax in fp32, as
    SDPA does: its error against fp32 is SDPA's, not twice it."""
    torch.manual_seed(0)
    mha = kernel_attention(96, 3, dropout=1e-9)
    x = torch.randn(4, 64, 96) * 3
    exact = mha(x).detach()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # SDPA's bf16 kernel
        written = mha(x).float()
        mha.dropout = 0.0
        sdpa = mha(x).float()
    err = lambda y: (y - exact).abs().mean().item()
    assert err(written) < 1.2 * err(sdpa), (err(written), err(sdpa))


@pytest.mark.parametrize("keys, grad, expected", [(64, True, torch.float32), (64, False, torch.bfloat16),
                                                  (cpu_kernels.BF16_MIN_KEYS, True, torch.bfloat16)])
def test_bf16_training_attention_is_fp32_on_short_sequences(monkeypatch, keys, grad, expected):
    """Under bf16 autocast on the CPU, a training step's attention runs SDPA in fp32 below
    BF16_MIN_KEYS keys (faster there, and more exact), and bf16 otherwise; the
    output is the same either way to bf16 rounding."""
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, *a, **k: seen.append(q.dtype) or real(q, *a, **k))
    torch.manual_seed(0)
    mha = kernel_attention(32, 2)
    x = torch.randn(2, keys, 32, requires_grad=grad)
    exact = mha(x).detach()
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        out = mha(x)
    assert seen[-1] == expected
    assert out.dtype == torch.bfloat16
    assert (out.float() - exact).abs().max() < 0.05
    if grad:
        out.float().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()


def _head_losses(M, vocab, E, ignored, scale=0.37):
    """A random head of these sizes, its first `ignored` targets -100, and its (loss,
    grads of x, weight, bias) by each way: torch's fp32 and fused fp32, autocast's bf16
    path and fused bf16; plus (x, weight, bias, targets)."""
    torch.manual_seed(M)
    x = torch.randn(M, E, requires_grad=True)
    weight = (torch.randn(vocab, E) * 0.5).requires_grad_()
    bias = torch.randn(vocab, requires_grad=True)
    targets = torch.randint(0, vocab, (M,))
    targets[:ignored] = -100
    out = {}
    for way in ("fp32", "fp32 fused", "autocast", "fused"):
        for t in (x, weight, bias):
            t.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=way in ("autocast", "fused")):
            if way.endswith("fused"):
                loss = fused_loss(x, weight, bias, targets)
            else:
                loss = F.cross_entropy(F.linear(x, weight, bias).float(), targets, reduction="sum")
        (loss * scale).backward()
        out[way] = (loss.detach(), x.grad.clone(), weight.grad.clone(), bias.grad.clone())
    return out, (x, weight, bias, targets)


HEAD_SIZES = pytest.mark.parametrize("M, vocab, E, ignored",
                                     [(37, 1000, 16, 0), (200, 9000, 32, 20), (5, 70000, 8, 2)])


@HEAD_SIZES
def test_fused_bf16_head_loss_is_as_exact_as_autocast(M, vocab, E, ignored):
    """The fused masked-LM loss under bf16 (chunks of rows, probabilities kept in bf16)
    gives autocast's loss and gradients, as close to fp32's as autocast's own path is;
    -100 targets are ignored, and their rows get no gradient."""
    out, inputs = _head_losses(M, vocab, E, ignored)
    exact = out["fp32"]
    err = lambda way: [float((a - c).norm() / a.norm()) for a, c in zip(exact[1:], out[way][1:])]
    assert torch.allclose(out["fused"][0], out["autocast"][0], rtol=1e-5)
    assert all(f <= 1.1 * a + 1e-4 for f, a in zip(err("fused"), err("autocast")))
    assert max(err("fused")) < 2e-2
    assert out["fused"][1][:ignored].abs().sum() == 0
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):  # evaluation: the loss alone
        assert torch.equal(fused_loss(*inputs), out["fused"][0])


@HEAD_SIZES
def test_fused_fp32_head_loss_equals_the_plain_one(M, vocab, E, ignored):
    """In fp32 the fused loss is the plain one to float rounding: loss and gradients,
    ignored rows without gradient, and the same loss when evaluating."""
    out, inputs = _head_losses(M, vocab, E, ignored)
    for plain, fused in zip(out["fp32"], out["fp32 fused"]):
        assert float((plain - fused).norm() / plain.norm()) < 1e-4  # float rounding
    assert out["fp32 fused"][1][:ignored].abs().sum() == 0
    with torch.no_grad():
        assert torch.allclose(fused_loss(*inputs), out["fp32 fused"][0], rtol=1e-6)


@pytest.mark.parametrize("amp", [False, True])
def test_fused_head_loss_reuses_its_buffer_but_never_shares_it(amp):
    """The logits buffer goes from one step to the next: two forwards before one backward
    (gradient accumulation) each get their own, and the gradients are the plain loss's;
    the steps after them, which reuse a buffer, give the same as the first."""
    torch.manual_seed(3)
    x1, x2 = torch.randn(40, 16, requires_grad=True), torch.randn(44, 16, requires_grad=True)
    weight = torch.randn(3000, 16, requires_grad=True)
    bias = torch.randn(3000, requires_grad=True)
    t1, t2 = torch.randint(0, 3000, (40,)), torch.randint(0, 3000, (44,))
    t2[:5] = -100

    buffers = {}  # one model's, from step to step

    def grads(fused):
        for p in (x1, x2, weight, bias):
            p.grad = None
        loss_of = (lambda *a: fused_loss(*a, buffers=buffers)) if fused else plain_loss
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss = loss_of(x1, weight, bias, t1) + loss_of(x2, weight, bias, t2)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in (x1, x2, weight, bias)]

    plain, first, second = grads(False), grads(True), grads(True)
    for a, b, c in zip(plain, first, second):
        assert torch.equal(b, c)  # a reused buffer changes nothing
        assert float((a - b).norm() / a.norm()) < (2e-2 if amp else 1e-4)


def test_fused_head_loss_is_used_on_the_cpu_and_backpropagates_once(monkeypatch):
    calls = []
    real = cpu_kernels.LinearCrossEntropy.apply
    monkeypatch.setattr(cpu_kernels.LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    m = cpu_kernels.install(tiny())
    src = torch.randint(5, V, (3, 9))
    masked = torch.rand(3, 9) < 0.3
    masked[0, 1] = True
    targets = src[masked]
    loss = m(src, masked_positions=masked, targets=targets)  # fp32: fused, the plain loss
    assert calls == [1]
    assert torch.allclose(loss, F.cross_entropy(m(src, masked_positions=masked), targets,
                                                reduction="sum"), rtol=1e-5)
    with torch.autocast("cpu", torch.bfloat16):
        loss = m(src, masked_positions=masked, targets=targets)
    assert calls == [1, 1]
    m64 = cpu_kernels.install(tiny().double())  # another dtype: the plain loss
    m64(src, masked_positions=masked, targets=targets)
    assert calls == [1, 1]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()
