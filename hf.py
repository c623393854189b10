"""transformers BERT checkpoints in and out: a folder with config.json, model.safetensors
(or pytorch_model.bin) and vocab.txt becomes this project's model, and back.

    imported = hf.read_folder("DIR")        # import (checkpoint.load_encoder does it for --bert-model)
    hf.write_folder(model, "OUT", itos)     # export (export.py is the command)

Import maps BertModel, BertForPreTraining, BertForMaskedLM, BertForNextSentencePrediction
and BertForQuestionAnswering weights onto model.py's modules; what cannot be mapped is
refused by name (another architecture, relative positions, a missing tensor). Export
writes the transformers class that holds what the model has: an encoder as BertModel,
a masked-LM model as BertForMaskedLM, a next-sentence model as
BertForNextSentencePrediction, a QA model with BERT's span head as
BertForQuestionAnswering. The weights are read with safetensors (or torch.load with
weights_only=True), never with pickle.
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model import BertModel, MLMTask, NextSentenceTask, QuestionAnswerTask
from utils import UserError, check_tensors

ARCHITECTURES = ("BertModel", "BertForPreTraining", "BertForMaskedLM",
                 "BertForNextSentencePrediction", "BertForQuestionAnswering")
SAFETENSORS = "pip install safetensors"

# (theirs, ours) for the encoder; {i} is a layer's number. Query, key and value are
# one fused projection here (mha.in_proj: q, k, v stacked along dim 0).
_EMBED = [("embeddings.word_embeddings", "bert_embed.embed"),
          ("embeddings.position_embeddings", "bert_embed.pos_embed.pos_embedding"),
          ("embeddings.token_type_embeddings", "bert_embed.tok_type_embed.token_type_embeddings"),
          ("embeddings.LayerNorm", "bert_embed.norm")]
_LAYER = [("attention.output.dense", "mha.out_proj"), ("attention.output.LayerNorm", "norm1"),
          ("intermediate.dense", "linear1"), ("output.dense", "linear2"),
          ("output.LayerNorm", "norm2")]
_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
_MLM = [("cls.predictions.transform.dense", "mlm_span"),
        ("cls.predictions.transform.LayerNorm", "norm_layer")]


# BertConfig's fields that say sizes: (name, required)
_SIZES = [("vocab_size", True), ("hidden_size", True), ("num_attention_heads", True),
          ("intermediate_size", True), ("num_hidden_layers", True),
          ("max_position_embeddings", False), ("type_vocab_size", False)]


def _check_values(cfg, where):
    """UserError naming the first field of a config.json that is missing or out of range."""
    for name, required in _SIZES:
        if name not in cfg and not required:
            continue
        value = cfg.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{where}: {name} is {'missing' if name not in cfg else repr(value)}; "
                            "a positive whole number is needed")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise UserError(f"{where}: num_attention_heads {cfg['num_attention_heads']} does not divide "
                        f"hidden_size {cfg['hidden_size']}")
    for name, low, high in (("hidden_dropout_prob", 0.0, 1.0), ("layer_norm_eps", 0.0, 1.0)):
        value = cfg.get(name, 0.1)
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not (low <= value < high and (name != "layer_norm_eps" or value > 0))):
            raise UserError(f"{where}: {name} is {value!r}; a number in [{low:g}, {high:g}) is needed")


def _check_shapes(cfg, theirs, prefix, where):
    """UserError naming the config.json field that the weights' shapes contradict."""
    emb = f"{prefix}embeddings."
    for tensor, fields in ((emb + "word_embeddings.weight", ("vocab_size", "hidden_size")),
                           (emb + "position_embeddings.weight", ("max_position_embeddings", "hidden_size")),
                           (emb + "token_type_embeddings.weight", ("type_vocab_size", "hidden_size")),
                           (f"{prefix}encoder.layer.0.intermediate.dense.weight",
                            ("intermediate_size", "hidden_size"))):
        shape = tuple(theirs[tensor].shape) if tensor in theirs else None
        if shape is None:
            continue
        for field, size in zip(fields, shape + (None,) * (2 - len(shape))):
            want = cfg.get(field, dict(max_position_embeddings=512, type_vocab_size=2).get(field))
            if size != want:
                raise UserError(f"{where}: {field} is {want}, but the weights' {tensor} has shape "
                                f"{shape}; the config and the weights are not of one model")
    layer = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    layers = {int(m.group(1)) for m in map(layer.match, theirs) if m}
    if layers != set(range(len(layers))) or len(layers) != cfg["num_hidden_layers"]:
        raise UserError(f"{where}: num_hidden_layers is {cfg['num_hidden_layers']}, but the weights "
                        f"hold layers {sorted(layers)[:3]}{'...' if len(layers) > 3 else ''} "
                        f"({len(layers)} of them)")


