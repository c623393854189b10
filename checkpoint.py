"""The one checkpoint format: what a file holds, how it is written, how it is read back.

Every file this project writes with torch.save is a dict of tensors and plain data:

    format "bert-example", version, kind, config (the encoder's sizes),
    vocab_fingerprint (sha256 of the vocabulary), model (a state dict), and per kind:
      encoder        the BertModel alone: what the next step loads (--bert-model)
      mlm_task, ns_task, qa_task   a whole task model (encoder and head)
      <kind>_state   a whole run: model, optimizer, schedule, epoch, step, random states

Files are written beside their target, synced, and renamed over it (the folder synced
after), so a crash, a full disk or a power loss never leaves half a file, or an empty
one, in place of a good one. A file of a format version this code does not read is
refused with one line. They are read with weights_only=True:
a file holding Python objects is refused, never run.
"""
import os
import pickle
import socket
import tempfile
from pathlib import Path

import torch

import hf
import wordpiece
from model import BertModel, MLMTask, NextSentenceTask, QuestionAnswerTask
from utils import UserError, check_tensors, check_version, describe_error, sync_folder

FORMAT = "bert-example"
VERSION = 1
READS = (1,)  # the versions load() reads


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
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        sync_folder(path.resolve().parent)  # and so is the new name
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


def lock_run(path):
    """An exclusive lock on path (fcntl.flock), held as long as the returned file stays
    open: the process that holds it is the one writer of a run's files. A second one is
    refused with one line naming the holder (pid and host, which the file records). The
    operating system frees the lock when its process ends, however it ends, so a lock
    left by a dead process never blocks. Without fcntl (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return None
    path = Path(path)
    try:
        f = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write the lock file {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"another run is writing these files: {holder} holds {path}; wait for "
                        "it to end, or give this run its own --state-file and outputs") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


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
                        f"({describe_error(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint written by this project")
    check_version(path, "checkpoint", ckpt.get("version"), READS)
    state = ckpt.get("model")
    if not (isinstance(ckpt.get("config"), dict) and isinstance(ckpt.get("vocab_fingerprint"), str)
            and isinstance(ckpt.get("kind"), str) and isinstance(state, dict)
            and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise UserError(f"{path} is a damaged checkpoint: its kind, config, vocab_fingerprint or "
                        "model (a dict of tensors) is missing or of the wrong type")
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
    if ckpt["vocab_fingerprint"] != vocab.fingerprint or config.get("ntoken") != len(vocab):
        raise UserError(f"{path} was trained with another vocabulary ({config.get('ntoken')} "
                        f"tokens) than the one loaded ({len(vocab)} tokens); pass the --save-vocab "
                        "file (or --vocab-file) written with that model")
    if dropout is not None:
        config["dropout"] = dropout
    check_encoder(config, ckpt["model"], path)
    return load_weights(BertModel(**config), ckpt["model"], path)


def check_encoder(config, state, path, prefix=""):
    """Refuse (one line) an encoder configuration that cannot be built, or weights (the
    tensors of state under prefix) of other names or shapes than it has: checked on the
    meta device, before anything of the configuration's sizes is allocated."""
    try:
        with torch.device("meta"):
            skeleton = BertModel(**config)
    except (TypeError, ValueError, KeyError, RuntimeError, OverflowError) as e:
        raise UserError(f"{path}: the encoder its configuration describes cannot be built "
                        f"({describe_error(e)}); the file is "
                        "damaged") from None
    check_tensors({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                  skeleton.state_dict(), path)


def load_weights(model, state, path):
    """model with the weights of state, after check_tensors."""
    check_tensors(state, model.state_dict(), path)
    model.load_state_dict(state)
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
LAYER_FLAGS = {"match_embed": "--match-feature", "shape_embed": "--shape-feature"}


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
    load_weights(model, ckpt["model"], path)
    return ckpt


def build(ckpt, path):
    """The model a checkpoint (from load(path, ...)) holds, an encoder or a task model,
    with its weights."""
    state, encoder_only = ckpt["model"], ckpt["kind"] == "encoder"
    check_encoder(ckpt["config"], state, path, "" if encoder_only else "bert_model.")
    encoder = BertModel(**ckpt["config"])
    try:
        if encoder_only:
            model = encoder
        elif ckpt["kind"].startswith("mlm_task"):
            model = MLMTask.on(encoder, tie_weights=MLMTask.state_is_tied(state))
        elif ckpt["kind"].startswith("ns_task"):
            model = NextSentenceTask(encoder)
        else:
            model = QuestionAnswerTask(encoder, match_feature="match_embed.weight" in state,
                                       head=ckpt.get("qa_head", "original"),
                                       shape_feature="shape_embed.weight" in state)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{path}: the task model it describes cannot be built ({e}); the file "
                        "is damaged") from None
    return load_weights(model, state, path)
