"""The whole pipeline on real data within the hour on a laptop CPU, with a results table.

    python recipe.py --wikitext DIR --squad DIR              # -> runs/laptop/results.md

Runs, one after another, each as its own process with its printout kept in OUT/*.log:

    1. mlm_task.py   a small BERT pretrained on WikiText-2 (masked LM)
    2. ns_task.py    next-sentence pretraining of that encoder on WikiText-2
    3. span_task.py  span selection on questions made without labels from WikiText-2
    4. qa_task.py    SQuAD v1.1 fine-tuning from the model of step 3, once per seed
    5. qa_task.py    the same from a randomly initialised encoder (the baseline that shows
                     what pretraining brings; --no-baseline skips it)

One configuration on every machine (RECIPE; how it was chosen: docs/recipe.md): the
precision (--amp) changes the speed, never the model or the schedule. SQuAD:
train-v1.1.json / dev-v1.1.json (plain or .gz) in --squad when they are there; otherwise
dev-split-train-v1.1.json / dev-split-eval-v1.1.json, a split of the official dev set
by article (the table then says "dev-split"). Each SQuAD step trains on every article
of the training file for a fixed number of epochs, keeps the last, and answers with the
span of highest expected F1 at temperature 0.67 (settings chosen earlier on held-out
training articles); the evaluation file chooses nothing and is scored once per run.
The table gives the mean and spread over the seeds, and pretraining's gain over the
baseline seed by seed.

OUT/results.md is rewritten after every stage. A stage whose output is already in OUT
(from an earlier, stopped run with the same command) is not run again, unless a stage
before it ran; a stopped stage goes on from its state file.
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

import monitor
import squad
from data import DataError

HERE = Path(__file__).resolve().parent
# The recipe: BERT-Tiny's shape, AdamW, and each stage's epochs and learning rate.
RECIPE = dict(size=["--emsize", 128, "--nhid", 512, "--nlayers", 2, "--nhead", 2, "--dropout", 0.0],
              common=["--batch_size", 32, "--bptt", 128, "--optimizer", "adamw", "--warmup", 100,
                      "--clip", 1.0, "--log-interval", 100],
              mlm=["--epochs", 6, "--lr", 1e-3, "--mask-mode", "bert", "--tie-weights"],
              ns=["--epochs", 1, "--lr", 3e-5, "--min_sentence_len", 60],
              qa_model=["--lr", 1e-3, "--doc-stride", 64, "--match-feature", "--shape-feature",
                        "--freeze-embeddings"],
              span=["--epochs", 8],
              squad=["--epochs", 5, "--keep", "last", "--decode", "expected-f1",
                     "--decode-temperature", 0.67])
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
                        "or AMX (or on a GPU with bf16), else fp32 (the table says which)")
    p.add_argument("--seeds", type=int, default=3,
                   help="runs of each SQuAD step, one seed each, from the same pretrained model")
    p.add_argument("--pretrain-seed", type=int, default=None,
                   help="seed of stages 1-3 (their --seed); default: each script's own. "
                        "Another value shows how much the score owes to one pretraining")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the SQuAD runs from a randomly initialised encoder")
    return p.parse_args(argv)


def commands(a, out):
    """The stages: (name, argv, its results file, which shows that it is done)."""
    train, dev, _ = squad.squad_files(Path(a.squad))
    common = ["--device", a.device, "--amp", amp(a), *RECIPE["common"],
              "--save-vocab", out / "vocab.txt", "--resume"]
    store = ["--cache-dir", out / "cache"]
    seed = [] if a.pretrain_seed is None else ["--seed", a.pretrain_seed]
    files = lambda tag: ["--loss-log", out / f"{tag}_loss.txt", "--state-file", out / f"{tag}_state.pt"]
    stages = [
        ("mlm", ["mlm_task.py", *RECIPE["size"], *common, *store, *RECIPE["mlm"], "--data-dir", a.wikitext,
                 "--save", out / "mlm_bert.pt", "--save-full", out / "full_mlm_model.pt",
                 *files("mlm"), *seed]),
        ("ns", ["ns_task.py", *common, *store, *RECIPE["ns"], "--bert-model", out / "mlm_bert.pt",
                "--dataset", "WikiText2", "--data-dir", a.wikitext, "--save", out / "ns_bert.pt",
                "--save-full", out / "ns_model.pt", *files("ns"), *seed]),
        ("span", ["span_task.py", *common, *RECIPE["qa_model"], *RECIPE["span"],
                  "--bert-model", out / "ns_bert.pt", "--data-dir", a.wikitext,
                  "--save", out / "span_model.pt", "--predictions", out / "span_predictions.json",
                  *files("span"), *seed])]
    for kind, start in (("qa", ["--checkpoint", out / "span_model.pt"]),
                        ("qa_random", ["--random-init"])):
        if kind == "qa_random" and a.no_baseline:
            continue
        for k in range(1, a.seeds + 1):
            tag = f"{kind}_s{k}"
            stages.append((tag, ["qa_task.py", *common, *RECIPE["qa_model"],
                                 *RECIPE["squad"], "--bert-model", out / "ns_bert.pt",
                                 "--train-file", train, "--dev-file", dev, "--seed", SEED + k - 1,
                                 "--save", out / f"{tag}_model.pt",
                                 "--predictions", out / f"{tag}_predictions.json", *files(tag),
                                 *start]))
    return [(name, [str(x) for x in argv], out / f"{name}_loss.jsonl") for name, argv in stages]


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
    return dict(EM=test["exact"], F1=test["f1"], questions=test["questions"])


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
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}")


def table(results, label, a):
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    minutes = lambda r: f"{r['seconds'] / 60:.1f} min"
    rows = ["| stage | result | wall time |", "|---|---|---|"]
    if "mlm" in results:
        r = results["mlm"]
        rows.append(f"| 1. masked LM (WikiText-2) | valid ppl {fmt(r.get('valid ppl'), '.2f')}, "
                    f"test ppl {fmt(r.get('test ppl'), '.2f')} | {minutes(r)} |")
    if "ns" in results:
        r = results["ns"]
        rows.append(f"| 2. next sentence (WikiText-2) | test loss {fmt(r.get('test loss'), '.4f')}, "
                    f"accuracy {fmt(r.get('test accuracy'), '.2f')}% | {minutes(r)} |")
    if "span" in results:
        r = results["span"]
        rows.append(f"| 3. span selection (questions made from WikiText-2) | WikiText-2 valid, "
                    f"{r.get('questions', '-')} questions: EM {fmt(r.get('EM'), '.2f')}, F1 "
                    f"{fmt(r.get('F1'), '.2f')} | {minutes(r)} |")
    runs = lambda kind: [results[f"{kind}_s{k}"] for k in range(1, a.seeds + 1)
                         if "F1" in results.get(f"{kind}_s{k}", {})]
    for n, key, what in ((4, "qa", "pretrained"), (5, "qa_random", "random init (baseline)")):
        rs = runs(key)
        if rs:
            f1, em = spread([r["F1"] for r in rs]), spread([r["EM"] for r in rs])
            each = ", ".join(format(r["F1"], ".2f") for r in rs)
            rows.append(f"| {n}. SQuAD v1.1, {what} | {label}, {rs[0]['questions']} questions, "
                        f"{len(rs)} seed{'s' if len(rs) > 1 else ''}: **F1 {f1[0]:.2f} ± {f1[1]:.2f}**"
                        f" (each: {each}), EM {em[0]:.2f} ± {em[1]:.2f} | "
                        f"{', '.join(minutes(r) for r in rs)} |")
    pipeline = sum(results[k]["seconds"] for k in ("mlm", "ns", "span", "qa_s1") if k in results)
    rows.append(f"| pipeline (1-4, one seed of 4) | | **{pipeline / 60:.1f} min** |")
    pairs = [(results[f"qa_s{k}"]["F1"], results[f"qa_random_s{k}"]["F1"]) for k in range(1, a.seeds + 1)
             if "F1" in results.get(f"qa_s{k}", {}) and "F1" in results.get(f"qa_random_s{k}", {})]
    if pairs:
        mean, sd = spread([p - r for p, r in pairs])
        rows.append(f"| pretraining's gain | F1 {mean:+.2f} ± {sd:.2f} points ({len(pairs)} "
                    "seeds, paired by seed) | |")
    rows += ["", "± is the standard deviation over the seeds of the SQuAD steps; the pretraining "
             "(stages 1-3) ran once" + ("" if a.pretrain_seed is None else f", with seed {a.pretrain_seed}")
             + "."]
    return "\n".join(rows)


def same_command(results, name, argv):
    """True when results[name] was made by the command argv."""
    return results.get(name, {}).get("command") == " ".join(argv)


def write_results(out, results, label, a, stages):
    shown = {name: results[name] for name, argv, _ in stages if same_command(results, name, argv)}
    precision = "bf16 autocast" if amp(a) == "bf16" else "fp32"
    text = ["# Laptop recipe: results\n", table(shown, label, a), "",
            f"Machine: {machine()}. Precision: {precision} (--amp {a.amp}).", "", "Commands:", ""]
    text += ["    python " + " ".join(argv) for _, argv, _ in stages]
    tmp = out / "results.md.tmp"
    tmp.write_text("\n".join(text) + "\n")
    tmp.replace(out / "results.md")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def main():
    a = parse()
    out = Path(a.out)
    for flag, folder in (("--wikitext", a.wikitext), ("--squad", a.squad)):
        if not Path(folder).is_dir():
            sys.exit(f"recipe.py: error: {flag} {folder} is not a folder")
    if a.seeds < 1:
        sys.exit("recipe.py: error: --seeds must be at least 1")
    try:
        label = squad.squad_files(Path(a.squad))[2]
        stages = commands(a, out)
    except DataError as e:
        sys.exit(f"recipe.py: error: {e}")
    out.mkdir(parents=True, exist_ok=True)
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
