"""The whole pipeline on real data in under an hour on a laptop CPU, with a results table.

    python recipe.py --wikitext DIR --squad DIR              # -> runs/laptop/results.md

Runs, one after another, each as its own process with its printout kept in OUT/*.log:

    1. mlm_task.py  a small BERT pretrained on WikiText-2 (masked LM)
    2. ns_task.py   next-sentence pretraining of that encoder on WikiText-2
    3. qa_task.py   span-selection pretraining: questions made without labels from
                    WikiText-2's sentences (--cloze-dir; --cloze-epochs 0 skips it)
    4. qa_task.py   SQuAD v1.1 fine-tuning of the pretrained model (--checkpoint: the
                    encoder and span head of step 3)
    5. qa_task.py   the same fine-tuning from a randomly initialised encoder (the
                    baseline that shows what pretraining brings; --no-baseline skips it)
    6. qa_task.py   with --trainable-baseline, that baseline once more with its word
                    vectors trained (QA runs with --freeze-embeddings unless
                    --no-freeze-embeddings; fixed random word vectors turned out to help)

SQuAD: train-v1.1.json / dev-v1.1.json (plain or .gz) in --squad when they are there;
otherwise dev-split-train-v1.1.json / dev-split-eval-v1.1.json, a split of the
official dev set by article (the table then says "dev-split"). The SQuAD steps (4-6)
run once per seed (--seeds) from the same pretrained model. Each trains on every
article of the training file with settings fixed in advance (chosen on held-out
training articles, see docs/recipe.md): it keeps its last epoch and answers with the
span of highest expected F1 at temperature 0.67. The evaluation file chooses nothing
and is scored once per run, on every question, with the official v1.1 measure.
(--keep best --holdout-articles N --decode choose: each run chooses its epoch and its
decoding on the last N training articles instead, and does not train on them.) The
table gives the mean and spread over the seeds, and pretraining's gain over the
baseline seed by seed.

OUT/results.md is rewritten after every stage: the table so far, the commands, the
machine. A stage whose output is already in OUT (from an earlier, stopped run with the
same command) is not run again, unless a stage before it ran; a stopped stage goes on
from its state file.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import cloze
import monitor
import squad
from data import DataError

HERE = Path(__file__).resolve().parent

# The settings chosen for a 2-core CPU; their times and scores on such a CPU, in fp32 and
# bf16, are in docs/recipe.md.
DEFAULTS = dict(emsize=128, nhid=512, nlayers=2, nhead=2, dropout=0.0, batch_size=32, bptt=128,
                mlm_epochs=6, mlm_lr=1e-3, ns_epochs=1, ns_lr=3e-5,
                qa_epochs=5, qa_lr=1e-3,
                doc_stride=64, warmup=100, min_sentence_len=60, seeds=3, holdout_articles=0)

# Span selection's epochs by precision (--cloze-epochs auto): bf16 leaves time in the hour
# for three more, which raised held-out F1 by 2.5; fp32 on an AVX2-only CPU does not.
CLOZE_EPOCHS = {"bf16": 8, "none": 5}
# --match-neighbours by precision (--match-neighbours auto): in fp32 it let span selection
# learn where answers end (held-out F1 +0.68); under bf16, which learns it without, held-out F1
# fell by 0.31 (both measured in docs/recipe.md).
MATCH_NEIGHBOURS = {"bf16": False, "none": True}
TEMPERATURE = 0.67  # --decode expected-f1's default, chosen on held-out articles (docs/recipe.md)
SEED = 21192391  # qa_task.py's; seed k of the SQuAD steps is SEED + k - 1


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--wikitext", required=True, help="folder with WikiText-2's wiki.*.tokens")
    p.add_argument("--squad", required=True, help="folder with the SQuAD v1.1 files")
    p.add_argument("--out", default="runs/laptop", help="folder for models, logs and results")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--amp", default="auto", choices=["none", "bf16", "auto"],
                   help="autocast of every stage: auto: bf16 where the CPU has AVX-512 BF16 "
                        "or AMX (or on a GPU with bf16), else fp32 (the table says which); "
                        "none: fp32 everywhere")
    p.add_argument("--tokenizer", default="basic_english", choices=["basic_english", "wordpiece"],
                   help="basic_english with a word vocabulary built from WikiText-2's training "
                        "split (the original), or a WordPiece vocabulary of --vocab-size tokens "
                        "trained on that split (needs `pip install tokenizers`)")
    p.add_argument("--vocab-size", type=int, default=16000,
                   help="size of the WordPiece vocabulary trained with --tokenizer wordpiece")
    p.add_argument("--pretrain-seed", type=int, default=None,
                   help="seed of stages 1-3 (their --seed); default: each script's own, so "
                        "that another value shows how much the score owes to one pretraining")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the random-initialisation QA run")
    p.add_argument("--trainable-baseline", action="store_true",
                   help="also run the random-initialisation baseline with its word vectors "
                        "trained (stage 6)")
    p.add_argument("--no-match-feature", dest="match_feature", action="store_false",
                   help="fine-tune the original QA model, without qa_task.py --match-feature")
    p.add_argument("--no-shape-feature", dest="shape_feature", action="store_false",
                   help="span selection, SQuAD and the baselines without qa_task.py "
                        "--shape-feature (each token's shape in the raw text: lower case, "
                        "Capitalised, UPPER CASE, number), as the recipe was before it")
    p.add_argument("--match-neighbours", default="auto", choices=["auto", "on", "off"],
                   help="span selection, SQuAD and the baselines with qa_task.py "
                        "--match-neighbours (whether the tokens beside each token match the "
                        "question); auto: " + ", ".join(
                            f"{'on' if v else 'off'} {'in fp32' if k == 'none' else 'under ' + k}"
                            for k, v in MATCH_NEIGHBOURS.items()))
    p.add_argument("--no-freeze-embeddings", dest="freeze_embeddings", action="store_false",
                   help="let QA fine-tuning train the word embeddings (without qa_task.py "
                        "--freeze-embeddings)")
    p.add_argument("--freeze-pretraining", action="store_true",
                   help="also keep the word embeddings at their random initialisation in the "
                        "masked-LM and next-sentence steps (needs --no-tie-weights)")
    p.add_argument("--no-tie-weights", dest="tie_weights", action="store_false",
                   help="pretrain without mlm_task.py --tie-weights (a separate masked-LM output "
                        "projection, as in the original)")
    p.add_argument("--cloze-style", default="mixed", choices=sorted(cloze.STYLES),
                   help="span-selection questions: the answer's whole sentence, or 6 to 12 of "
                        "its words, as long as SQuAD's questions, with names for answers "
                        "('short') or names, phrases and words ('mixed') (qa_task.py "
                        "--cloze-style)")
    p.add_argument("--cloze-fresh", action=argparse.BooleanOptionalAction, default=True,
                   help="span selection reads other questions from the same text every epoch "
                        "(qa_task.py --cloze-fresh); --no-cloze-fresh: the same questions")
    p.add_argument("--keep", default="last", choices=["last", "best"],
                   help="the SQuAD steps' model: the last epoch's, chosen by nothing (trained "
                        "on every training article unless --holdout-articles), or the epoch "
                        "of the best F1 on the --holdout-articles (qa_task.py --keep)")
    p.add_argument("--decode", default="expected-f1", choices=["best", "expected-f1", "choose"],
                   help="the SQuAD steps' answers: the most probable span, or the span of "
                        "highest expected F1, or ('choose', with --holdout-articles) the one "
                        "of these, with its temperature, of the highest F1 on the held-out "
                        "articles, per run (qa_task.py --decode)")
    p.add_argument("--decode-temperature", type=float, default=None,
                   help="with --decode expected-f1: the span distribution's temperature "
                        "(qa_task.py --decode-temperature; default 0.67, chosen on held-out "
                        "articles)")
    helps = dict(emsize="model width", nhid="feed-forward width", nlayers="encoder layers",
                 nhead="attention heads", dropout="dropout in every step",
                 batch_size="sequences per batch, every step", bptt="tokens per sequence",
                 mlm_epochs="masked-LM epochs", mlm_lr="masked-LM learning rate",
                 ns_epochs="next-sentence epochs", ns_lr="next-sentence learning rate",
                 qa_epochs="SQuAD epochs", qa_lr="learning rate of span selection and of SQuAD",
                 doc_stride="SQuAD window stride, in context tokens",
                 warmup="learning-rate warm-up steps of every step",
                 min_sentence_len="next sentence: shortest line split into a pair, in tokens",
                 seeds="runs of each SQuAD step, one seed each, from the same pretrained model",
                 holdout_articles="last articles of the SQuAD training file kept out of "
                                  "training, to choose on with --keep best or --decode "
                                  "choose (0 with --keep best: choose on the evaluation "
                                  "file, which then flatters the score)")
    for name, value in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                       help=helps[name])
    p.add_argument("--cloze-epochs", type=epochs, default="auto",
                   help="epochs of span selection on questions made from WikiText-2, between "
                        "next sentence and SQuAD (0: none); auto: "
                        + ", ".join(f"{n} {'in fp32' if k == 'none' else 'under ' + k}"
                                    for k, n in CLOZE_EPOCHS.items()))
    a = p.parse_args(argv)
    if a.cloze_epochs == "auto":
        a.cloze_epochs = CLOZE_EPOCHS[amp(a)]
    if a.match_neighbours == "on" and not a.match_feature:
        p.error("--match-neighbours on marks the neighbours of --match-feature's matches: "
                "leave out --no-match-feature")
    a.match_neighbours = a.match_feature and (MATCH_NEIGHBOURS[amp(a)] if a.match_neighbours == "auto"
                                              else a.match_neighbours == "on")
    if a.decode == "expected-f1" and a.decode_temperature is None:
        a.decode_temperature = TEMPERATURE
    return a


def epochs(text):
    """--cloze-epochs: 'auto' or a number."""
    return text if text == "auto" else int(text)


def squad_files(folder):
    """(train, eval, label): squad.squad_files, its error as recipe.py's."""
    try:
        return squad.squad_files(folder)
    except DataError as e:
        sys.exit(f"recipe.py: error: {e}")


