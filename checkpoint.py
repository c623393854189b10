"""The one checkpoint format: what a file holds, how it is written, how it is read back.

Every file this project writes with torch.save is a dict of tensors and plain data:

    format "bert-example", version, kind, config (the encoder's sizes),
    vocab_fingerprint (sha256 of the vocabulary), model (a state dict), and per kind:
      encoder        the BertModel alone: what the next step loads (--bert-model)
      mlm_task, ns_task, qa_task   a whole task model (encoder and head)
      <kind>_state   a whole run: model, optimizer, schedule, epoch, step, random states

Files are written beside their target and renamed over it, so a crash or a full disk
never leaves half a file in place of a good one. They are read with weights_only=True:
a file holding Python objects is refused, never run.
"""
import os
import pickle
import tempfile
from pathlib import Path

import torch

import hf
import wordpiece
from model import BertModel, MLMTask, NextSentenceTask, QuestionAnswerTask
from utils import UserError

FORMAT = "bert-example"
VERSION = 1


def header(kind, config, vocab_fingerprint, **content):
    """A checkpoint dict of this format."""
    return dict(format=FORMAT, version=VERSION, kind=kind, config=dict(config),
                vocab_fingerprint=vocab_fingerprint, **content)


# --------------------------------------------------------------------------- writing

def atomic_write(path, write, main=True):
    """write(file object) into a temporary file beside path, then rename it over path.
    Only the main process writes (main=False does nothing). An error of the operating
    system (no space, no folder, no permission) is one UserError naming the file, and
    the previous file stays as it was."""
    if not main:
        return
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}; "
                        f"{'the previous file is unchanged' if path.exists() else 'nothing was written'}"
                        ) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj, path, main=True):
    atomic_write(path, lambda f: torch.save(obj, f), main)


def atomic_write_text(path, text, main=True):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), main)


def save_encoder(path, bert_model, vocab_fingerprint, main=True, **extra):
    """The encoder's weights, configuration and vocabulary fingerprint: what the next step loads."""
    atomic_save(header("encoder", bert_model.config, vocab_fingerprint,
                       model=bert_model.state_dict(), **extra), path, main)


def save_task(path, model, kind, vocab_fingerprint, main=True):
    """A whole task model (encoder and head) with the encoder's configuration and, for a
    QA model, which span head it has."""
    extra = dict(qa_head=model.head) if isinstance(model, QuestionAnswerTask) else {}
    atomic_save(header(kind, model.bert_model.config, vocab_fingerprint,
                       model=model.state_dict(), **extra), path, main)


# --------------------------------------------------------------------------- reading

