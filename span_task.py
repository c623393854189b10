"""Span-selection pretraining of the encoder (between next sentence and SQuAD): the QA
model of qa_task.py trained on questions made without labels from WikiText's text
(span_selection.py), new ones every epoch, and scored on questions made from its
validation text.

    python span_task.py --bert-model ns_bert.pt --data-dir WIKITEXT     # -> span_model.pt
    python qa_task.py --bert-model ns_bert.pt --checkpoint span_model.pt --data-dir SQUAD

Each question takes a span (a name, date or amount, a phrase, a word) out of a
sentence and keeps 6 to 12 of the sentence's words beside it; the model must find the
sentence in the context by those words and pick what the question lacks, as SQuAD asks.
Writes span_model.pt (the QA model, best on the validation questions; qa_task.py
starts from it with --checkpoint), span_predictions.json and span_loss.txt.
"""
import torch

import corpus
import data
import dist
import qa_task
import span_selection
import squad
import utils


def build_parser():
    p = utils.base_parser("BERT span-selection pretraining", lr=1e-3, clip=1.0, epochs=8,
                          batch_size=32, log_interval=100, save="span_model.pt",
                          seed=21192391, state="span_state.pt")
    qa_task.add_model_flags(p)
    add = p.add_argument
    add("--predictions", type=str, default="span_predictions.json",
        help="where to write the answers to the validation questions, {question id: text}")
    add("--loss-log", type=str, default="span_loss.txt", help="the loss log written at the end")
    return p


def main(args):
    qa_task.check_model_args(args)
    files = corpus.wikitext_files("WikiText2", corpus.dataset_dir("WikiText2", args.data_dir))
    ctx, tokenizer, vocab, recorder, raw, model = qa_task.start(args)
    reading = squad.Reading.of(args)
    made = {}  # the windows of the epoch last made

    def questions(split, seed):
        paragraphs = span_selection.questions_of(files[split], tokenizer, args.bptt, seed)
        return paragraphs, sum(len(p["qas"]) for p in paragraphs)

    def windows(paragraphs, show):
        """The training windows of these questions' paragraphs."""
        return squad.squad_features(paragraphs, tokenizer, vocab, args.bptt, args.doc_stride or None,
                                    training=True, show=show, shape=args.shape_feature)[1]

    train_paragraphs, n = questions("train", 0)
    valid_paragraphs, n_valid = questions("valid", 0)
    first = windows(train_paragraphs, ctx.main)
    made[1] = first.to(ctx.device)
    dev = squad.Evaluator(valid_paragraphs, reading, tokenizer, vocab, ctx)
    ctx.print0(f"| {n} questions made from {files['train'].name} ({len(first)} windows with "
               f"the answer inside), {n_valid} from {files['valid'].name}; new ones every epoch")

    def windows_of(epoch):
        """Epoch k's windows: questions made with seed k - 1, as many as the first epoch's."""
        if epoch not in made:
            paragraphs, n = questions("train", epoch - 1)
            more = windows(paragraphs, False)
            if len(more) > len(first):  # the first epoch's number of steps: a random subset
                g = torch.Generator().manual_seed(epoch)
                more = more[torch.randperm(len(more), generator=g)[:len(first)].sort().values]
            ctx.print0(f"| epoch {epoch}: {n} other questions (seed {epoch - 1}), {len(more)} windows")
            made.clear()
            made[epoch] = more.to(ctx.device)
        return made[epoch]

    qa_task.fit(args, ctx, vocab, recorder, raw, model, windows_of,
                data.Batches.count(len(first), args.batch_size, **ctx.shard(True)),
                dev, dev, "valid", "best")


if __name__ == "__main__":
    dist.cli(main, build_parser(), errors=(data.DataError,))