def commands(a, out):
    """The stages: (name, argv, its results file, which shows that it is done)."""
    size = ["--emsize", a.emsize, "--nhid", a.nhid, "--nlayers", a.nlayers, "--nhead", a.nhead]
    common = ["--device", a.device, "--amp", amp(a), "--batch_size", a.batch_size, "--bptt", a.bptt,
              "--optimizer", "adamw",
              "--warmup", a.warmup, "--clip", 1.0,
              *(["--tokenizer", "wordpiece", "--vocab-file", out / "vocab.txt"]
                if a.tokenizer == "wordpiece" else ["--save-vocab", out / "vocab.txt"])]
    train, dev, _ = squad_files(Path(a.squad))
    pretrain_freeze = ["--freeze-embeddings"] if a.freeze_embeddings and a.freeze_pretraining else []
    tie = ["--tie-weights"] if a.tie_weights else []
    pretrain_seed = [] if a.pretrain_seed is None else ["--seed", a.pretrain_seed]
    mlm = ["mlm_task.py", *size, *common, "--data-dir", a.wikitext, "--dataset", "WikiText2",
           "--epochs", a.mlm_epochs, "--lr", a.mlm_lr, "--dropout", a.dropout, "--mask-mode",
           "bert", "--log-interval", 100, "--save", out / "mlm_bert.pt",
           "--save-full", out / "full_mlm_model.pt", "--loss-log", out / "mlm_loss.txt",
           "--state-file", out / "mlm_state.pt", "--cache-dir", out / "cache", "--resume", *pretrain_freeze,
           *tie, *(["--vocab-size", a.vocab_size] if a.tokenizer == "wordpiece" else []),
           *pretrain_seed]
    ns = ["ns_task.py", *common, "--bert-model", out / "mlm_bert.pt", "--data-dir", a.wikitext,
          "--dataset", "WikiText2", "--epochs", a.ns_epochs, "--lr", a.ns_lr, "--min_sentence_len", a.min_sentence_len,
          "--log-interval", 100, "--save", out / "ns_bert.pt", "--save-full", out / "ns_model.pt",
          "--loss-log", out / "ns_loss.txt", "--state-file", out / "ns_state.pt",
          "--cache-dir", out / "cache", "--resume", *pretrain_freeze, *pretrain_seed]

    def qa(tag, extra, freeze=a.freeze_embeddings, epochs=a.qa_epochs, seed=SEED):
        decode = (["--decode", a.decode] if a.decode != "best" else []) + (
            ["--decode-temperature", a.decode_temperature]
            if a.decode_temperature not in (None, 1.0) else [])
        files = (["--train-file", train, "--dev-file", dev, "--seed", seed]
                 + (["--holdout-articles", a.holdout_articles] if a.holdout_articles else [])
                 + (["--keep", "last"] if a.keep == "last" else [])
                 + decode if tag != "cloze" else [])
        return ["qa_task.py", *common, "--bert-model", out / "ns_bert.pt", *files,
                "--epochs", epochs, "--lr", a.qa_lr,
                "--doc-stride", a.doc_stride, "--log-interval", 100,
                "--save", out / f"{tag}_model.pt", "--predictions", out / f"{tag}_predictions.json",
                "--loss-log", out / f"{tag}_loss.txt", "--state-file", out / f"{tag}_state.pt",
                "--resume", *(["--match-feature"] if a.match_feature else []),
                *(["--shape-feature"] if a.shape_feature else []),
                *(["--match-neighbours"] if a.match_neighbours else []),
                *(["--freeze-embeddings"] if freeze else []), *extra]
    stages = [("mlm", mlm, out / "mlm_loss.jsonl"), ("ns", ns, out / "ns_loss.jsonl")]
    start = []
    if a.cloze_epochs:
        cloze = ["--cloze-dir", a.wikitext, *(["--cloze-style", a.cloze_style]
                                               if a.cloze_style != "sentence" else []),
                 *(["--cloze-fresh"] if a.cloze_fresh else []), *pretrain_seed]
        stages.append(("cloze", qa("cloze", cloze, epochs=a.cloze_epochs),
                       out / "cloze_loss.jsonl"))
        start = ["--checkpoint", out / "cloze_model.pt"]
    squad = [("qa", start, a.freeze_embeddings)]
    if not a.no_baseline:
        squad.append(("qa_random", ["--random-init"], a.freeze_embeddings))
        if a.trainable_baseline and a.freeze_embeddings:
            squad.append(("qa_random_trainable", ["--random-init"], False))
    for kind, extra, freeze in squad:
        for k in range(1, a.seeds + 1):
            tag = f"{kind}_s{k}"
            stages.append((tag, qa(tag, extra, freeze, seed=SEED + k - 1),
                           out / f"{tag}_loss.jsonl"))
    return [(name, [str(x) for x in argv], done) for name, argv, done in stages]