def load(path, kind, map_location="cpu"):
    """Load a checkpoint of this project (tensors and plain data only) and check its kind
    (a name, or a tuple of the names accepted)."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} not found; pass the file written by the previous step")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} is not a checkpoint this project can read: it holds Python "
                        "objects besides tensors and plain data, which are never loaded "
                        "(they could run code)") from None
    except Exception as e:  # torch raises many types for foreign or damaged files
        raise UserError(f"{path} is not a checkpoint this project can read "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if ckpt.get("kind") not in kinds:
        hint = ("pass the encoder file, e.g. mlm_bert.pt, not the full task" if kinds == ("encoder",)
                else "pass a file this script wrote")
        raise UserError(f"{path} holds a {ckpt.get('kind')!r} checkpoint where "
                        f"{' or '.join(map(repr, kinds))} is expected ({hint})")
    return ckpt


def load_encoder(path, vocab, dropout=None):
    """Rebuild a BertModel from an encoder checkpoint, or from a transformers BERT folder
    (hf.py), refusing a vocabulary mismatch."""
    if Path(path).is_dir():
        imported = hf.read_folder(path)
        if imported.vocab_file is None:
            raise UserError(f"{path} holds no vocab.txt; a transformers BERT folder needs one")
        fingerprint = wordpiece.load_vocab(imported.vocab_file, imported.lower_case).fingerprint
        ckpt = dict(config=imported.config, model=imported.encoder.state_dict(),
                    vocab_fingerprint=fingerprint)
    else:
        ckpt = load(path, "encoder")
    config = dict(ckpt["config"])
    check_tokenizer(ckpt["vocab_fingerprint"], vocab.fingerprint, path)
    if ckpt["vocab_fingerprint"] != vocab.fingerprint or config["ntoken"] != len(vocab):
        raise UserError(f"{path} was trained with another vocabulary ({config['ntoken']} tokens) "
                        f"than the one loaded ({len(vocab)} tokens); pass the --save-vocab file "
                        "(or --vocab-file) written with that model")
    if dropout is not None:
        config["dropout"] = dropout
    model = BertModel(**config)
    model.load_state_dict(ckpt["model"])
    return model


def check_tokenizer(theirs, mine, path):
    """Refuse a checkpoint made with another tokenizer, naming it (a fingerprint starts
    with the tokenizer's name, but basic_english's)."""
    kind = lambda fp: fp.split(":")[0] if ":" in fp else "basic_english"
    if kind(theirs) != kind(mine):
        flag = "wordpiece" if kind(theirs).startswith("wordpiece") else "basic_english"
        cased = " --cased" if kind(theirs).endswith("-cased") else ""
        raise UserError(f"{path} was trained with the {kind(theirs)} tokenizer, and this run uses "
                        f"{kind(mine)}; pass --tokenizer {flag}{cased}")


def check_fit(ckpt, path, config, vocab_fingerprint):
    """Refuse a checkpoint made for another tokenizer, vocabulary or model sizes."""
    check_tokenizer(ckpt["vocab_fingerprint"], vocab_fingerprint, path)
    if ckpt["vocab_fingerprint"] != vocab_fingerprint:
        raise UserError(f"{path} was trained with another vocabulary than the one loaded; "
                        "pass the matching --save-vocab file")
    mine = {k: v for k, v in config.items() if k != "dropout"}
    theirs = {k: v for k, v in ckpt["config"].items() if k != "dropout"}
    if mine != theirs:
        raise UserError(f"{path} holds a model of other sizes ({theirs}) than this one ({mine}); "
                        "pass the flags it was trained with")


# the flags that add a task layer, by the layer's name
LAYER_FLAGS = {"match_embed": "--match-feature", "shape_embed": "--shape-feature",
               "neighbour_embed": "--match-neighbours"}


def check_heads(state, model, path):
    """Refuse weights whose task layers differ from the model's (a flag such as
    --match-feature or --tie-weights given to one run and not to the other)."""
    theirs, mine = set(state), set(model.state_dict())
    if theirs != mine:
        odd = sorted((theirs - mine) | (mine - theirs))
        flags = sorted({flag for k in odd for layer, flag in LAYER_FLAGS.items()
                        if k.startswith(layer + ".")})
        hint = (f"the layers of {', '.join(flags)}: give or leave out as in the run that made it"
                if flags else "pass the flags it was trained with (e.g. --match-feature)")
        raise UserError(f"{path} does not fit this model: its layers differ in {', '.join(odd[:4])} "
                        f"({hint})")
    if isinstance(model, MLMTask) and model.tied != MLMTask.state_is_tied(state):
        # loading untied weights into a tied model would overwrite the embeddings
        raise UserError(f"{path} was trained {'without' if model.tied else 'with'} --tie-weights; "
                        "pass the flags it was trained with")


def load_into(model, path, kinds, vocab_fingerprint):
    """Load a checkpoint of one of kinds into model after the fit and head checks;
    returns the checkpoint."""
    ckpt = load(path, kinds)
    check_fit(ckpt, path, model.bert_model.config, vocab_fingerprint)
    if (ckpt["kind"] == "qa_task" and isinstance(model, QuestionAnswerTask)
            and model.shape_embed is not None and "shape_embed.weight" not in ckpt["model"]):
        # --shape-feature from a QA model without it: the shape embedding starts as initialised
        ckpt["model"] = {**ckpt["model"], "shape_embed.weight": model.shape_embed.weight.detach()}
    check_heads(ckpt["model"], model, path)
    if isinstance(model, QuestionAnswerTask) and ckpt.get("qa_head", "original") != model.head:
        raise UserError(f"{path} has the {ckpt.get('qa_head', 'original')!r} span head; pass "
                        f"--qa-head {ckpt.get('qa_head', 'original')}")
    model.load_state_dict(ckpt["model"])
    return ckpt


def build(ckpt):
    """The model a checkpoint holds (an encoder or a task model), with its weights."""
    encoder, state = BertModel(**ckpt["config"]), ckpt["model"]
    if ckpt["kind"] == "encoder":
        model = encoder
    elif ckpt["kind"].startswith("mlm_task"):
        model = MLMTask.on(encoder, tie_weights=MLMTask.state_is_tied(state))
    elif ckpt["kind"].startswith("ns_task"):
        model = NextSentenceTask(encoder)
    else:
        model = QuestionAnswerTask(encoder, match_feature="match_embed.weight" in state,
                                   head=ckpt.get("qa_head", "original"),
                                   shape_feature="shape_embed.weight" in state,
                                   match_neighbours="neighbour_embed.weight" in state)
    model.load_state_dict(state)
    return model
