"""A pretrained BERT fine-tuned on SQuAD twice, in one run: by qa_task.py, and by
transformers' BertForQuestionAnswering from the same weights with the same budget. Needs
transformers.

    python versus_transformers.py --bert-model BERT_FOLDER --squad DIR --out runs/versus

Both take their settings from one qa_task.py command line, parsed by qa_task.py's own
parser: the same windows (this project's WordPiece tokenizer, --bptt, --doc-stride), the
same batches in the same order, AdamW with the same warm-up and decay, clipping and
autocast, for --epochs epochs. The last --holdout articles of the training file are kept
out of training: each side keeps its best epoch by F1 on them, and the evaluation file
is scored once, at the end, with the official v1.1 measure. Writes OUT/versus.json and
OUT/versus.md.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import dist
import hf
import monitor
import qa_task
import squad
import train
import utils
import wordpiece

HERE = Path(__file__).resolve().parent


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--bert-model", required=True, help="a transformers BERT folder (config.json, weights, vocab.txt)")
    add("--squad", required=True, help="folder with SQuAD v1.1 train/dev files (or the dev split)")
    add("--out", default="runs/versus", help="folder for models, logs and results")
    add("--epochs", type=int, default=1, help="epochs of each side")
    add("--lr", type=float, default=1e-4, help="AdamW learning rate of each side")
    add("--warmup", type=int, default=50, help="warm-up optimizer steps")
    add("--batch-size", type=int, default=32, help="windows per batch")
    add("--bptt", type=int, default=128, help="tokens per window")
    add("--doc-stride", type=int, default=64, help="context tokens between windows")
    add("--holdout", type=int, default=4, help="last articles of the training file used to pick the epoch")
    add("--amp", default="none", choices=["none", "bf16"], help="autocast of both sides")
    add("--seed", type=int, default=21192391, help="seed of both sides")
    add("--only", choices=["ours", "transformers"], default=None, help="run one side only")
    return p.parse_args(argv)


def squad_files(a):
    """(train, eval) files: the official ones where they exist, else the dev split."""
    try:
        return squad.squad_files(a.squad)[:2]
    except data.DataError as e:
        sys.exit(f"versus_transformers.py: error: {e}")


class Adapter(nn.Module):
    """transformers' BertForQuestionAnswering behind QuestionAnswerTask's forward."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def forward(self, src, token_type_input=None, key_padding_mask=None, match=None):
        out = self.hf(input_ids=src, token_type_ids=token_type_input,
                      attention_mask=None if key_padding_mask is None else (~key_padding_mask).long())
        return out.start_logits, out.end_logits


def qa_argv(a, files, out):
    """The qa_task.py flags of this comparison: both sides are trained as they say."""
    return [str(x) for x in [
        "--tokenizer", "wordpiece", "--bert-model", a.bert_model, "--qa-head", "bert",
        "--train-file", files[0], "--dev-file", files[1], "--holdout-articles", a.holdout,
        "--bptt", a.bptt, "--doc-stride", a.doc_stride, "--batch_size", a.batch_size,
        "--epochs", a.epochs, "--optimizer", "adamw", "--lr", a.lr, "--warmup", a.warmup,
        "--clip", 1.0, "--amp", a.amp, "--seed", a.seed, "--log-interval", 100,
        "--state-file", "", "--save", out / "ours_qa.pt",
        "--predictions", out / "ours_predictions.json", "--loss-log", out / "ours_loss.txt"]]


def run_transformers(a, files, out):
    """Fine-tune transformers' model as qa_task.py's flags say; returns its result dict."""
    import transformers
    args = qa_task.build_parser().parse_args(qa_argv(a, files, out))
    ctx = dist.Context()
    utils.seed_everything(args.seed)
    folder = Path(args.bert_model)
    lower = hf.lower_case(folder)
    tokenizer = wordpiece.WordPiece(folder / "vocab.txt", lower)
    vocab = wordpiece.load_vocab(folder / "vocab.txt", lower)
    model = Adapter(transformers.BertForQuestionAnswering.from_pretrained(folder))
    train_paragraphs, held_out = squad.read_squad(args.train_file, args.holdout_articles)
    _, windows = squad.squad_features(train_paragraphs, tokenizer, vocab, args.bptt,
                                      args.doc_stride, training=True)
    reading = squad.Reading.of(args)
    holdout = squad.Evaluator(held_out, reading, tokenizer, vocab, ctx)
    final = squad.Evaluator(args.dev_file, reading, tokenizer, vocab, ctx)
    batches = lambda epoch: data.Batches(windows, batch_size=args.batch_size, shuffle=True,
                                         seed=args.seed, epoch=epoch)
    steps = data.Batches.count(len(windows), args.batch_size)
    opt = train.Optimizer(args, model, steps)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    best, best_state, log = None, None, []
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        interval = 0.0
        for i, w in enumerate(batches(epoch)):
            with utils.autocast(torch.device("cpu"), args.amp):
                s, e = squad.qa_logits(model, w.input_ids, w.token_types, w.match, vocab.roles.pad)
                loss = (F.cross_entropy(s, w.start) + F.cross_entropy(e, w.end)) / 2
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step(scaler)
            interval += loss.item()
            if (i + 1) % args.log_interval == 0:  # the mean of the interval, as qa_task.py prints it
                print(f"| transformers | epoch {epoch} | {i + 1}/{steps} batches | loss "
                      f"{interval / args.log_interval:.3f} | {time.time() - start:.0f} s", flush=True)
                interval = 0.0
        r = holdout(model)
        log.append(dict(epoch=epoch, holdout_f1=r["f1"], holdout_exact=r["exact"]))
        print(f"| transformers | end of epoch {epoch} | holdout exact {r['exact']:.2f} | "
              f"f1 {r['f1']:.2f}", flush=True)
        if best is None or r["f1"] > best:
            best, best_state = r["f1"], {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    r = final(model)
    return dict(exact=r["exact"], f1=r["f1"], questions=r["questions"], epochs=log,
                seconds=time.time() - start)


def run_ours(a, files, out):
    """qa_task.py with those flags; returns its result dict from its results file."""
    start = time.time()
    subprocess.run([sys.executable, str(HERE / "qa_task.py"), *qa_argv(a, files, out)], check=True)
    records = monitor.read_results(out / "ours_loss.jsonl")
    test = records[-1]
    epochs = [dict(epoch=r["epoch"], holdout_f1=r["f1"], holdout_exact=r["exact"])
              for r in records if r["record"] == "valid"]
    return dict(exact=test["exact"], f1=test["f1"], questions=test["questions"], epochs=epochs,
                seconds=time.time() - start)


def main():
    a = parse()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = squad_files(a)
    saved = out / "versus.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for side, fn in (("ours", run_ours), ("transformers", run_transformers)):
        if a.only in (None, side):
            results[side] = fn(a, files, out)
            results["settings"] = {k: v for k, v in vars(a).items() if k != "only"}
            saved.write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| system | exact | F1 | questions | wall time |", "|---|---|---|---|---|"]
    for side, name in (("ours", "this project, qa_task.py"),
                       ("transformers", "transformers BertForQuestionAnswering")):
        if side in results:
            r = results[side]
            rows.append(f"| {name} | {r['exact']:.2f} | {r['f1']:.2f} | {r['questions']} | "
                        f"{r['seconds'] / 60:.1f} min |")
    (out / "versus.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
