"""Benchmark: this project's training steps against transformers' on the same machine,
in the same run.

    python bench.py                          # BERT-base sizes, batch 8, seq 128, fp32
    python bench.py --amp bf16               # fp32 and bf16 autocast, ours and transformers
    python bench.py --recipe --amp bf16      # the laptop recipe's sizes and optimizer
    python bench.py --device cuda --batch 64 --amp bf16 --optimizer adamw \
        --mask-draw per-sequence --compile   # a GPU step: MFU against the card's bf16 peak
    python bench.py --emsize 128 --nhid 512 --nlayers 2 --nhead 2   # a tiny model

Prints, for a masked-LM step and a QA step (forward, backward, optimizer update; span
selection, recipe.py's third stage, is the QA step on other questions), the time per
step, tokens/s, the share of the machine's peak GEMM rate (measured here first; on a GPU
also the model FLOPs utilisation against the card's dense bf16 peak, from GPU_PEAKS)
and the ratio to transformers; then the data pipeline alone (MLM and QA batches/s) and
its share of this project's step time. transformers is optional (only this script uses
it): without it only this project's numbers are printed. The models' steps are timed
in turns (one step of each per round), so that a machine whose speed drifts during the
run (a shared one) weighs on all of them alike.
"""
import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import corpus
import data
import cpu_kernels
import samples
import store
import train
from model import MAX_POSITIONS, BertModel, MLMTask, QuestionAnswerTask
from utils import autocast


# Dense bf16 tensor-core peaks, TFLOP/s, from the vendor's data sheets: (what the device
# name contains, the card, peak). The first match counts, so the specific names come first.
GPU_PEAKS = (
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H100", "H100 SXM", 989.4),
    ("H200", "H200", 989.4),
    ("GH200", "GH200", 989.4),
    ("A100", "A100", 312.0),
    ("L40S", "L40S", 362.1),
    ("L40", "L40", 181.0),
    ("L4", "L4", 121.0),
)

# The laptop recipe's step (recipe.py, docs/recipe.md): its sizes, optimizer and tied weights.
RECIPE = dict(emsize=128, nhid=512, nlayers=2, nhead=2, vocab=28786, batch=32, seq=128,
              dropout=0.0, optimizer="adamw", tie_weights=True, mask_mode="bert")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--emsize", type=int, default=768)
    p.add_argument("--nhid", type=int, default=3072)
    p.add_argument("--nlayers", type=int, default=12)
    p.add_argument("--nhead", type=int, default=12)
    p.add_argument("--vocab", type=int, default=33280)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout of this project's models")
    p.add_argument("--no-ffn-dropout", action="store_true",
                   help="as mlm_task.py --no-ffn-dropout: BERT's layout, no dropout inside the "
                        "feed-forward block (transformers' models never have one there)")
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps of each model (after one warm-up step), taken in turns")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--amp-only", action="store_true",
                   help="with --amp bf16, time the bf16 steps only, not the fp32 ones as well "
                        "(on a GPU with --compile this halves the compiling)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile this project's model (MODE as the tasks' --compile)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="the update of every step (adamw: fused where torch has it, as in the tasks)")
    p.add_argument("--cpu-kernels", choices=["on", "off"], default="on",
                   help="as the tasks' --cpu-kernels: this project's steps with cpu_kernels.py's CPU "
                        "kernels, or on model.py's plain PyTorch path")
    p.add_argument("--kernels", action="store_true",
                   help="on the CPU, also time this project's steps on the plain path and with "
                        "each of cpu_kernels.py's kernels alone, in the same rounds: what each buys")
    p.add_argument("--tie-weights", action="store_true",
                   help="the masked-LM output projection is the word embedding matrix")
    p.add_argument("--mask-draw", choices=["per-token", "per-sequence"], default="per-token",
                   help="as mlm_task.py --mask-draw: per-sequence has fixed shapes")
    p.add_argument("--mask-mode", choices=["mask", "bert"], default="mask")
    p.add_argument("--recipe", action="store_true",
                   help="the laptop recipe's step: " + ", ".join(f"{k} {v}" for k, v in RECIPE.items())
                        + " (these replace the flags above)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak, for a card GPU_PEAKS does not know")
    a = p.parse_args(argv)
    if a.recipe:
        for k, v in RECIPE.items():
            setattr(a, k, v)
    return a


