"""model.py: the encoder, its layers and heads: shapes, padding, initialisation, layouts, the
last layer at masked positions only, and a compiled step."""
import torch
import torch.nn.functional as F
import pytest

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
