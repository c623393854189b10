import torch
import torch.nn.functional as F
import pytest

import model
from model import BertModel, MLMTask, MultiheadAttention, NextSentenceTask, QuestionAnswerTask

V, E, H, FF, L = 50, 32, 4, 64, 2


def tiny(dropout=0.0):
    torch.manual_seed(0)
    return MLMTask(V, E, H, FF, L, dropout)


def test_head_shapes():
    mlm = tiny()
    src = torch.randint(5, V, (3, 11))
    types = torch.zeros_like(src)
    assert mlm(src).shape == (3, 11, V)
    masked = torch.zeros_like(src, dtype=torch.bool)
    masked[0, 1] = masked[2, 5] = masked[2, 6] = True
    assert mlm(src, masked_positions=masked).shape == (3, V)
    assert NextSentenceTask(mlm.bert_model)(src, types).shape == (3, 2)
    start, end = QuestionAnswerTask(mlm.bert_model)(src, types)
    assert start.shape == end.shape == (3, 11)


def test_masked_logits_match_full_logits():
    mlm = tiny().eval()
    src = torch.randint(5, V, (2, 9))
    masked = torch.rand(2, 9) < 0.4
    masked[0, 0] = True
    assert torch.allclose(mlm(src)[masked], mlm(src, masked_positions=masked), atol=1e-5)