def flops_per_token(config, seq_len, masked_frac=1.0, last_frac=1.0):
    """Approximate training FLOPs per token (forward + backward = 3x forward matmuls)."""
    e, f, n, v = config["ninp"], config["nhid"], config["nlayers"], config["ntoken"]
    per_layer = 2 * (4 * e * e + 2 * e * f) + 2 * 2 * seq_len * e  # projections + attention
    head = 2 * (e * e + e * v) * masked_frac
    # MLMTask's last layer projects queries, keys and values everywhere and the rest
    # only at the masked positions: last_frac is the share of positions it computes.
    last = 2 * 3 * e * e + last_frac * (per_layer - 2 * 3 * e * e)
    return 3 * ((n - 1) * per_layer + last + head)


def card_peak(device, given=None):
    """(card, dense bf16 peak FLOP/s) of a CUDA device, or None where it is unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if given:
        return name, given * 1e12
    for part, card, tflops in GPU_PEAKS:
        if part in name:
            return card, tflops * 1e12
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps, device):
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def timed_together(fns, steps, device):
    """Mean seconds per call of each fn, timed in turns (one call of each per round, after
    one warm-up call each), so that a machine slowing down or speeding up during the run
    weighs on every fn alike and their ratios stay fair."""
    for fn in fns:
        fn()
    sync(device)
    totals = [0.0] * len(fns)
    for _ in range(steps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            sync(device)
            totals[i] += time.perf_counter() - start
    return [t / steps for t in totals]


def peak_gemm(device, dtype, n=2048):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 3 if device.type == "cpu" else 50
    return 2 * n ** 3 / timed(lambda: a @ b, reps, device)


def make_optimizer(model, a):
    if a.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3)
    params = list(model.parameters())
    return torch.optim.AdamW(params, lr=1e-4, fused=train.fused_adamw(params) or None)


def train_step(model, opt, device, amp, forward):
    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = forward(model)
        loss.backward()
        opt.step()
    return step


def hf_models(a):
    try:
        import transformers
    except ImportError:
        return None
    cfg = transformers.BertConfig(vocab_size=a.vocab, hidden_size=a.emsize, num_hidden_layers=a.nlayers,
                                  num_attention_heads=a.nhead, intermediate_size=a.nhid,
                                  max_position_embeddings=MAX_POSITIONS, attn_implementation="sdpa",
                                  hidden_dropout_prob=a.dropout, attention_probs_dropout_prob=a.dropout)
    return (f"transformers {transformers.__version__}", transformers.BertForMaskedLM(cfg),
            transformers.BertForQuestionAnswering(cfg))


def random_store(folder, vocab, lines, length):
    """A token store of `lines` lines of `length` random ids below vocab (store.Tokens)."""
    ids = torch.randint(len(data.SPECIALS), vocab, (lines, length)).tolist()
    (folder / "ids.txt").write_text("".join(" ".join(map(str, line)) + "\n" for line in ids))

    def encode(text_lines):
        flat = [int(t) for line in text_lines for t in line.split()]
        return np.array(flat, np.int64), np.full(len(text_lines), length)
    itos = [str(i) for i in range(vocab)]
    source = store.Source("random", [folder / "ids.txt"], corpus.read_lines, encode, "ids",
                          data.Vocab(itos, roles=data.BASIC_ROLES, tag="ids"))
    built = store.build(source, folder / "store", workers=1, show=False)
    return built.lines(0, built.num_lines)


def main():
    a = parse()
    device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.manual_seed(0)
    tokens = a.batch * a.seq
    print(f"| device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"batch {a.batch} x seq {a.seq} | {a.nlayers} layers x {a.emsize}, {a.nhead} heads, "
          f"{a.nhid} hidden, vocab {a.vocab}{', tied' if a.tie_weights else ''}, dropout {a.dropout:g}"
          f"{' (none in the FFN)' if a.no_ffn_dropout else ''} | amp {a.amp} | "
          f"{a.optimizer} | masks {a.mask_draw} | compile {a.compile or 'off'} | CPU kernels "
          f"{a.cpu_kernels}")
    peak32 = peak_gemm(device, torch.float32)
    peak = peak_gemm(device, torch.bfloat16) if a.amp == "bf16" else peak32
    print(f"| peak GEMM measured: fp32 {peak32 / 1e9:.0f} GFLOP/s"
          + (f", bf16 {peak / 1e9:.0f} GFLOP/s" if a.amp == "bf16" else ""))

    src = data.add_cls(torch.randint(len(data.SPECIALS), a.vocab, (a.batch, a.seq - 1))).to(device)
    if a.mask_draw == "per-sequence":
        inputs, index, valid, picked = data.mask_per_sequence(src, 0.15, a.vocab, a.mask_mode)
        masked = torch.zeros_like(src, dtype=torch.bool).scatter_(1, index, valid)
        targets = picked.masked_fill(~valid, -100).flatten()
        mlm_input = dict(masked_index=index)
    else:
        inputs, masked, targets = data.mask_tokens(src, 0.15, a.vocab, a.mask_mode)
        mlm_input = dict(masked_positions=masked)
    labels = torch.where(masked, src, -100)
    starts = torch.randint(1, a.seq, (a.batch,), device=device)
    ends = torch.clamp(starts + 3, max=a.seq - 1)
    frac = masked.float().mean().item()

    encoder = BertModel(a.vocab, a.emsize, a.nhead, a.nhid, a.nlayers, a.dropout,
                        inner_dropout=not a.no_ffn_dropout)
    plain_mlm = MLMTask.on(encoder, tie_weights=a.tie_weights).to(device)
    cfg = plain_mlm.bert_model.config
    predicted = (targets != -100).sum()
    mode = None if a.compile in (None, "default") else a.compile

    def steps(name, kinds):
        """(name, masked-LM model, its step's forward, QA model, its forward) with these
        of cpu_kernels.py's kernels, on a copy of the same weights."""
        mlm = cpu_kernels.install(copy.deepcopy(plain_mlm), kinds)
        qa = QuestionAnswerTask(mlm.bert_model).to(device)
        run_mlm = torch.compile(mlm, mode=mode) if a.compile else mlm
        run_qa = torch.compile(qa, mode=mode) if a.compile else qa

        def ours_mlm(m):  # the mean, as transformers' loss; mlm_task.py's head computes the sum
            return run_mlm(inputs, **mlm_input, targets=targets) / predicted

        def ours_qa(m):
            s, e = run_qa(inputs)
            return (F.cross_entropy(s.float(), starts) + F.cross_entropy(e.float(), ends)) / 2
        return name, mlm, ours_mlm, qa, ours_qa

    variants = [steps("this project", cpu_kernels.KINDS if a.cpu_kernels == "on" else ())]
    if a.kernels and device.type == "cpu" and not a.compile:
        variants += [steps("this project, plain", ())]
        variants += [steps(f"this project, {kind} kernel alone", (kind,)) for kind in cpu_kernels.KINDS]

    # (name, amp, step, flops per token): every step is timed in the same rounds.
    # This project's steps in fp32 too when --amp bf16 (not with --amp-only): the bf16
    # speed-up from one run.
    precisions = [a.amp] if a.amp_only else list(dict.fromkeys(["none", a.amp]))
    runs = []
    for amp in precisions:
        for who, mlm, ours_mlm, qa, ours_qa in variants:
            for name, model, fwd, fpt in (
                    (f"{who}, masked LM", mlm, ours_mlm, flops_per_token(cfg, a.seq, frac, frac)),
                    (f"{who}, QA", qa, ours_qa, flops_per_token(cfg, a.seq, 0.0))):
                opt = make_optimizer(model, a)
                runs.append((name, amp, train_step(model, opt, device, amp, fwd), fpt))
    hf = hf_models(a)
    if hf is None:
        print("| transformers is not installed (pip install transformers): no comparison")
    else:
        version, hf_mlm, hf_qa = hf
        hf_mlm.to(device), hf_qa.to(device)
        fwd_mlm = lambda m: m(input_ids=inputs, labels=labels).loss
        fwd_qa = lambda m: m(input_ids=inputs, start_positions=starts, end_positions=ends).loss
        for amp in precisions:
            for name, model, fwd, fpt in (
                    (f"{version}, masked LM", hf_mlm, fwd_mlm, flops_per_token(cfg, a.seq, 1.0)),
                    (f"{version}, QA", hf_qa, fwd_qa, flops_per_token(cfg, a.seq, 0.0))):
                opt = make_optimizer(model, a)
                runs.append((name, amp, train_step(model, opt, device, amp, fwd), fpt))
    times = timed_together([step for _, _, step, _ in runs], a.steps, device)
    rows = [(name, amp, t, fpt) for (name, amp, _, fpt), t in zip(runs, times)]

    card = card_peak(device, a.peak_tflops)
    if card:
        print(f"| MFU: model FLOPs per second over the {card[0]}'s dense bf16 peak, "
              f"{card[1] / 1e12:.0f} TFLOP/s")
    elif device.type == "cuda":
        print(f"| MFU: {torch.cuda.get_device_name(device)} is not in bench.GPU_PEAKS; give its "
              "dense bf16 peak with --peak-tflops")
    mfu_head = f" {'MFU':>5s} |" if card else ""
    label = {"none": "fp32", "bf16": "bf16"}
    # The ratio to transformers' step in each timed precision, both kinds of step.
    base = {(kind, amp): t for name, amp, t, _ in rows if name.startswith("transformers")
            for kind in [name.split(", ")[-1]]}
    heads = [f"vs transformers {label[amp]}" for amp in precisions]
    print(f"| {'step':42s} | {'amp':4s} | {'ms/step':>9s} | {'tokens/s':>9s} | {'of peak':>7s} |"
          f"{mfu_head}" + "".join(f" {h:>20s} |" for h in heads))
    for name, amp, t, fpt in rows:
        kind = name.split(", ")[-1]
        share = fpt * tokens / t / (peak if amp == "bf16" else peak32)
        ratios = [f"{base[(kind, b)] / t:.2f}x" if (kind, b) in base else "-" for b in precisions]
        mfu = f" {fpt * tokens / t / card[1]:5.3f} |" if card else ""
        print(f"| {name:42s} | {amp:4s} | {t * 1000:9.1f} | {tokens / t:9.0f} | {share:7.2f} |{mfu}"
              + "".join(f" {r:>20s} |" for r in ratios))

    own = {(name, amp): t for name, amp, t, _ in rows if name.startswith("this project")}
    if len(precisions) > 1:
        print("| " + a.amp + " speed-up of this project's steps over its fp32 ones: " + ", ".join(
            f"{kind} {own[(name, 'none')] / own[(name, a.amp)]:.2f}x"
            for name, kind in (("this project, masked LM", "masked LM"), ("this project, QA", "QA"))))
    if len(variants) > 1:  # --kernels: the plain step's time over each one's
        for who in ["this project"] + [v[0] for v in variants[2:]]:
            ratios = [f"{kind} {label[amp]} "
                      f"{own[('this project, plain, ' + kind, amp)] / own[(who + ', ' + kind, amp)]:.2f}x"
                      for amp in precisions for kind in ("masked LM", "QA")]
            print(f"| speed-up over the plain path, {'every kernel' if who == 'this project' else who}: "
                  + ", ".join(ratios))

    # The data pipeline alone: what a training loop does per batch besides the model (for
    # masked LM: shuffled blocks read from a token store, masked).
    with tempfile.TemporaryDirectory() as tmp:
        blocks = samples.Blocks(random_store(Path(tmp), a.vocab, 200 * a.batch, a.seq - 1),
                                a.seq - 1, device)
        order = samples.Shuffle(len(blocks), 0, 1, samples.ORDER)
        batches = [iter(())]

        def next_batch():
            batch = next(batches[0], None)
            if batch is None:  # the next epoch
                batches[0] = iter(data.Batches(blocks, batch_size=a.batch, order=order))
                batch = next(batches[0])
            return batch
        draw = data.mask_per_sequence if a.mask_draw == "per-sequence" else data.mask_tokens
        t_mlm = timed(lambda: draw(data.add_cls(next_batch()), 0.15, a.vocab, a.mask_mode), 50,
                      device)
    feats = [torch.randint(0, a.vocab, (a.batch * 200, a.seq), device=device) for _ in range(2)]
    feats += [torch.randint(0, a.seq, (a.batch * 200,), device=device) for _ in range(2)]
    batches = data.Batches(*feats, batch_size=a.batch, shuffle=True)
    t_qa = timed(lambda: list(batches), 3, device) / len(batches)
    step_mlm, step_qa = (own[(f"this project, {kind}", a.amp)] for kind in ("masked LM", "QA"))
    print(f"| data pipeline: MLM {1 / t_mlm:,.0f} batches/s ({100 * t_mlm / step_mlm:.2f}% of this "
          f"project's MLM step), QA {1 / t_qa:,.0f} batches/s ({100 * t_qa / step_qa:.2f}% of its QA step)")


if __name__ == "__main__":
    main()
