"""BERT: the encoder (BertModel) and its three task heads, MLMTask (mlm_task.py),
NextSentenceTask (ns_task.py) and QuestionAnswerTask (qa_task.py, span_task.py), in
plain PyTorch (cpu_kernels.py gives them faster CPU kernels). Nothing here knows about
files. Tensors are batch-first: ids and token types (N, S), key_padding_mask (N, S)
True at padding, encoder output (N, S, E). The layout follows the original example:
learned positions, two token types, post-LayerNorm layers with GELU (LAYOUTS: BERT's
and pre-LayerNorm ones too).
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_POSITIONS = 512  # learned position table; sequences longer than this are refused
# The encoder's layer layouts (mlm_task.py --layout): BertModel keyword arguments.
LAYOUTS = {"original": dict(norm_first=False, inner_dropout=True, layer_norm_eps=1e-5),
           "bert": dict(norm_first=False, inner_dropout=False, layer_norm_eps=1e-12),
           "pre-ln": dict(norm_first=True, inner_dropout=True, layer_norm_eps=1e-5)}
# The encoder's activations, by the names transformers' BERT configs use (gelu is exact).
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu,
               "gelu_new": functools.partial(F.gelu, approximate="tanh"),
               "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh")}


def init_weights(module):
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, LayerNorm 1/0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _compiling():
    check = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return check()


class PositionalEncoding(nn.Module):
    """Learned absolute positions: (N, S) ids -> (1, S, E), broadcast over the batch."""

    def __init__(self, d_model, max_len=MAX_POSITIONS):
        super().__init__()
        self.pos_embedding = nn.Embedding(max_len, d_model)

    def forward(self, x):
        seq_len = x.size(1)
        if seq_len > self.pos_embedding.num_embeddings:
            raise ValueError(f"sequence of {seq_len} tokens is longer than the "
                             f"{self.pos_embedding.num_embeddings} positions the model has")
        pos = torch.arange(seq_len, device=x.device)
        return self.pos_embedding(pos).unsqueeze(0)


class TokenTypeEncoding(nn.Module):
    """Segment embeddings; a missing token_type_input means every token is type 0."""

    def __init__(self, type_token_num, d_model):
        super().__init__()
        self.token_type_embeddings = nn.Embedding(type_token_num, d_model)

    def forward(self, seq_input, token_type_input=None):
        if token_type_input is None:
            # Type 0 everywhere: row 0 of the table, broadcast to (1, 1, E).
            return self.token_type_embeddings.weight[0].view(1, 1, -1)
        return self.token_type_embeddings(token_type_input)


class BertEmbedding(nn.Module):
    """Word + position + token type, then LayerNorm and dropout: (N, S) -> (N, S, E)."""

    def __init__(self, ntoken, ninp, dropout=0.5, max_positions=MAX_POSITIONS, type_vocab_size=2,
                 eps=1e-5):
        super().__init__()
        self.ninp = ninp
        self.ntoken = ntoken
        self.pos_embed = PositionalEncoding(ninp, max_positions)
        self.embed = nn.Embedding(ntoken, ninp)
        self.tok_type_embed = TokenTypeEncoding(type_vocab_size, ninp)  # sentence types (A, B)
        self.norm = nn.LayerNorm(ninp, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, token_type_input=None, extra=None):
        x = self.embed(src) + self.pos_embed(src) + self.tok_type_embed(src, token_type_input)
        if extra is not None:  # a task's own input embedding (N, S, E), e.g. QA's match feature
            x = x + extra
        return self.dropout(self.norm(x))


class MultiheadAttention(nn.Module):
    """Self-attention with one fused QKV projection on scaled_dot_product_attention.

    x (N, S, E) -> qkv (N, S, 3E) -> q, k, v each (N, H, S, E/H) -> SDPA -> (N, S, E).
    key_padding_mask (N, S), True at padding, keeps every query from attending to
    padded keys. Without a mask SDPA may pick its flash / memory-efficient kernels.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embedding size {embed_dim} is not divisible by "
                             f"the number of heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x, key_padding_mask=None, query_index=None):
        """query_index (N, Q) long: only these positions ask (every position is still a key
        and value) -> (N, Q, E)."""
        n, s, e = x.shape
        h = self.num_heads
        q, k, v = self.in_proj(x).view(n, s, 3, h, e // h).permute(2, 0, 3, 1, 4).unbind(0)
        if query_index is not None:
            s = query_index.size(1)
            q = q.gather(2, query_index.view(n, 1, s, 1).expand(n, h, s, e // h))
        attn_mask = None
        if key_padding_mask is not None:
            # (N, S) True=pad -> (N, 1, 1, S) True=may attend, broadcast over heads and queries.
            attn_mask = ~key_padding_mask.view(n, 1, 1, k.size(2))
        out = self.attention(q, k, v, attn_mask, self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(n, s, e))

    def attention(self, q, k, v, attn_mask, p):
        """(N, H, Q, D) queries, (N, H, S, D) keys and values -> (N, H, Q, D)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)


class TransformerEncoderLayer(nn.Module):
    """Post-LayerNorm encoder layer: x = LN(x + attn(x)); x = LN(x + FFN(x)).

    norm_first=True gives the pre-LayerNorm layer: x = x + attn(LN(x)); x = x + FFN(LN(x)).
    BERT itself is post-LayerNorm.
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="gelu",
                 norm_first=False, eps=1e-5, inner_dropout=True):
        super().__init__()
        self.norm_first = norm_first
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
        self.mha = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        # The original (torch's TransformerEncoderLayer) drops inside the FFN too; BERT does not.
        self.dropout = nn.Dropout(dropout if inner_dropout else 0.0)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]

    def _ff(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src, key_padding_mask=None, query_index=None):
        """(N, S, E) -> (N, S, E), or (N, Q, E) at query_index (N, Q) only."""
        res = src if query_index is None else src.gather(
            1, query_index.unsqueeze(-1).expand(-1, -1, src.size(-1)))
        if self.norm_first:
            src = res + self.dropout1(self.mha(self.norm1(src), key_padding_mask, query_index))
            return src + self._ff(self.norm2(src))
        src = self.norm1(res + self.dropout1(self.mha(src, key_padding_mask, query_index)))
        return self.norm2(src + self._ff(src))


class BertModel(nn.Module):
    """Embeddings plus `nlayers` encoder layers: (N, S) ids -> (N, S, ninp)."""

    # Settings beyond the original's sizes, with their defaults; a config records one only
    # when it differs, so that checkpoints of the original's shape keep their config.
    EXTRAS = dict(norm_first=False, layer_norm_eps=1e-5, max_positions=MAX_POSITIONS,
                  type_vocab_size=2, activation="gelu", inner_dropout=True)

    def __init__(self, ntoken, ninp, nhead, nhid, nlayers, dropout=0.5, norm_first=False,
                 layer_norm_eps=1e-5, max_positions=MAX_POSITIONS, type_vocab_size=2,
                 activation="gelu", inner_dropout=True):
        super().__init__()
        for name, value in (("ntoken", ntoken), ("ninp", ninp), ("nhead", nhead),
                            ("nhid", nhid), ("nlayers", nlayers)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.ninp = ninp
        # Everything needed to rebuild this encoder from a checkpoint.
        self.config = dict(ntoken=ntoken, ninp=ninp, nhead=nhead, nhid=nhid,
                           nlayers=nlayers, dropout=dropout)
        given = dict(norm_first=norm_first, layer_norm_eps=layer_norm_eps,
                     max_positions=max_positions, type_vocab_size=type_vocab_size,
                     activation=activation, inner_dropout=inner_dropout)
        self.config.update({k: v for k, v in given.items() if v != self.EXTRAS[k]})
        self.bert_embed = BertEmbedding(ntoken, ninp, dropout, max_positions, type_vocab_size,
                                        layer_norm_eps)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(ninp, nhead, nhid, dropout, activation, norm_first,
                                    layer_norm_eps, inner_dropout)
            for _ in range(nlayers))
        # Pre-LayerNorm layers leave their sum unnormalised: one LayerNorm after the last.
        self.final_norm = nn.LayerNorm(ninp, eps=layer_norm_eps) if norm_first else None
        self.apply(init_weights)

    def freeze_word_embeddings(self):
        """The word embeddings get no gradient (an optimizer then skips them)."""
        self.bert_embed.embed.weight.requires_grad_(False)

    def forward(self, src, token_type_input=None, key_padding_mask=None, extra_embedding=None,
                positions=None, index=None):
        """(N, S) ids -> (N, S, E); given positions (N, S) bool -> (M, E), the outputs at the M
        True positions in row-major order; given index (N, P) long -> (N, P, E), the outputs
        at those positions of each row. Then the last layer computes only those outputs
        (its keys and values still come from every position): the same numbers, cheaper.
        positions costs one read of the device (M decides the shapes); index costs none."""
        x = self.bert_embed(src, token_type_input, extra_embedding)
        if (key_padding_mask is not None and key_padding_mask.device.type == "cpu"
                and not _compiling() and not key_padding_mask.any()):
            # Nothing to hide: keep SDPA's fastest kernels. Checked on the CPU only, where
            # reading the mask costs nothing; a GPU step does not wait for it.
            key_padding_mask = None
        valid = None
        if index is not None:
            positions = None
        elif positions is not None and not _compiling():
            counts = positions.sum(1)
            q = int(counts.max())  # one host sync; the shapes depend on it
            if 0 < q < src.size(1):
                # Each row's True positions first, in order; the rest of its q slots is filler.
                index = torch.argsort((~positions).to(torch.int8), dim=1, stable=True)[:, :q]
                valid = torch.arange(q, device=src.device) < counts.unsqueeze(1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, key_padding_mask, index if i == last else None)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if positions is None:
            return x
        return x[positions] if valid is None else x[valid]


class MLMTask(nn.Module):
    """Encoder plus the masked-LM head (dense, GELU, LayerNorm, vocabulary projection).

    forward(src) -> (N, S, ntoken) logits at every position, or, given
    masked_positions (N, S) bool, -> (M, ntoken) logits at the M masked positions
    only, in row-major order (the same order as src[masked_positions]).
    """

    def __init__(self, ntoken, ninp, nhead, nhid, nlayers, dropout=0.5, norm_first=False,
                 tie_weights=False, encoder=None, head_eps=1e-12):
        """A new encoder of the given sizes, or encoder (a BertModel, whose sizes count)."""
        super().__init__()
        self.bert_model = encoder or BertModel(ntoken, ninp, nhead, nhid, nlayers, dropout,
                                               norm_first)
        ninp, ntoken = self.bert_model.ninp, self.bert_model.config["ntoken"]
        self.mlm_span = nn.Linear(ninp, ninp)
        self.activation = F.gelu
        self.norm_layer = nn.LayerNorm(ninp, eps=head_eps)
        self.mlm_head = nn.Linear(ninp, ntoken)
        for head in (self.mlm_span, self.norm_layer, self.mlm_head):
            head.apply(init_weights)
        if tie_weights:  # BERT's: the vocabulary projection is the word embedding matrix
            self.mlm_head.weight = self.bert_model.bert_embed.embed.weight

    @classmethod
    def on(cls, encoder, tie_weights=False, head_eps=1e-12):
        """The masked-LM head, freshly initialised, on an existing encoder."""
        return cls(*(None,) * 5, tie_weights=tie_weights, encoder=encoder, head_eps=head_eps)

    @property
    def tied(self):
        """True when the output projection is the word embedding matrix (--tie-weights)."""
        return self.mlm_head.weight is self.bert_model.bert_embed.embed.weight

    @staticmethod
    def state_is_tied(state):
        """Whether a state dict of an MLMTask was saved with tied weights."""
        return torch.equal(state["mlm_head.weight"], state["bert_model.bert_embed.embed.weight"])

    def forward(self, src, token_type_input=None, masked_positions=None, key_padding_mask=None,
                masked_index=None, targets=None):
        """masked_index (N, P) long instead of masked_positions -> (N, P, ntoken) logits at
        those positions, with shapes that depend on no value (data.mask_per_sequence).
        Given targets, the ids at those positions ((M,) or (N, P); -100: ignored), ->
        the summed cross entropy instead (an fp32 scalar)."""
        # Only at masked positions: the vocabulary projection is the costly part
        out = self.bert_model(src, token_type_input, key_padding_mask, positions=masked_positions,
                              index=masked_index)
        out = self.norm_layer(self.activation(self.mlm_span(out)))
        if targets is None:
            return self.mlm_head(out)
        return self.loss(out.flatten(0, -2), targets.flatten())

    def loss(self, x, targets):
        """Summed cross entropy of the vocabulary scores of x (M, E) against targets (M,)."""
        return F.cross_entropy(self.mlm_head(x).float(), targets, reduction="sum")


class NextSentenceTask(nn.Module):
    """Pretrained encoder plus a tanh pooler on <cls> and a 2-way classifier: -> (N, 2)."""

    def __init__(self, bert_model):
        super().__init__()
        self.bert_model = bert_model
        self.linear_layer = nn.Linear(bert_model.ninp, bert_model.ninp)
        self.ns_span = nn.Linear(bert_model.ninp, 2)
        self.activation = nn.Tanh()
        for head in (self.linear_layer, self.ns_span):  # the encoder keeps its weights
            head.apply(init_weights)

    def forward(self, src, token_type_input=None, key_padding_mask=None):
        out = self.bert_model(src, token_type_input, key_padding_mask)
        return self.ns_span(self.activation(self.linear_layer(out[:, 0])))


class QuestionAnswerTask(nn.Module):
    """Pretrained encoder plus a span head: -> start and end logits, each (N, S).

    head 'original': the original's span head, GELU then a linear layer; 'bert': BERT's
    (and transformers' BertForQuestionAnswering), the linear layer alone.
    match_feature adds DrQA's exact-match feature: a learned embedding, added to the
    input embeddings, of match (N, S) 1 where a context word also occurs in the
    question. shape_feature adds a learned embedding of each token's shape in the raw
    text (SHAPE_NAMES), which lower-casing hides: match then holds match + 2 * shape.
    Without them (the original) forward's match argument is ignored.
    """
    HEADS = ("original", "bert")
    SHAPE_NAMES = ("none", "lower", "Capitalised", "UPPER", "number", "other")

    def __init__(self, bert_model, match_feature=False, head="original", shape_feature=False):
        super().__init__()
        if head not in self.HEADS:
            raise ValueError(f"head must be one of {self.HEADS}, not {head!r}")
        self.bert_model, self.head = bert_model, head
        self.activation = F.gelu if head == "original" else nn.Identity()
        self.qa_span = nn.Linear(bert_model.ninp, 2)
        self.qa_span.apply(init_weights)
        self.match_embed = self._feature(2) if match_feature else None
        self.shape_embed = self._feature(len(self.SHAPE_NAMES)) if shape_feature else None

    def _feature(self, n):
        """An input-feature embedding of n values, as large as the word embeddings it is
        added to (pretraining grows them past init_weights' 0.02), so that the feature is
        not lost in their sum."""
        embed = nn.Embedding(n, self.bert_model.ninp)
        std = float(self.bert_model.bert_embed.embed.weight.detach().float().std())
        nn.init.normal_(embed.weight, std=std)
        return embed

    def forward(self, src, token_type_input=None, key_padding_mask=None, match=None):
        extra = None
        match = match if match is not None else torch.zeros_like(src)
        if self.match_embed is not None:
            bit = match % 2 if self.shape_embed is not None else match
            extra = self.match_embed(bit)
        if self.shape_embed is not None:
            shape = self.shape_embed(match // 2)
            extra = shape if extra is None else extra + shape
        out = self.bert_model(src, token_type_input, key_padding_mask, extra)
        start, end = self.qa_span(self.activation(out)).unbind(-1)
        return start, end
