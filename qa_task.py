"""SQuAD v1.1 fine-tuning of the pretrained encoder (the third step).

    python qa_task.py --bert-model ns_bert.pt                       # .data/SQuAD1, downloaded
    python qa_task.py --bert-model ns_bert.pt --data-dir DIR --epochs 30
    python qa_task.py --bert-model ns_bert.pt --train-file T.json --dev-file D.json --doc-stride 64

The model reads <cls> question <sep> context <sep> (cut to --bptt) and scores each
position as the answer's start and end. Every dev question is scored with the
official SQuAD v1.1 exact match and F1 (a question whose answer was cut off scores
0); the original example's token-level numbers are printed beside them. Writes
qa_model.pt (best on dev F1), predictions.json ({question id: answer}, the format
the official evaluation script reads) and qa_loss.txt.
"""
import json

import torch
import torch.nn.functional as F

import data
import metrics
import utils
from model import QuestionAnswerTask


def build_parser():
    p = utils.base_parser("BERT fine-tuning for SQuAD v1.1 question answering", lr=5.0, clip=0.1,
                          epochs=2, batch_size=72, log_interval=200, save="qa_model.pt",
                          seed=21192391, state="qa_state.pt")
    add = p.add_argument
    add("--bert-model", type=str, default="ns_bert.pt", help="the encoder written by ns_task.py "
        "(or mlm_task.py)")
    add("--train-file", type=str, default=None,
        help="SQuAD-format training file (default: train-v1.1.json[.gz] in --data-dir)")
    add("--dev-file", type=str, default=None,
        help="SQuAD-format file evaluated every epoch (default: dev-v1.1.json[.gz] in --data-dir)")
    add("--test-file", type=str, default=None,
        help="SQuAD-format file for the final evaluation (default: the dev file again)")
    add("--doc-stride", type=int, default=0,
        help="if > 0, read long contexts in overlapping windows this many tokens apart and take "
             "the best span of all windows (0: one window, the original)")
    add("--max-answer-len", type=int, default=30, help="longest answer considered, in tokens")
    add("--dropout", type=float, default=None,
        help="dropout of the encoder (default: the value it was pretrained with)")
    add("--predictions", type=str, default="predictions.json",
        help="where to write the final answers, {question id: text}")
    add("--loss-log", type=str, default="qa_loss.txt", help="the loss log written at the end")
    return p


def check_args(args):
    utils.check_positive(args, "epochs", "batch_size", "bptt", "log_interval", "lr",
                         "max_answer_len")
    if args.doc_stride < 0:
        raise utils.UserError(f"--doc-stride must be 0 (off) or positive, got {args.doc_stride}")
    if args.bptt > 512:
        raise utils.UserError(f"--bptt {args.bptt} exceeds the model's 512 positions")
    utils.check_writable(args.save, args.predictions, args.loss_log)


def squad_path(args, flag, name):
    given = getattr(args, flag)
    if given:
        return given
    return data.squad_file(data.dataset_dir("SQuAD1", args.data_dir), name)


def qa_logits(model, inputs, types):
    """(N, S) -> start, end logits (N, S) with padding never chosen."""
    start, end = model(inputs, types, key_padding_mask=inputs == data.PAD)
    pad = inputs == data.PAD
    return start.float().masked_fill(pad, -1e4), end.float().masked_fill(pad, -1e4)


def qa_loss(model, batch):
    """Mean of the start and end cross-entropies (the original's loss)."""
    inputs, types, start, end = batch
    s_logits, e_logits = qa_logits(model, inputs, types)
    return (F.cross_entropy(s_logits, start) + F.cross_entropy(e_logits, end)) / 2


