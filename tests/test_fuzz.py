"""Every reader, fuzzed: each kind of file the project reads is corrupted in many seeded
ways (truncated, bytes flipped, fields missing, extra or of the wrong type, values out
of range, sizes that do not fit) and read as a script reads it. Each must be read
without error or end in the one-line error of a user mistake (UserError, DataError),
never in another exception (a traceback).

    python -m pytest -q tests/test_fuzz.py -s                        # 200 a kind, counts shown
    BERT_FUZZ_CASES=1000 python -m pytest -q tests/test_fuzz.py -s   # more

A token store's ids carry no checksum (it would cost a read of the whole file at every
start): a flipped id past the vocabulary is refused, one within it is read as stored,
and counted so; likewise a line offset flipped out of order is refused, one that stays
in order is read as stored.
"""
import copy
import json
import os
import random
import time
import traceback

import numpy as np
import pytest
import torch

import checkpoint
import corpus
import data
import dist
import hf
import monitor
import squad
import store
import train
import utils
import wordpiece
from conftest import SQUAD_PARAGRAPHS, write_squad, write_wikitext
from model import BertModel, MLMTask

CASES = int(os.environ.get("BERT_FUZZ_CASES", "200"))  # corruptions per kind of file
USER_ERRORS = (utils.UserError, data.DataError)
ODD_VALUES = [None, True, -1, 0, 2 ** 40, -2 ** 40, 1.5, float("nan"), "", "x", "1", [], [1],
              {}, {"a": 1}]


# ----------------------------------------------------------------- corruptions

def corrupt_bytes(raw, rng):
    """raw (bytes) truncated, with bytes flipped, with bytes inserted, or emptied."""
    how = rng.choice(["truncate", "flip", "insert", "empty", "duplicate"])
    if how == "empty" or not raw:
        return b"", how
    if how == "truncate":
        return raw[:rng.randrange(len(raw))], how
    if how == "duplicate":
        cut = rng.randrange(len(raw))
        return raw[:cut] + raw[cut // 2:], how
    out = bytearray(raw)
    if how == "flip":
        for _ in range(rng.choice([1, 1, 2, 8, 64])):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out), how
    i = rng.randrange(len(out) + 1)
    return bytes(out[:i]) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + bytes(out[i:]), how