def config_from_hf(cfg, where="config.json"):
    """BertModel keyword arguments from a transformers BertConfig dict; UserError for what
    model.py cannot compute, naming the field."""
    if not isinstance(cfg, dict):
        raise UserError(f"{where} is not a JSON object of a model's configuration")
    if cfg.get("model_type") != "bert":
        raise UserError(f"{where}: model_type {cfg.get('model_type')!r} is not BERT; only BERT "
                        "checkpoints can be mapped onto this project's model")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{where}: position_embedding_type {cfg['position_embedding_type']!r}; "
                        "this project's BERT has absolute learned positions only")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise UserError(f"{where}: a decoder (is_decoder / add_cross_attention) cannot be mapped")
    _check_values(cfg, where)
    act = cfg.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{where}: hidden_act {act!r} is not one of gelu, relu, gelu_new, "
                        "gelu_pytorch_tanh")
    return dict(ntoken=cfg["vocab_size"], ninp=cfg["hidden_size"],
                nhead=cfg["num_attention_heads"], nhid=cfg["intermediate_size"],
                nlayers=cfg["num_hidden_layers"], dropout=cfg.get("hidden_dropout_prob", 0.1),
                layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
                max_positions=cfg.get("max_position_embeddings", 512),
                type_vocab_size=cfg.get("type_vocab_size", 2), activation=act,
                inner_dropout=False)  # BERT has no dropout inside its FFN


def config_to_hf(config, architecture, head_eps=None, tied=True):
    """A transformers BertConfig dict for an encoder config of this project."""
    c = {**BertModel.EXTRAS, **config}
    if c["norm_first"]:
        raise UserError("a pre-LayerNorm encoder (--norm-first) has no transformers BERT "
                        "counterpart; export is refused")
    if head_eps is not None and head_eps != c["layer_norm_eps"]:
        raise UserError(f"the masked-LM head's LayerNorm epsilon ({head_eps:g}) differs from the "
                        f"encoder's ({c['layer_norm_eps']:g}), and transformers has one for both")
    return dict(architectures=[architecture], model_type="bert", vocab_size=c["ntoken"],
                hidden_size=c["ninp"], num_attention_heads=c["nhead"],
                intermediate_size=c["nhid"], num_hidden_layers=c["nlayers"],
                hidden_dropout_prob=c["dropout"], attention_probs_dropout_prob=c["dropout"],
                layer_norm_eps=c["layer_norm_eps"], max_position_embeddings=c["max_positions"],
                type_vocab_size=c["type_vocab_size"], hidden_act=c["activation"],
                position_embedding_type="absolute", initializer_range=0.02, pad_token_id=0,
                tie_word_embeddings=tied)


def _pairs(nlayers, prefix):
    """(theirs, ours) names of the encoder's weights and biases, but q/k/v."""
    out = [(f"{prefix}{a}.{p}", f"{b}.{p}") for a, b in _EMBED for p in ("weight", "bias")
           if not (b != "bert_embed.norm" and p == "bias")]
    for i in range(nlayers):
        out += [(f"{prefix}encoder.layer.{i}.{a}.{p}", f"layers.{i}.{b}.{p}")
                for a, b in _LAYER for p in ("weight", "bias")]
    return out


def encoder_from_hf(theirs, nlayers, where):
    """Our BertModel state dict from a transformers one (with or without 'bert.')."""
    prefix = "bert." if any(k.startswith("bert.embeddings.") for k in theirs) else ""
    mine = {}
    for a, b in _pairs(nlayers, prefix):
        mine[b] = _take(theirs, a, where)
    for i in range(nlayers):
        for p in ("weight", "bias"):
            qkv = [_take(theirs, f"{prefix}encoder.layer.{i}.{q}.{p}", where) for q in _QKV]
            if len({tuple(t.shape) for t in qkv}) != 1:
                raise UserError(f"{where}: the query, key and value {p}s of layer {i} differ in "
                                f"shape ({', '.join(str(tuple(t.shape)) for t in qkv)})")
            mine[f"layers.{i}.mha.in_proj.{p}"] = torch.cat(qkv)
    return mine, prefix