class Evaluator:
    """Scores a SQuAD file: loss where the answer is inside a window, and EM/F1 over all
    questions from the best span across each question's windows."""

    def __init__(self, path, args, tokenizer, vocab, device):
        self.examples, self.features = data.squad_features(
            data.read_squad(path), tokenizer, vocab, args.bptt, args.doc_stride or None)
        self.args, self.vocab, self.device = args, vocab, device
        f = self.features
        self.batches = data.Batches(*(f[k].to(device) for k in (
            "input_ids", "token_types", "start", "end", "ctx_start", "window_len")),
            batch_size=args.batch_size)

    def __call__(self, model):
        decoded = []

        def step(model, batch):
            inputs, types, start, end, ctx_start, window_len = batch
            s_logits, e_logits = qa_logits(model, inputs, types)
            decoded.append(torch.stack([
                *data.best_spans(s_logits, e_logits, ctx_start, window_len,
                                 self.args.max_answer_len),
                s_logits.argmax(1), e_logits.argmax(1)], 1).cpu())
            has = start >= 0
            loss = (F.cross_entropy(s_logits[has], start[has], reduction="sum")
                    + F.cross_entropy(e_logits[has], end[has], reduction="sum")) / 2
            return dict(loss=loss, count=has.sum())

        # Every rank scores the whole file (no reduction), so all take the same decisions.
        sums = utils.evaluate(model, self.batches, step, self.args, reduce=False)
        spans = torch.cat(decoded) if decoded else torch.zeros(0, 5)
        predictions = self.answers(spans)
        result = dict(loss=sums["loss"] / max(sums["count"], 1), predictions=predictions)
        result.update(self.official(predictions))
        result.update(self.original_style(spans))
        return result

    def answers(self, spans):
        """{id: text}: each question's best-scoring span over its windows, cut from the
        context through character offsets. A question with no span gets ''."""
        f = self.features
        best = {}
        for i, (score, s, e) in enumerate(spans[:, :3].tolist()):
            k = int(f["example"][i])
            if score > float("-inf") and (k not in best or score > best[k][0]):
                w = int(f["window"][i]) - int(f["ctx_start"][i])
                best[k] = (score, int(s) + w, int(e) + w)
        out = {}
        for k, ex in enumerate(self.examples):
            if k in best:
                _, s, e = best[k]
                out[ex["id"]] = ex["context"][ex["spans"][s][0]:ex["spans"][e][1]]
            else:
                out[ex["id"]] = ""
        return out

    def official(self, predictions):
        """SQuAD v1.1 exact match and F1 (percent), averaged over every question."""
        em = f1 = 0.0
        for ex in self.examples:
            pred = predictions[ex["id"]]
            em += metrics.metric_max_over_ground_truths(metrics.exact_match_score, pred,
                                                        ex["answers"])
            f1 += metrics.metric_max_over_ground_truths(metrics.f1_score, pred, ex["answers"])
        n = max(len(self.examples), 1)
        return dict(exact=100.0 * em / n, f1=100.0 * f1 / n)

    def original_style(self, spans):
        """The original example's numbers: only questions whose every answer lies in the
        first window, start and end taken as independent argmaxes, pairs with start > end
        skipped, answers compared as vocabulary tokens. Not comparable with SQuAD results."""
        f, itos = self.features, self.vocab.itos
        samples, seen = [], set()
        for i, (_, _, _, s, e) in enumerate(spans.long().tolist()):
            k = int(f["example"][i])
            if k in seen:
                continue  # only the first window, as the original had only that
            seen.add(k)
            c, wlen, ids = int(f["ctx_start"][i]), int(f["window_len"][i]), f["input_ids"][i]
            gold = self.examples[k]["gold"]
            if s > e or any(gs < 0 or ge >= wlen for gs, ge in gold):
                continue
            tokens = lambda a, b: [itos[t] for t in ids[a:b + 1].tolist()]
            samples.append(([tokens(gs + c, ge + c) for gs, ge in gold], tokens(s, e)))
        return dict(orig_exact=metrics.compute_qa_exact(samples),
                    orig_f1=metrics.compute_qa_f1(samples), orig_n=len(samples))


def describe(r, total):
    return (f"loss {r['loss']:5.2f} | exact {r['exact']:8.3f}% | f1 {r['f1']:8.3f}%\n"
            f"| original-style token metrics ({r['orig_n']} of {total} questions) | "
            f"exact {r['orig_exact']:8.3f}% | f1 {r['orig_f1']:8.3f}%")


def main(args):
    check_args(args)
    tokenizer, vocab = data.Tokenizer(), data.Vocab.load(args.save_vocab)
    device = utils.setup(args, f"tokenizer: {tokenizer.name} ({data.BACKEND})")
    raw, model = utils.finetune_model(QuestionAnswerTask, args, vocab, device)

    train_path = squad_path(args, "train_file", "train-v1.1.json")
    dev_path = squad_path(args, "dev_file", "dev-v1.1.json")
    examples, feats = data.squad_features(data.read_squad(train_path), tokenizer, vocab,
                                          args.bptt, args.doc_stride or None, training=True)
    train = [feats[k].to(device) for k in ("input_ids", "token_types", "start", "end")]
    dev = Evaluator(dev_path, args, tokenizer, vocab, device)
    utils.print0(f"| train: {len(examples)} questions, {len(train[0])} windows with the answer "
                 f"inside | dev: {len(dev.examples)} questions, {len(dev.features['start'])} windows")

    def validate(model):
        r = dev(model)
        return r["loss"], "valid " + describe(r, len(dev.examples)), -r["f1"]

    batches = lambda epoch: data.Batches(*train, batch_size=args.batch_size, shuffle=True,
                                         seed=args.seed, epoch=epoch, **utils.shard(True))
    train_log, val_log = utils.Trainer(
        args, model, raw, qa_loss, batches, len(batches(1)),
        validate, lambda: utils.save_task(args.save, raw, "qa_task", vocab.fingerprint),
        "qa_task", vocab.fingerprint).fit()

    utils.load_task(raw, args.save, "qa_task", vocab.fingerprint)
    final = Evaluator(args.test_file, args, tokenizer, vocab, device) if args.test_file else dev
    r = final(model)
    which = "test" if args.test_file else "dev"
    utils.finish(args, f"{which} " + describe(r, len(final.examples)), train_log, val_log,
                 r["loss"])
    utils.atomic_write_text(args.predictions, json.dumps(r["predictions"], ensure_ascii=False))
    utils.print0(f"| wrote {len(r['predictions'])} answers to {args.predictions}")


if __name__ == "__main__":
    utils.cli(main, build_parser(), errors=(data.DataError,))
