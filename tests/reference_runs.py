"""Tiny training runs through the three task scripts, whose final weights pin down the
project's behaviour: tests/test_unchanged.py compares them bitwise with the weights in
tests/reference/, produced by the same runs of earlier code.

    python tests/reference_runs.py OUT_DIR     # run them and write OUT_DIR/reference.pt

The runs use one thread and the generic CPU kernels, so that the numbers depend as
little as possible on the machine; they still depend on the torch version (its
kernels change), so the reference file is named by it.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from conftest import write_squad, write_wikitext  # noqa: E402

TINY = ["--emsize", "32", "--nhid", "64", "--nlayers", "2", "--nhead", "2", "--bptt", "16",
        "--cache-dir", "", "--device", "cpu"]
# Each run exercises a different part of the training loop: tied weights, BERT's 80/10/10
# masking and AdamW with warm-up, the original's order of blocks; next-sentence pairs, SGD
# with gradient accumulation and its plateau decay; doc-stride windows, the match feature
# and fixed word vectors; span selection.
RUNS = [
    ("mlm_task.py", [*TINY, "--data-dir", "{wt}", "--batch_size", "4", "--epochs", "2",
                     "--dropout", "0.1", "--tie-weights", "--mask-mode", "bert",
                     "--optimizer", "adamw", "--lr", "1e-3", "--warmup", "5",
                     "--log-interval", "20", "--order", "sequential"]),
    ("ns_task.py", ["--bert-model", "mlm_bert.pt", "--dataset", "WikiText2", "--data-dir", "{wt}",
                    "--cache-dir", "", "--device", "cpu", "--batch_size", "8", "--bptt", "48",
                    "--min_sentence_len", "10", "--epochs", "2", "--grad-accum", "2",
                    "--lr", "0.5", "--log-interval", "5"]),
    ("span_task.py", ["--bert-model", "ns_bert.pt", "--data-dir", "{wt}", "--device", "cpu",
                      "--batch_size", "8", "--bptt", "48", "--epochs", "2", "--optimizer", "adamw",
                      "--lr", "1e-3", "--match-feature", "--save", "span.pt",
                      "--predictions", "span.json", "--loss-log", "span_loss.txt",
                      "--log-interval", "20"]),
    ("qa_task.py", ["--bert-model", "ns_bert.pt", "--train-file", "train.json",
                    "--dev-file", "dev.json", "--device", "cpu", "--batch_size", "8",
                    "--bptt", "32", "--doc-stride", "8", "--epochs", "2", "--optimizer", "adamw",
                    "--lr", "1e-3", "--warmup", "3", "--match-feature", "--freeze-embeddings",
                    "--checkpoint", "span.pt", "--dropout", "0.1", "--log-interval", "5"]),
]
WEIGHTS = ["full_mlm_model.pt", "mlm_bert.pt", "ns_model.pt", "ns_bert.pt", "span.pt",
           "qa_model.pt"]
ANSWERS = ["span.json", "predictions.json"]


def reference_name():
    return f"torch-{torch.__version__.split('+')[0]}.pt"


def run_all(out, root=ROOT):
    """Run RUNS in folder out with the scripts of root; returns {file: state dict} and
    {file: answers}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wt = write_wikitext(out / "wt", (200, 40, 40))
    write_squad(out / "train.json", copies=4)
    write_squad(out / "dev.json", prefix="d")
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", ATEN_CPU_CAPABILITY="default", MKL_CBWR="COMPATIBLE")
    for script, args in RUNS:
        argv = [a.format(wt=wt) for a in args]
        proc = subprocess.run([sys.executable, str(Path(root) / script), *argv], cwd=out, env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")
    weights = {f: torch.load(out / f, map_location="cpu", weights_only=True)["model"]
               for f in WEIGHTS}
    answers = {f: json.loads((out / f).read_text(encoding="utf-8")) for f in ANSWERS}
    return weights, answers


def digest(state):
    """One sha256 over a state dict's names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


if __name__ == "__main__":
    target = Path(sys.argv[1])
    weights, answers = run_all(target)
    path = target / reference_name()
    torch.save(dict(weights=weights, answers=answers), path)
    for f, state in weights.items():
        print(f"{f}: {digest(state)}")
    print(f"wrote {path}")