def encoder_to_hf(mine, nlayers, prefix=""):
    theirs = {a: mine[b] for a, b in _pairs(nlayers, prefix)}
    for i in range(nlayers):
        for p in ("weight", "bias"):
            for q, t in zip(_QKV, mine[f"layers.{i}.mha.in_proj.{p}"].chunk(3)):
                theirs[f"{prefix}encoder.layer.{i}.{q}.{p}"] = t
    return theirs


def _take(state, name, where):
    if name not in state:
        raise UserError(f"{where} has no tensor {name}; it is not a complete BERT checkpoint")
    return state[name]


# --------------------------------------------------------------------------- import

@dataclass
class Imported:
    """A transformers BERT folder, read: the encoder, the heads it has, and its vocabulary."""
    config: dict  # BertModel keyword arguments
    architecture: str
    encoder: BertModel
    heads: dict = field(default_factory=dict)  # 'mlm', 'ns', 'qa': state dicts of our heads
    vocab_file: Path = None
    lower_case: bool = True


def read_weights(folder):
    """{name: tensor} of model.safetensors (safetensors) or pytorch_model.bin (weights only)."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{folder / 'model.safetensors'} needs the safetensors package; "
                            f"install it with `{SAFETENSORS}`") from None
        try:
            return load_file(str(folder / "model.safetensors"))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise UserError(f"cannot read {folder / 'model.safetensors'}: {e}") from None
    if (folder / "pytorch_model.bin").is_file():
        try:
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read {folder / 'pytorch_model.bin'} as weights only "
                            f"({type(e).__name__}); it may hold code, which is never run") from None
    raise UserError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


def read_folder(folder):
    """Imported: the BERT of a transformers folder (config.json, weights, vocab.txt)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json; pass a transformers model folder "
                        "or a checkpoint of this project") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {folder / 'config.json'}: {e}") from None
    archs = (cfg.get("architectures") if isinstance(cfg, dict) else None) or ["BertModel"]
    if not isinstance(archs, list) or not isinstance(archs[0], str) or archs[0] not in ARCHITECTURES:
        named = archs[0] if isinstance(archs, list) and archs else repr(archs)
        raise UserError(f"{folder}: architecture {named} cannot be mapped; this project reads "
                        f"{', '.join(ARCHITECTURES)}")
    config = config_from_hf(cfg, folder / "config.json")
    theirs = read_weights(folder)
    where = folder.name
    prefix = "bert." if any(k.startswith("bert.embeddings.") for k in theirs) else ""
    _check_shapes(cfg, theirs, prefix, folder / "config.json")
    mine, prefix = encoder_from_hf(theirs, config["nlayers"], where)
    encoder = BertModel(**config)
    check_tensors(mine, encoder.state_dict(), folder)
    encoder.load_state_dict(mine)
    heads = {}
    if "cls.predictions.transform.dense.weight" in theirs:
        mlm = {b + "." + p: _take(theirs, f"{a}.{p}", where) for a, b in _MLM
               for p in ("weight", "bias")}
        mlm["mlm_head.weight"] = theirs.get("cls.predictions.decoder.weight",
                                            mine["bert_embed.embed.weight"])  # tied: saved once
        mlm["mlm_head.bias"] = theirs.get("cls.predictions.bias",
                                          theirs.get("cls.predictions.decoder.bias"))
        if mlm["mlm_head.bias"] is None:
            raise UserError(f"{where} has no tensor cls.predictions.bias")
        heads["mlm"] = mlm
    if "cls.seq_relationship.weight" in theirs:
        heads["ns"] = {"linear_layer.weight": _take(theirs, f"{prefix}pooler.dense.weight", where),
                       "linear_layer.bias": _take(theirs, f"{prefix}pooler.dense.bias", where),
                       "ns_span.weight": theirs["cls.seq_relationship.weight"],
                       "ns_span.bias": _take(theirs, "cls.seq_relationship.bias", where)}
    if "qa_outputs.weight" in theirs:
        heads["qa"] = {"qa_span.weight": theirs["qa_outputs.weight"],
                       "qa_span.bias": _take(theirs, "qa_outputs.bias", where)}
    vocab = folder / "vocab.txt"
    return Imported(config, archs[0], encoder, heads, vocab if vocab.is_file() else None,
                    lower_case(folder))