def finished(path):
    """True when a stage's results file holds its final (test) record."""
    try:
        return any(r["record"] == "test" for r in monitor.read_results(path))
    except (OSError, ValueError):
        return False


def scores(name, path):
    """The numbers of a stage's results file (JSON lines) that go into the table."""
    records = monitor.read_results(path)
    last = lambda kind: next((r for r in reversed(records) if r["record"] == kind), {})
    valid, test = last("valid"), last("test")
    if name == "mlm":
        return {"valid ppl": valid.get("ppl"), "test ppl": test.get("ppl")}
    if name == "ns":
        return {"test loss": test.get("loss"), "test accuracy": test.get("accuracy")}
    if not test:
        return {}
    valid = [r for r in records if r["record"] == "valid"]
    chosen = max(valid, key=lambda r: r["f1"]) if valid else {}  # the epoch the run kept
    decoding = last("decode")  # with --decode choose: the one chosen, and its held-out F1
    return dict(EM=test["exact"], F1=test["f1"], questions=test["questions"], kept=test["orig_n"],
                orig_exact=test["orig_exact"], orig_f1=test["orig_f1"],
                chosen_epoch=chosen.get("epoch"), chosen_f1=decoding.get("f1", chosen.get("f1")),
                **({"decoding": squad.decoding_name(decoding["decode"], decoding["temperature"])}
                   if decoding else {}))