def test_padding_does_not_change_real_positions():
    enc = tiny().bert_model.eval()
    lengths = [7, 4, 10]
    seqs = [torch.randint(5, V, (n,)) for n in lengths]
    S = max(lengths)
    batch = torch.full((3, S), 1)
    pad = torch.ones(3, S, dtype=torch.bool)
    types = torch.zeros(3, S, dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = s
        pad[i, :len(s)] = False
        types[i, len(s) // 2:len(s)] = 1
    padded = enc(batch, types, key_padding_mask=pad)
    for i, s in enumerate(seqs):
        alone = enc(s[None], types[i:i + 1, :len(s)])
        assert torch.allclose(padded[i, :len(s)], alone[0], atol=1e-5)
    # Without the mask the padding leaks into real positions (the original's defect).
    unmasked = enc(batch, types)
    assert not torch.allclose(unmasked[1, :4], enc(seqs[1][None], types[1:2, :4])[0], atol=1e-4)


def test_attention_matches_reference_math():
    torch.manual_seed(1)
    mha = MultiheadAttention(E, H).eval()
    x = torch.randn(2, 6, E)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    q, k, v = mha.in_proj(x).chunk(3, dim=-1)
    split = lambda t: t.view(2, 6, H, E // H).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-1, -2) / (E // H) ** 0.5
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    ref = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(2, 6, E)
    assert torch.allclose(mha(x, pad), mha.out_proj(ref), atol=1e-5)


def test_init_and_dropout_are_applied():
    model = BertModel(1000, 64, 4, 256, 2, dropout=0.3)
    w = model.layers[0].linear1.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.all(model.layers[0].linear1.bias == 0)
    assert torch.all(model.layers[0].norm1.weight == 1)
    assert model.layers[1].dropout.p == 0.3 and model.bert_embed.dropout.p == 0.3
    assert model.layers[0].mha.dropout == 0.3
    assert model.config == dict(ntoken=1000, ninp=64, nhead=4, nhid=256, nlayers=2, dropout=0.3)


def test_heads_keep_pretrained_encoder_weights():
    enc = tiny().bert_model
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    NextSentenceTask(enc)
    QuestionAnswerTask(enc)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_match_neighbours_mark_the_tokens_beside_a_match(monkeypatch):
    """--match-neighbours: each token's input gains neighbour_embed[m(t-1) + 2 m(t+1)],
    m the exact-match bit (match % 2 with shapes), 0 beyond the ends."""
    enc = tiny().bert_model
    qa = QuestionAnswerTask(enc, match_feature=True, shape_feature=True, match_neighbours=True)
    seen = {}
    monkeypatch.setattr(enc, "forward", lambda src, types, pad, extra: seen.setdefault("x", extra)
                        .new_zeros(*src.shape, enc.ninp))
    src = torch.randint(5, V, (2, 7))
    bit = torch.tensor([[1, 0, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 0, 0]])
    shape = torch.randint(0, len(QuestionAnswerTask.SHAPE_NAMES), (2, 7))
    qa(src, torch.zeros_like(src), None, bit + 2 * shape)
    code = torch.tensor([[0, 1, 2, 2, 1, 3, 0], [0, 2, 0, 1, 0, 0, 0]])  # before + 2 * after
    expected = qa.match_embed(bit) + qa.shape_embed(shape) + qa.neighbour_embed(code)
    assert torch.allclose(seen["x"], expected)
    qa = QuestionAnswerTask(enc, match_feature=True, match_neighbours=True)  # no shapes: match is the bit
    seen.clear()
    qa(src, torch.zeros_like(src), None, bit)
    assert torch.allclose(seen["x"], qa.match_embed(bit) + qa.neighbour_embed(code))
    with pytest.raises(ValueError, match="needs match_feature"):
        QuestionAnswerTask(enc, match_neighbours=True)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        BertModel(10, 30, 4, 8, 1)
    with pytest.raises(ValueError, match="positive"):
        BertModel(10, 32, 4, 8, 0)


def test_a_small_batch_can_be_overfitted():
    mlm = tiny()
    torch.manual_seed(0)
    src = torch.randint(5, V, (4, 16))
    masked = torch.rand(4, 16) < 0.3
    inputs = src.masked_fill(masked, 2)
    opt = torch.optim.AdamW(mlm.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = F.cross_entropy(mlm(inputs, masked_positions=masked), src[masked])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_cpu_dropout_rate_scale_and_gradient():
    from model import Dropout, dropout
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
    with pytest.raises(ValueError):
        Dropout(1.0)


def test_attention_dropout_path_matches_sdpa_without_dropout():
    torch.manual_seed(0)
    mha = MultiheadAttention(E, H, dropout=1e-9)  # takes the written-out CPU path
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
    mha = MultiheadAttention(96, 3, dropout=1e-9)
    x = torch.randn(4, 64, 96) * 3
    exact = mha(x).detach()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # SDPA's bf16 kernel
        written = mha(x).float()
        mha.dropout = 0.0
        sdpa = mha(x).float()
    err = lambda y: (y - exact).abs().mean().item()
    assert err(written) < 1.2 * err(sdpa), (err(written), err(sdpa))


@pytest.mark.parametrize("keys, grad, expected", [(64, True, torch.float32), (64, False, torch.bfloat16),
                                                  (model.BF16_FLASH_MIN_KEYS, True, torch.bfloat16)])
def test_bf16_training_attention_is_fp32_on_short_sequences(monkeypatch, keys, grad, expected):
    """Under bf16 autocast on the CPU, a training step's attention runs SDPA in fp32 below
    BF16_FLASH_MIN_KEYS keys (faster there, and more exact), and bf16 otherwise; the
    output is the same either way to bf16 rounding."""
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, *a, **k: seen.append(q.dtype) or real(q, *a, **k))
    torch.manual_seed(0)
    mha = MultiheadAttention(32, 2)
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


def test_pre_layernorm_layers_follow_their_formula():
    torch.manual_seed(0)
    post = BertModel(V, E, H, FF, L, 0.0).eval()
    pre = BertModel(V, E, H, FF, L, 0.0, norm_first=True).eval()
    with torch.no_grad():  # weights large enough for the two layer kinds to differ clearly
        for w in pre.layers.parameters():
            w.normal_(0, 0.3)
    assert "norm_first" not in post.config and pre.config["norm_first"] is True
    assert post.final_norm is None and isinstance(pre.final_norm, torch.nn.LayerNorm)
    layer = pre.layers[0]
    x = torch.randn(2, 5, E)
    h = x + layer.mha(layer.norm1(x))
    want = h + layer.linear2(F.gelu(layer.linear1(layer.norm2(h))))
    assert torch.allclose(layer(x), want, atol=1e-6)
    src = torch.randint(5, V, (2, 6))
    x = pre.bert_embed(src)
    for lyr in pre.layers:
        x = lyr(x)
    assert torch.allclose(pre(src), pre.final_norm(x), atol=1e-6)
    # the same weights as a post-LayerNorm model give another function
    post.load_state_dict({k: v for k, v in pre.state_dict().items() if not k.startswith("final_norm")})
    assert not torch.allclose(post(src), pre(src), atol=1e-3)
    # the config rebuilds it, as the fine-tuning steps do
    again = BertModel(**pre.config).eval()
    again.load_state_dict(pre.state_dict())
    assert torch.equal(again(src), pre(src))


@pytest.mark.parametrize("norm_first", [False, True])
def test_last_layer_at_masked_positions_only_changes_nothing(norm_first):
    """MLMTask computes the last layer only where the loss looks; outputs and gradients
    must be those of the full computation (padding and a row without masks included)."""
    torch.manual_seed(0)
    m = MLMTask(V, E, H, FF, 3, 0.0, norm_first=norm_first)
    src = torch.randint(5, V, (4, 12))
    masked = torch.rand(4, 12) < 0.3
    masked[0, 0], masked[1] = True, False
    pad = torch.zeros(4, 12, dtype=torch.bool)
    pad[2, 9:] = True
    masked &= ~pad
    grads = []
    for partial in (False, True):
        m.zero_grad(set_to_none=True)
        out = m(src, key_padding_mask=pad, masked_positions=masked) if partial \
            else m(src, key_padding_mask=pad)[masked]
        out.pow(2).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    (full, g_full), (part, g_part) = grads
    assert part.shape == (int(masked.sum()), V)
    assert torch.allclose(full, part, atol=1e-5)
    for a, b in zip(g_full, g_part):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def _mask_both_ways(seed=0):
    """A batch masked per sequence, with its masks as index (N, P) and as positions (N, S)."""
    import data
    g = torch.Generator().manual_seed(seed)
    tokens = data.add_cls(torch.randint(len(data.SPECIALS), V, (4, 15), generator=g))
    tokens[3, 10:] = data.PAD  # a row with padding
    inputs, index, valid, targets = data.mask_per_sequence(tokens, 0.2, V, "bert", g)
    masked = torch.zeros_like(tokens, dtype=torch.bool).scatter_(1, index, valid)
    return tokens, inputs, index, valid, targets, masked


def _per_sequence_loss(m, inputs, index, valid, targets):
    """mlm_task.py's: the head's summed loss over the valid predictions, here their mean."""
    return m(inputs, masked_index=index, targets=targets.masked_fill(~valid, -100)) / valid.sum()


def test_per_sequence_and_per_token_masks_give_the_same_loss_and_gradients():
    """Where the two masking modes select the same positions (here: those drawn per
    sequence, given to the per-token path as positions), loss and gradients agree."""
    tokens, inputs, index, valid, targets, masked = _mask_both_ways()
    m = tiny()
    results = []
    for way in ("per-token", "per-sequence"):
        m.zero_grad(set_to_none=True)
        if way == "per-token":
            loss = F.cross_entropy(m(inputs, masked_positions=masked), tokens[masked])
        else:
            loss = _per_sequence_loss(m, inputs, index, valid, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-6)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-5)


def test_compiled_training_step_has_no_graph_break():
    """torch.compile takes the model's forward and the per-sequence masked-LM loss whole
    (fullgraph=True fails on any graph break), and the compiled step trains."""
    tokens, inputs, index, valid, targets, _ = _mask_both_ways(1)
    m = tiny(dropout=0.1).train()
    step = torch.compile(_per_sequence_loss, backend="aot_eager", fullgraph=True)
    explained = torch._dynamo.explain(_per_sequence_loss)(m, inputs, index, valid, targets)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    # compiled, the last layer and the vocabulary projection still run at the P masked
    # positions only
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    assert compiled(inputs, masked_index=index).shape == (*index.shape, V)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = step(m, inputs, index, valid, targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


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
                loss = model.linear_cross_entropy(x, weight, bias, targets)
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
        assert torch.equal(model.linear_cross_entropy(*inputs), out["fused"][0])


@HEAD_SIZES
def test_fused_fp32_head_loss_equals_the_plain_one(M, vocab, E, ignored):
    """In fp32 the fused loss is the plain one to float rounding: loss and gradients,
    ignored rows without gradient, and the same loss when evaluating."""
    out, inputs = _head_losses(M, vocab, E, ignored)
    for plain, fused in zip(out["fp32"], out["fp32 fused"]):
        assert float((plain - fused).norm() / plain.norm()) < 1e-4  # float rounding
    assert out["fp32 fused"][1][:ignored].abs().sum() == 0
    with torch.no_grad():
        assert torch.allclose(model.linear_cross_entropy(*inputs), out["fp32 fused"][0], rtol=1e-6)


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

    def grads(fused):
        for p in (x1, x2, weight, bias):
            p.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss = (model.linear_cross_entropy(x1, weight, bias, t1, fused=fused)
                    + model.linear_cross_entropy(x2, weight, bias, t2, fused=fused))
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in (x1, x2, weight, bias)]

    plain, first, second = grads(False), grads(True), grads(True)
    for a, b, c in zip(plain, first, second):
        assert torch.equal(b, c)  # a reused buffer changes nothing
        assert float((a - b).norm() / a.norm()) < (2e-2 if amp else 1e-4)


def test_fused_head_loss_is_used_on_the_cpu_and_backpropagates_once(monkeypatch):
    calls = []
    real = model._LinearCrossEntropy.apply
    monkeypatch.setattr(model._LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    m = tiny()
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
    m64 = tiny().double()  # another dtype: the plain loss
    m64(src, masked_positions=masked, targets=targets)
    assert calls == [1, 1]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()