def lower_case(folder):
    """Whether the folder's tokenizer lower-cases (tokenizer_config.json's do_lower_case;
    True, as BERT's uncased models, where it does not say)."""
    try:
        cfg = json.loads((Path(folder) / "tokenizer_config.json").read_text(encoding="utf-8"))
        return bool(cfg.get("do_lower_case", True)) if isinstance(cfg, dict) else True
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True


def task_model(imported, kind, **head_args):
    """The task model of kind ('mlm_task', 'ns_task', 'qa_task') on the imported encoder,
    with the folder's head where it has one (a QA head is BERT's: head='bert')."""
    enc = imported.encoder
    if kind == "mlm_task":
        model = MLMTask.on(enc, head_eps=imported.config["layer_norm_eps"], **head_args)
        part = imported.heads.get("mlm")
    elif kind == "ns_task":
        model, part = NextSentenceTask(enc), imported.heads.get("ns")
    else:
        model, part = QuestionAnswerTask(enc, **head_args), imported.heads.get("qa")
    if part is not None:
        missing, unexpected = model.load_state_dict(part, strict=False)
        assert not unexpected, unexpected
    return model


# --------------------------------------------------------------------------- export

def export_state(model):
    """(architecture, transformers state dict, config dict) for one of our models."""
    if isinstance(model, BertModel):
        enc, arch, prefix = model, "BertModel", ""
    else:
        enc, prefix = model.bert_model, "bert."
        arch = {MLMTask: "BertForMaskedLM", NextSentenceTask: "BertForNextSentencePrediction",
                QuestionAnswerTask: "BertForQuestionAnswering"}[type(model)]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    body = {k[len("bert_model."):]: v for k, v in state.items() if k.startswith("bert_model.")}
    theirs = encoder_to_hf(body if prefix else state, enc.config["nlayers"], prefix)
    head_eps, tied = None, True
    if isinstance(model, MLMTask):
        head_eps, tied = model.norm_layer.eps, model.tied
        for a, b in _MLM:
            for p in ("weight", "bias"):
                theirs[f"{a}.{p}"] = state[f"{b}.{p}"]
        theirs["cls.predictions.decoder.weight"] = state["mlm_head.weight"]
        theirs["cls.predictions.bias"] = state["mlm_head.bias"]
        theirs["cls.predictions.decoder.bias"] = state["mlm_head.bias"].clone()  # its alias
    elif isinstance(model, NextSentenceTask):
        theirs.update({"bert.pooler.dense.weight": state["linear_layer.weight"],
                       "bert.pooler.dense.bias": state["linear_layer.bias"],
                       "cls.seq_relationship.weight": state["ns_span.weight"],
                       "cls.seq_relationship.bias": state["ns_span.bias"]})
    elif isinstance(model, QuestionAnswerTask):
        if model.head != "bert":
            raise UserError("this QA model has the original's span head (GELU before the "
                            "projection), which transformers' BertForQuestionAnswering does not "
                            "compute; fine-tune with qa_task.py --qa-head bert to export it")
        for embed, flag in ((model.match_embed, "--match-feature"),
                            (model.shape_embed, "--shape-feature")):
            if embed is not None:
                raise UserError(f"this QA model reads the {flag} input, which transformers' "
                                "BERT has no place for; fine-tune without it to export")
        theirs.update({"qa_outputs.weight": state["qa_span.weight"],
                       "qa_outputs.bias": state["qa_span.bias"]})
    return arch, theirs, config_to_hf(enc.config, arch, head_eps, tied)


def write_folder(model, out, vocab_lines=None, lower_case=True):
    """Write a transformers folder: config.json, model.safetensors and, given the
    WordPiece vocabulary's lines, vocab.txt and the tokenizer's settings."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError(f"writing model.safetensors needs the safetensors package; install it "
                        f"with `{SAFETENSORS}`") from None
    arch, theirs, config = export_state(model)
    if arch == "BertForMaskedLM" and config["tie_word_embeddings"]:
        del theirs["cls.predictions.decoder.weight"]  # transformers ties it to the embeddings
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if vocab_lines is not None:
        (out / "vocab.txt").write_text("\n".join(vocab_lines) + "\n", encoding="utf-8")
        (out / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="BertTokenizer", do_lower_case=lower_case,
            model_max_length=config["max_position_embeddings"]), indent=2) + "\n",
            encoding="utf-8")
        (out / "special_tokens_map.json").write_text(json.dumps(dict(
            unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
            mask_token="[MASK]"), indent=2) + "\n", encoding="utf-8")
    return arch