def spread(values):
    """(mean, sample standard deviation; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


def cpu_flags():
    """The CPU's bf16 features, as /proc/cpuinfo names them (empty where it is not there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx512_bf16", "amx_bf16") if f in have]
    except OSError:
        pass
    return []


def amp(a):
    """The stages' --amp: --amp, with auto resolved for this machine."""
    if a.amp != "auto":
        return a.amp
    if a.device != "cpu" and torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    return "bf16" if cpu_flags() else "none"


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ", ".join(cpu_flags()) or "no bf16 instructions"
    kernels = torch.backends.cpu.get_cpu_capability()  # lower where ATEN_CPU_CAPABILITY caps it
    return (f"{cpu} ({flags}; torch's {kernels} kernels), {os.cpu_count()} logical cores, "
            f"torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def table(results, label, a):
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    rows = ["| stage | result | wall time |", "|---|---|---|"]
    r = results.get("mlm")
    if r:
        rows.append(f"| 1. masked LM (WikiText-2) | valid ppl {fmt(r.get('valid ppl'), '.2f')}, "
                    f"test ppl {fmt(r.get('test ppl'), '.2f')} | {r['seconds'] / 60:.1f} min |")
    r = results.get("ns")
    if r:
        rows.append(f"| 2. next sentence (WikiText-2) | test loss {fmt(r.get('test loss'), '.4f')}, "
                    f"accuracy {fmt(r.get('test accuracy'), '.2f')}% | {r['seconds'] / 60:.1f} min |")
    r = results.get("cloze") if a.cloze_epochs else None
    if r:
        kind = (f"{a.cloze_style} questions" + (", new ones every epoch" if a.cloze_fresh else "")
                + f", {a.cloze_epochs} epoch{'s' if a.cloze_epochs > 1 else ''}")
        rows.append(f"| 3. span selection ({kind}, made from WikiText-2) | WikiText-2 valid, "
                    f"{r.get('questions', '-')} questions: EM {fmt(r.get('EM'), '.2f')}, F1 "
                    f"{fmt(r.get('F1'), '.2f')} | {r['seconds'] / 60:.1f} min |")
    frozen = a.freeze_embeddings
    first = 4 if a.cloze_epochs else 3
    chooser = chooser_text(a)
    runs = lambda kind: [results[f"{kind}_s{k}"] for k in range(1, a.seeds + 1)
                         if "F1" in results.get(f"{kind}_s{k}", {})]
    for n, key, what in ((first, "qa", "pretrained encoder"),
                         (first + 1, "qa_random", "random init (baseline)"
                          + (", fixed word vectors" if frozen else "")),
                         (first + 2, "qa_random_trainable",
                          "random init (baseline), word vectors trained")):
        rs = runs(key)
        if not rs:
            continue
        f1, em = spread([r["F1"] for r in rs]), spread([r["EM"] for r in rs])
        each = ", ".join(f"{r['F1']:.2f}" for r in rs)
        held = (", F1 there: " + ", ".join(fmt(r.get("chosen_f1"), ".2f") for r in rs)
                if a.holdout_articles or a.keep == "best" else "")
        minutes = ", ".join(f"{r['seconds'] / 60:.1f}" for r in rs)
        rows.append(
            f"| {n}. SQuAD v1.1, {what} | {label}, all {rs[0].get('questions', '-')} questions, "
            f"{len(rs)} seed{'s' if len(rs) > 1 else ''}: **F1 {f1[0]:.2f} ± {f1[1]:.2f}**, EM "
            f"{em[0]:.2f} ± {em[1]:.2f} (F1 of each seed: {each}; {chooser}{held}) | "
            f"{minutes} min |")
    steps = ("mlm", "ns", "cloze", "qa_s1") if a.cloze_epochs else ("mlm", "ns", "qa_s1")
    pipeline = sum(results[k]["seconds"] for k in steps if k in results)
    rows.append(f"| pipeline (1-{first}, one seed of {first}) | | **{pipeline / 60:.1f} min** |")
    gains = []
    for n, key in ((first + 1, "qa_random"), (first + 2, "qa_random_trainable")):
        pairs = [(results[f"qa_s{k}"]["F1"], results[f"{key}_s{k}"]["F1"])
                 for k in range(1, a.seeds + 1)
                 if "F1" in results.get(f"qa_s{k}", {}) and "F1" in results.get(f"{key}_s{k}", {})]
        if pairs:
            mean, sd = spread([p - r for p, r in pairs])
            gains.append(f"F1 {mean:+.2f} ± {sd:.2f} points over {n} ({len(pairs)} seeds, "
                         "paired by seed)")
    if gains:
        rows.append(f"| pretraining's gain | {'; '.join(gains)} | |")
    rows.append("")
    rows.append("± is the standard deviation over the seeds of the SQuAD steps; the "
                "pretraining (stages 1-" + str(first - 1) + ") ran once"
                + ("" if a.pretrain_seed is None else f", with seed {a.pretrain_seed}") + ". "
                + ("" if a.shape_feature else "Without the tokens' shapes "
                   "(--no-shape-feature). ")
                + ("The QA steps mark the tokens beside each match (--match-neighbours). "
                   if a.match_neighbours else "") + "SQuAD answers: "
                + answers_text(a, results))
    return "\n".join(rows)


def chooser_text(a):
    """The table's words on which model each SQuAD step kept."""
    if a.keep == "last":
        return (f"the last of {a.qa_epochs} epochs kept, "
                + (f"{a.holdout_articles} training articles held out" if a.holdout_articles
                   else "trained on every training article, nothing chosen"))
    return (f"epoch chosen on {a.holdout_articles} held-out training articles"
            if a.holdout_articles else "epoch chosen on these same questions")


def answers_text(a, results):
    """The table's line on how the SQuAD steps chose their answers."""
    if a.decode == "best":
        return "the most probable span of each window."
    if a.decode == "expected-f1":
        return f"the span of highest expected F1 (temperature {a.decode_temperature:g})."
    names = {"qa": "pretrained", "qa_random": "random init",
             "qa_random_trainable": "random init, word vectors trained"}
    chosen = "; ".join(
        f"{name}: " + ", ".join(results[f"{key}_s{k}"].get("decoding", "-")
                                for k in range(1, a.seeds + 1) if f"{key}_s{k}" in results)
        for key, name in names.items()
        if any(f"{key}_s{k}" in results for k in range(1, a.seeds + 1)))
    temperatures = ", ".join(f"{t:g}" for d, t in squad.DECODINGS if d == "expected-f1")
    return ("the decoding of the highest F1 on the held-out articles, chosen per run among "
            "the most probable span and the span of highest expected F1 at temperatures "
            f"{temperatures} (held-out F1 above is the chosen decoding's; chosen, by seed: "
            f"{chosen or '-'}).")


def same_command(results, name, argv):
    """True when results[name] was made by the command argv."""
    return results.get(name, {}).get("command") == " ".join(argv)


def current(results, stages):
    """The results of this command's stages: an entry left by another command in the
    same OUT (another seed, another SQuAD file, a stage skipped now) is not shown."""
    return {name: results[name] for name, argv, _ in stages if same_command(results, name, argv)}


def write_results(out, results, label, a, stages):
    precision = "bf16 autocast" if amp(a) == "bf16" else "fp32"
    text = ["# Laptop recipe: results\n", table(current(results, stages), label, a), "",
            f"Machine: {machine()}. Precision: {precision} (--amp {a.amp}). Tokenizer: "
            + (f"WordPiece, a {a.vocab_size:,}-token vocabulary trained on WikiText-2's training split."
               if a.tokenizer == "wordpiece" else "basic_english, WikiText-2's training words."),
            "", "Commands:", ""]
    text += ["    python " + " ".join(argv) for _, argv, _ in stages]
    tmp = out / "results.md.tmp"
    tmp.write_text("\n".join(text) + "\n")
    tmp.replace(out / "results.md")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def main():
    a = parse()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for flag, folder in (("--wikitext", a.wikitext), ("--squad", a.squad)):
        if not Path(folder).is_dir():
            sys.exit(f"recipe.py: error: {flag} {folder} is not a folder")
    if a.tokenizer == "wordpiece" and a.vocab_size < 100:
        sys.exit(f"recipe.py: error: --vocab-size {a.vocab_size} is too small for a WordPiece "
                 "vocabulary; try 8000 to 30000")
    if a.seeds < 1 or a.holdout_articles < 0:
        sys.exit("recipe.py: error: --seeds must be at least 1 and --holdout-articles at least 0")
    if a.decode == "choose" and not a.holdout_articles:
        sys.exit("recipe.py: error: --decode choose chooses on the held-out "
                 "articles; give --holdout-articles N (N > 0), or --decode best")
    if a.decode_temperature is not None and a.decode != "expected-f1":
        sys.exit("recipe.py: error: --decode-temperature is for --decode expected-f1")
    if a.decode_temperature is not None and a.decode_temperature <= 0:
        sys.exit("recipe.py: error: --decode-temperature must be positive")
    if a.tie_weights and a.freeze_pretraining:
        sys.exit("recipe.py: error: --freeze-pretraining would also fix the masked-LM output "
                 "projection, which is the word embedding matrix by default; add --no-tie-weights")
    label = squad_files(Path(a.squad))[2]
    stages = commands(a, out)
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    changed = False  # once a stage runs, the stages after it run too: their input changed
    for i, (name, argv, done) in enumerate(stages):
        log = out / f"{name}.log"
        if not changed and finished(done) and same_command(results, name, argv):
            print(f"== {name}: done in an earlier run ({log})", flush=True)
            continue
        changed = True
        for later, _, _ in stages[i:]:  # made from what this stage replaces
            results.pop(later, None)
        print(f"== {name}: python {' '.join(argv)}", flush=True)
        start = time.time()
        with open(log, "w") as f:
            proc = subprocess.Popen([sys.executable, "-u", str(HERE / argv[0]), *argv[1:]],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                f.write(line)
                f.flush()
            rc = proc.wait()
        if rc != 0:
            sys.exit(f"recipe.py: {name} failed (exit status {rc}); its output is in {log}. "
                     "Run the same command again to go on from where it stopped.")
        results[name] = dict(scores(name, done), seconds=time.time() - start,
                             command=" ".join(argv))
        write_results(out, results, label, a, stages)
        print(f"== {name}: {time.time() - start:.0f} s; table in {out / 'results.md'}", flush=True)
    write_results(out, results, label, a, stages)  # also when every stage was done before
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