def _places(tree, path=()):
    """Every (path, value) of a JSON-like tree."""
    yield path, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _places(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _places(v, path + (i,))


def corrupt_tree(tree, rng, values=ODD_VALUES):
    """A copy of a JSON-like tree (dicts, lists, numbers, strings, tensors) with one place
    removed, given another value or type, or an extra field."""
    tree = copy.deepcopy(tree)
    path, value = rng.choice([p for p in _places(tree) if p[0]])
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    how = rng.choice(["remove", "retype", "extra", "scale"] + ["reshape"] * torch.is_tensor(value))
    if how == "remove":
        del parent[path[-1]]
    elif how == "extra" and isinstance(value, dict):
        value[rng.choice(["zz", "extra", "version"])] = rng.choice(values)
    elif how == "scale" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[path[-1]] = rng.choice([value * 1000, -value, value + 1, value - 1, 0])
    elif how == "reshape":
        parent[path[-1]] = rng.choice([value.flatten()[:-1], value.to(torch.int64), value[None],
                                       torch.zeros(3, 3), value.T if value.dim() == 2 else value[:0]])
    else:
        parent[path[-1]] = rng.choice(values)
        how = "retype"
    return tree, f"{how} at {'/'.join(map(str, path))}"


# ----------------------------------------------------------------- the files and their readers

def _vocab(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (60, 10, 10))
    vocab = data.Vocab.build(data.basic_english(line) for line in corpus.read_lines([wt / "wiki.train.tokens"]))
    (tmp_path / "vocab.txt").write_text(vocab.to_text())
    return wt, vocab


def _torch_kind(tmp_path, make, read):
    """(write a valid file, corrupt its content, read it) for a torch.save'd dict."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "file.pt"

    def corrupt(rng):
        good = make()
        if rng.random() < 0.4:
            torch.save(good, path)
            raw, how = corrupt_bytes(path.read_bytes(), rng)
            path.write_bytes(raw)
            return how
        bad, how = corrupt_tree(good, rng)
        torch.save(bad, path)
        return how
    return corrupt, lambda: read(path)


def kinds(tmp_path):
    """{kind: (corrupt(rng) -> what was done, read())}."""
    wt, vocab = _vocab(tmp_path)
    torch.manual_seed(0)
    enc = BertModel(len(vocab), 16, 2, 32, 1, 0.0)
    mlm = MLMTask.on(enc)
    out = {}

    out["encoder checkpoint"] = _torch_kind(
        tmp_path / "enc", lambda: checkpoint.header("encoder", enc.config, vocab.fingerprint,
                                                    model=enc.state_dict()),
        lambda p: checkpoint.load_encoder(p, vocab))
    out["task checkpoint"] = _torch_kind(
        tmp_path / "task", lambda: checkpoint.header("mlm_task", enc.config, vocab.fingerprint,
                                                     model=mlm.state_dict()),
        lambda p: checkpoint.build(checkpoint.load(p, ("mlm_task",)), p))

    def state():
        state_file = tmp_path / "state" / "ok.pt"
        state_file.unlink(missing_ok=True)
        t = _trainer(tmp_path / "state", mlm, vocab, state_file)
        t.epoch, t.step = 1, 2
        t.save_state()
        return torch.load(state_file, weights_only=True)
    out["state file"] = _torch_kind(
        tmp_path / "state", state,
        lambda p: _trainer(tmp_path / "state", MLMTask.on(BertModel(len(vocab), 16, 2, 32, 1, 0.0)),
                           vocab, p))

    out["vocabulary"] = _text_kind(tmp_path / "vocab.txt", vocab.to_text().encode(),
                                   lambda p: data.Vocab.load(p))
    wp = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "##s", "sat"]) + "\n"
    out["WordPiece vocab.txt"] = _text_kind(tmp_path / "wp.txt", wp.encode(),
                                            lambda p: wordpiece.load_vocab(p))
    out["token store"] = _store_kind(tmp_path / "store", wt, vocab)
    write_squad(tmp_path / "squad.json")
    out["SQuAD file"] = _json_kind(tmp_path / "squad.json", lambda p: squad.squad_features(
        squad.read_squad(p), data.Tokenizer(), vocab, 32, 8, training=True, show=False))
    (tmp_path / "ask.json").write_text(json.dumps(
        [{"id": "a", "question": q, "context": c} for c, qas in SQUAD_PARAGRAPHS for q, _ in qas]))
    out["--predict FILE"] = _json_kind(tmp_path / "ask.json", lambda p: squad.squad_features(
        squad.questions_to_answer(predict_file=p), data.Tokenizer(), vocab, 32, 8,
        training=False, show=False))
    out["results file"] = _results_kind(tmp_path / "results")
    out.update(_hf_kinds(tmp_path / "hf"))
    return out


def _trainer(folder, model, vocab, state_file):
    folder.mkdir(parents=True, exist_ok=True)
    args = utils.Parser().parse_args([])
    for k, v in dict(amp="none", clip=0.5, dry_run=False, log_interval=2, epochs=1, checkpoint="None",
                     resume=True, state_file=str(state_file), save_every=0,
                     seed=0, lr=0.1, optimizer="adamw", grad_accum=1, warmup=0, weight_decay=0.01,
                     profile=None).items():
        setattr(args, k, v)
    task = train.Task("mlm_task", None, lambda e, s: data.Batches(torch.zeros(8, 3), batch_size=2), 4,
                      None, None, str(folder / "best.pt"), vocab.fingerprint,
                      generators=(torch.Generator(),))
    return train.Trainer(args, dist.Context(), model, model, task, monitor.Recorder(None))


def _text_kind(path, good, read):
    def corrupt(rng):
        raw, how = corrupt_bytes(good, rng)
        if rng.random() < 0.3:  # a line changed, doubled or removed
            lines = good.decode().split("\n")
            i = rng.randrange(len(lines))
            lines[i:i + 1] = rng.choice([[], [lines[i]] * 2, [""], [" " + lines[i]], ["x y"]])
            raw, how = "\n".join(lines).encode(), "line changed"
        path.write_bytes(raw)
        return how
    return corrupt, lambda: read(path)


def _json_kind(path, read):
    good = json.loads(path.read_text())

    def corrupt(rng):
        if rng.random() < 0.3:
            raw, how = corrupt_bytes(json.dumps(good).encode(), rng)
            path.write_bytes(raw)
            return how
        bad, how = corrupt_tree(good, rng)
        path.write_text(json.dumps(bad))
        return how
    return corrupt, lambda: read(path)


def _store_kind(folder, wt, vocab):
    source = store.Source("WikiText2", [wt / "wiki.valid.tokens"], corpus.read_lines,
                          corpus.line_encoder("WikiText2", data.Tokenizer(), vocab), "basic_english",
                          vocab)
    built = store.open_or_build(source, folder, dist.Context(), show=False)
    good = {name: (built.folder / name).read_bytes() for name in ("manifest.json", "tokens.bin", "lines.idx")}

    def corrupt(rng):
        for name, raw in good.items():
            (built.folder / name).write_bytes(raw)
        name = rng.choice(list(good))
        if name == "manifest.json" and rng.random() < 0.7:
            bad, how = corrupt_tree(json.loads(good[name]), rng, ODD_VALUES + ["float64", "uint8", "S1"])
            (built.folder / name).write_text(json.dumps(bad))
        else:
            raw, how = corrupt_bytes(good[name], rng)
            (built.folder / name).write_bytes(raw)
        return f"{name}: {how}"

    def read():
        st = store.open_or_build(source, folder, dist.Context(), show=False)
        tokens = st.lines(0, st.num_lines)
        ids = tokens.read(np.arange(len(tokens) // 8) * 8, 8)
        lines = tokens.read_ranges(*tokens.line_bounds(np.arange(tokens.num_lines)))
        if ids.tobytes() != good_ids[:ids.size].tobytes() or np.concatenate(lines).size != len(good_ids):
            return "read as stored"  # flipped, but within the vocabulary or in order
        return "read"
    good_ids = np.frombuffer(good["tokens.bin"], built.dtype)
    return corrupt, read


def _results_kind(folder):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "r.jsonl"
    rec = monitor.Recorder(str(path))
    rec.start(append=False)
    rec.write(dict(record="train", epoch=1, step=1, loss=2.0))
    rec.write(dict(record="valid", epoch=1, loss=1.5))
    rec.close()
    good = path.read_bytes()

    def corrupt(rng):
        raw, how = corrupt_bytes(good, rng)
        path.write_bytes(raw)
        return how

    def read():
        try:
            monitor.read_results(path)
        except ValueError:  # what its readers (plot.py, recipe.py) report as one line
            pass
    return corrupt, read


def _hf_kinds(folder):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    vocab_lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(20)]
    (folder / "vocab.txt").write_text("\n".join(vocab_lines) + "\n")
    vocab = wordpiece.load_vocab(folder / "vocab.txt")
    torch.manual_seed(0)
    enc = BertModel(len(vocab_lines), 16, 2, 32, 1, 0.0, layer_norm_eps=1e-12, inner_dropout=False)
    config = hf.config_to_hf(enc.config, "BertModel")
    weights = {k: v.contiguous() for k, v in hf.encoder_to_hf(enc.state_dict(), 1).items()}

    def write(cfg, tensors):
        (folder / "config.json").write_text(json.dumps(cfg))
        save_file(tensors, str(folder / "model.safetensors"))

    def corrupt_config(rng):
        write(config, weights)
        if rng.random() < 0.3:
            raw, how = corrupt_bytes(json.dumps(config).encode(), rng)
            (folder / "config.json").write_bytes(raw)
            return how
        bad, how = corrupt_tree(config, rng)
        (folder / "config.json").write_text(json.dumps(bad))
        return how

    def corrupt_weights(rng):
        write(config, weights)
        if rng.random() < 0.4:
            raw, how = corrupt_bytes((folder / "model.safetensors").read_bytes(), rng)
            (folder / "model.safetensors").write_bytes(raw)
            return how
        bad, how = corrupt_tree(weights, rng, [torch.zeros(2), torch.zeros(0), torch.ones(4, 4)])
        bad = {k: v.contiguous() for k, v in bad.items() if torch.is_tensor(v)}
        save_file(bad, str(folder / "model.safetensors"))
        return how

    read = lambda: checkpoint.load_encoder(folder, vocab)
    return {"transformers config.json": (corrupt_config, read),
            "transformers weights": (corrupt_weights, read)}


# ----------------------------------------------------------------- the test

def test_every_reader_fuzzed(tmp_path, capsys):
    rng = random.Random(20261206)
    counts, failures, start = {}, [], time.time()
    for kind, (corrupt, read) in kinds(tmp_path).items():
        outcomes = {"read": 0, "refused": 0}
        for case in range(CASES):
            how = corrupt(rng)
            try:
                with _quiet(capsys):
                    verdict = read()
                verdict = verdict if isinstance(verdict, str) else "read"
                assert verdict == "read" or kind == "token store" and how.endswith(": flip"), \
                    (kind, how, verdict)
                outcomes[verdict] = outcomes.get(verdict, 0) + 1
            except USER_ERRORS as e:
                assert "\n" not in str(e).strip(), (kind, how, str(e))  # one line
                outcomes["refused"] += 1
            except Exception as e:  # noqa: BLE001 - what this test is for
                failures.append(f"{kind} ({how}): {type(e).__name__}: {e}\n"
                                f"{''.join(traceback.format_tb(e.__traceback__)[-2:])}")
        counts[kind] = outcomes
    seconds = time.time() - start
    with capsys.disabled():
        print(f"\n| fuzzed {CASES} corruptions per kind in {seconds:.1f} s: " + "; ".join(
            f"{k}: " + ", ".join(f"{n} {verdict}" for verdict, n in v.items()) for k, v in counts.items()))
    assert not failures, f"{len(failures)} tracebacks:\n" + "\n".join(failures[:10])


class _quiet:
    """Swallow what a reader prints (a rebuilt store says so)."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.capsys.readouterr()
        return False
