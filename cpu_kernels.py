"""Faster CPU kernels for model.py's BERT, behind one switch (the tasks' --cpu-kernels):

    cpu_kernels.install(model)   # in place; model.py's plain path is what they compute

Each replaces one plain piece of model.py on the CPU, computes the same (to float
rounding; dropout draws its masks otherwise), falls back to the plain piece elsewhere (a
GPU, torch.compile), and is tested against it (tests/test_cpu_kernels.py). What each buys,
measured with `python bench.py --recipe --amp bf16 --kernels`: docs/speed.md.

- Dropout: a mask drawn 16 bits an element, four lanes of one 64-bit draw, where
  F.dropout draws a number per element (a third of a small model's step).
- Attention, while training: with dropout, written out with that dropout (SDPA's CPU
  kernels fall back to the same computation with the slow one); under bf16 autocast
  at fewer than BF16_MIN_KEYS keys, SDPA in fp32 (its bf16 kernel takes two to three
  times as long there).
- The masked-LM loss: the vocabulary scores written once and their softmax taken a few
  rows at a time while they sit in the cache (the plain path makes about ten passes
  over that memory), in fp32 or under bf16 autocast.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as plain

BF16_MIN_KEYS = 256  # below this many keys, bf16 training attention runs in fp32


KINDS = ("dropout", "attention", "loss")


def install(model, kinds=KINDS):
    """Give model's dropout, attention and masked-LM loss (those of kinds) this module's
    CPU kernels, in place (the same parameters, the same state dict); returns model."""
    swaps = {nn.Dropout: ("dropout", Dropout), plain.MultiheadAttention: ("attention", MultiheadAttention),
             plain.MLMTask: ("loss", MLMTask)}
    for module in model.modules():
        kind, kernel = swaps.get(type(module), (None, None))
        if kind in kinds:
            module.__class__ = kernel
            if kernel is MLMTask:
                module.logits_buffers = {}  # the model's own: nothing shared between models
    return model


def compiling():
    check = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return check()


def cpu_autocast_dtype():
    """The dtype of CPU autocast where it is on, else None (torch 2.3's names too)."""
    if hasattr(torch, "get_autocast_dtype"):  # torch 2.4 on
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


# --------------------------------------------------------------------------- dropout

def dropout(x, p, training=True):
    """F.dropout; on the CPU an element is dropped when its 16-bit lane of a 64-bit random
    draw is below p * 2**16 (p honoured to 1/65536), four lanes a draw, compared in one
    contiguous pass."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or compiling():
        return F.dropout(x, p, True)  # compiled code fuses its own random numbers
    n = x.numel()
    # random_(min, None) fills int64 with all 64 bits random: four uniform 16-bit lanes
    lanes = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None).view(torch.int16)
    keep = (lanes >= round(p * 65536) - 32768)[:n].view(x.shape)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))  # a float mask: the fastest product


class Dropout(nn.Dropout):
    def forward(self, x):
        return dropout(x, self.p, self.training)


# --------------------------------------------------------------------------- attention

class MultiheadAttention(plain.MultiheadAttention):
    def attention(self, q, k, v, attn_mask, p):
        if q.device.type == "cpu" and p > 0.0:
            # Written out with the fast dropout. As in SDPA's fallback, scores, softmax and
            # the weighted sum are fp32 even for bf16 inputs (rounded to bf16 twice under
            # autocast, the error would double); out_proj casts back.
            with torch.autocast("cpu", enabled=False):
                q, k, v = q.float(), k.float(), v.float()
                scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
                if attn_mask is not None:
                    scores = scores.masked_fill(~attn_mask, float("-inf"))
                return dropout(torch.softmax(scores, dim=-1), p) @ v
        if (q.device.type == "cpu" and k.size(2) < BF16_MIN_KEYS and torch.is_grad_enabled()
                and cpu_autocast_dtype() == torch.bfloat16):
            with torch.autocast("cpu", enabled=False):
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                      attn_mask=attn_mask)
        return super().attention(q, k, v, attn_mask, p)


# --------------------------------------------------------------------------- masked-LM loss

class MLMTask(plain.MLMTask):
    def loss(self, x, targets):
        w, b = self.mlm_head.weight, self.mlm_head.bias
        amp = cpu_autocast_dtype()
        if (not compiling() and x.device.type == "cpu"
                and (amp == torch.bfloat16 or (amp is None and x.dtype == w.dtype == torch.float32))):
            return LinearCrossEntropy.apply(x, w, b, targets, self.logits_buffers)
        return super().loss(x, targets)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross entropy of x @ weight.T + bias against targets (-100: ignored) on the
    CPU, in fp32 or under bf16 autocast (bf16 GEMMs and an fp32 softmax, as autocast
    computes them). The (M, V) scores are written once and never again in fp32: the
    softmax runs a few rows at a time while they sit in the cache, and the probabilities
    it leaves in the logits buffer are the backward's gradient (p - onehot).

    buffers ({dtype: tensor}, the model's): the logits buffer, tens of MB, goes from one
    step to the next (a fresh one of that size comes from the operating system every
    time, and filling its pages took longer than the matrix product written into it); a
    forward that finds none free, or too small, makes its own, so nothing is shared
    between two live graphs (gradient accumulation). The bias gradient is summed in fp32
    while each chunk of probabilities is in the cache.
    """
    CACHE_FLOATS = 2 ** 18  # fp32 scores of one chunk of rows: 1 MiB

    @staticmethod
    def forward(ctx, x, weight, bias, targets, buffers):
        dtype = torch.bfloat16 if cpu_autocast_dtype() == torch.bfloat16 else x.dtype
        with torch.autocast("cpu", enabled=False):
            xb, wb = x.to(dtype), weight.to(dtype)
            n = x.size(0) * weight.size(0)
            buffer = buffers.pop(dtype, None)
            if buffer is None or buffer.numel() < n:
                buffer = torch.empty(n + n // 8, dtype=dtype)  # room for the next batch's rows
            logits = buffer[:n].view(x.size(0), weight.size(0))
            if bias is None:
                torch.mm(xb, wb.t(), out=logits)  # (M, V), bf16 or fp32
            else:
                torch.addmm(bias.to(dtype), xb, wb.t(), out=logits)
            valid = targets != -100
            all_valid = bool(valid.all())
            picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1).float()
            lse = torch.empty(logits.size(0))
            keep = any(ctx.needs_input_grad)  # else an evaluation: the loss alone
            # sum over the rows of the probabilities: the bias gradient, less the targets
            col_sum = torch.zeros(logits.size(1)) if ctx.needs_input_grad[2] else None
            rows = max(1, LinearCrossEntropy.CACHE_FLOATS // max(logits.size(1), 1))
            for i in range(0, logits.size(0), rows):
                scores = logits[i:i + rows].float()  # in fp32: logits' own rows, in place
                top = scores.amax(1, keepdim=True)
                total = scores.sub_(top).exp_().sum(1, keepdim=True)
                lse[i:i + rows] = (top + total.log()).squeeze(1)
                if keep:
                    scores.div_(total)  # the probabilities
                    if not all_valid:  # ignored rows: no gradient
                        scores.mul_(valid[i:i + rows].unsqueeze(1))
                    if col_sum is not None:
                        col_sum += scores.sum(0)
                    if scores.dtype != logits.dtype:
                        logits[i:i + rows] = scores  # back into the bf16 buffer
            ctx.save_for_backward(xb, wb, logits, targets, valid, col_sum)
            ctx.buffer, ctx.buffers = (buffer if keep else None), buffers
            if not keep:
                _give_back(buffers, buffer)
            ctx.has_bias, ctx.used = bias is not None, False
            ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
            return torch.where(valid, lse - picked, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:
            raise RuntimeError("the fused masked-LM loss keeps its gradient in place and can "
                               "be backpropagated once only (no retain_graph)")
        ctx.used = True
        xb, wb, grad, targets, valid, col_sum = ctx.saved_tensors
        rows = torch.arange(grad.size(0))
        hit = -valid.to(grad.dtype)  # the one-hot of each valid row's target
        grad.index_put_((rows, targets.clamp(min=0)), hit, accumulate=True)
        scale = grad_loss.float()  # applied in fp32 to the results, not rounded into grad
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = (grad @ wb).float().mul_(scale).to(ctx.x_dtype) if need_x else None
        gw = (grad.t() @ xb).float().mul_(scale).to(ctx.w_dtype) if need_w else None
        gb = None
        if need_b and ctx.has_bias:
            gb = col_sum.index_put_((targets.clamp(min=0),), hit.float(), accumulate=True)
            gb = gb.mul_(scale)
        _give_back(ctx.buffers, ctx.buffer)
        ctx.buffer = None
        return gx, gw, gb, None, None


def _give_back(buffers, buffer):
    """Keep the larger of buffer and the free one of its dtype for the next step."""
    if buffer is not None:
        held = buffers.get(buffer.dtype)
        if held is None or held.numel() < buffer.numel():
            buffers[buffer.dtype] = buffer
