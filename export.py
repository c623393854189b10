"""Write a model trained here as a transformers folder (config.json, model.safetensors).

    python export.py --model mlm_bert.pt --out bert_hf/              # the encoder: BertModel
    python export.py --model full_mlm_model.pt --out mlm_hf/         # BertForMaskedLM
    python export.py --model ns_model.pt --out ns_hf/                # BertForNextSentencePrediction
    python export.py --model qa_model.pt --out qa_hf/                # BertForQuestionAnswering
    python export.py --model mlm_bert.pt --tokenizer wordpiece --vocab-file vocab.txt --out bert_hf/

then, in Python, `transformers.AutoModel.from_pretrained("bert_hf")` (or the class named
above). The folder's outputs equal this project's model within 1e-5; `--check` (needs
transformers) loads the folder with transformers and measures it. A model whose head
transformers does not compute (the original's QA head, --match-feature, pre-LayerNorm
layers) is refused, never written.

The vocabulary: a WordPiece vocab.txt (--tokenizer wordpiece) is copied with the
tokenizer's settings, so transformers' BertTokenizer reads the folder as it is. This
project's `basic_english` vocabulary (--save-vocab) has no transformers tokenizer: the
folder then holds the model alone, and its ids must come from this project's tokenizer.
"""
import argparse
import sys

import torch

import checkpoint
import data
import hf
import utils
import wordpiece


def parse(argv=None):
    p = utils.Parser(description=__doc__.split("\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a checkpoint of this project: an encoder (mlm_bert.pt, ns_bert.pt) or a "
                        "task model (full_mlm_model.pt, ns_model.pt, qa_model.pt)")
    p.add_argument("--tokenizer", default="basic_english", choices=["basic_english", "wordpiece"],
                   help="the tokenizer the model was trained with")
    p.add_argument("--save-vocab", default="torchtext_bert_vocab.pt",
                   help="the basic_english vocabulary the model was trained with")
    p.add_argument("--vocab-file", default="vocab.txt",
                   help="the WordPiece vocabulary (vocab.txt) the model was trained with; it is "
                        "copied into the folder with the tokenizer's settings")
    p.add_argument("--cased", action="store_true", help="the WordPiece vocabulary is cased")
    p.add_argument("--out", required=True, help="the folder to write (created if missing)")
    p.add_argument("--check", action="store_true",
                   help="load the written folder with transformers and compare its outputs "
                        "with this project's on a random batch")
    return p.parse_args(argv)


def check(model, arch, out):
    """Max abs difference between our model's outputs and those of transformers' arch
    loaded from out, on a random batch."""
    import transformers
    kw = dict(add_pooling_layer=False) if arch == "BertModel" else {}
    theirs, info = getattr(transformers, arch).from_pretrained(out, output_loading_info=True, **kw)
    missing = list(info["missing_keys"]) + list(info["unexpected_keys"])
    if missing:
        raise utils.UserError(f"transformers loaded {out} with weights missing or unused: {missing}")
    ntoken = model.config["ntoken"] if arch == "BertModel" else model.bert_model.config["ntoken"]
    ids = torch.randint(0, ntoken, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, out = model.eval()(ids), theirs.eval()(input_ids=ids)
    if arch == "BertModel":
        pairs = [(ours, out.last_hidden_state)]
    elif arch == "BertForQuestionAnswering":
        pairs = [(ours[0], out.start_logits), (ours[1], out.end_logits)]
    else:
        pairs = [(ours, out.logits)]
    return max((a - b).abs().max().item() for a, b in pairs)


def main(argv=None):
    a = parse(argv)
    _, vocab = wordpiece.from_args(a)
    ckpt = checkpoint.load(a.model, ("encoder", "mlm_task", "ns_task", "qa_task"))
    checkpoint.check_fit(ckpt, a.model, ckpt["config"], vocab.fingerprint)  # the vocabulary
    model = checkpoint.build(ckpt, a.model)
    if a.tokenizer == "wordpiece":
        arch = hf.write_folder(model, a.out, vocab.itos, lower_case=not a.cased)
        print(f"| wrote {arch} to {a.out} (config.json, model.safetensors, vocab.txt and the "
              "tokenizer's settings)")
    else:
        arch = hf.write_folder(model, a.out)
        print(f"| wrote {arch} to {a.out} (config.json, model.safetensors)")
        print(f"| no tokenizer files: transformers has no basic_english tokenizer; token ids must "
              f"come from this project's tokenizer and {a.save_vocab}")
    if a.check:
        print(f"| transformers computes the same: max abs difference {check(model, arch, a.out):.2e}")


if __name__ == "__main__":
    try:
        main()
    except (utils.UserError, data.DataError) as e:
        sys.exit(f"export.py: error: {e}")
