"""Benchmark of the data path as the corpus grows: a BookCorpus folder of K copies of
WikiText-2's training text, a tiny model and --dry-run, so that what is measured is the
preparation of the data and what a run holds of it, not the model.

    python bench_data.py --wikitext DIR                 # K = 1, 4, 16
    python bench_data.py --wikitext DIR --copies 1 4 --out /tmp/bench

For each K it prints: the first run's wall time (vocabulary and token store built from
nothing) and the build's speed in tokens/s (all splits' tokens over the first run's time
less a run's from the built store), the start-up of a run from the built store (its wall
time), the peak resident memory of mlm_task.py in one process, of each of two torchrun
processes, and of ns_task.py, and the bytes the store takes on disk. Then, at the largest
K, the store's build alone with 1 process and with every core, and with WordPiece. The
scripts measured are those beside this file (copy it into another checkout to measure
that one).
"""
import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TINY = ["--emsize", "32", "--nhid", "64", "--nlayers", "2", "--nhead", "2", "--batch_size", "32",
        "--bptt", "128", "--device", "cpu", "--dry-run"]
# Runs a script and prints its peak resident memory at exit (each torchrun process does).
WRAPPER = """import os, resource, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
try:
    runpy.run_path(script, run_name="__main__")
finally:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stderr.write(f"@@peak-rss {os.environ.get('RANK', '0')} {peak}\\n")
"""


def cpu_name():
    """The CPU's model and whether it has AVX-512 BF16 (the two kinds of this machine)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = " (AVX-512 BF16)" if "avx512_bf16" in info else " (no AVX-512 BF16)"
    return (model.group(1).strip() if model else "unknown CPU") + flags


def make_corpus(wikitext, folder, copies):
    """A BookCorpus folder of `copies` copies of wiki.train.tokens[.gz]."""
    src = next((Path(wikitext) / n for n in ("wiki.train.tokens", "wiki.train.tokens.gz")
                if (Path(wikitext) / n).is_file()), None)
    if src is None:
        sys.exit(f"bench_data.py: error: no wiki.train.tokens[.gz] in {wikitext}")
    folder.mkdir(parents=True, exist_ok=True)
    text = (gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb")).read()
    for k in range(copies):
        (folder / f"book{k:03d}.txt").write_bytes(text)


def run(args, cwd, nproc=1):
    """(wall seconds, {rank: peak RSS in MB}, stdout) of one script run, measured."""
    wrapper = cwd / "_measure.py"
    wrapper.write_text(WRAPPER)
    if nproc == 1:
        cmd = [sys.executable, str(wrapper), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), str(wrapper), *args, "--parallel", "DDP"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", BERT_PROGRESS_QUIET="1e9")
    start = time.time()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"bench_data.py: error: {' '.join(map(str, args[:2]))} failed:\n{proc.stdout[-2000:]}"
                 f"\n{proc.stderr[-2000:]}")
    peaks = {int(r): int(kb) / 1024 for r, kb in re.findall(r"@@peak-rss (\d+) (\d+)", proc.stderr)}
    return seconds, peaks, proc.stdout


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def measure(copies, wikitext, work):
    """One row of the table: K copies."""
    books, cache = work / f"books{copies}", work / f"cache{copies}"
    make_corpus(wikitext, books, copies)
    shutil.rmtree(cache, ignore_errors=True)
    (work / "vocab.txt").unlink(missing_ok=True)
    mlm = [str(ROOT / "mlm_task.py"), "--dataset", "BookCorpus", "--data-dir", str(books),
           "--cache-dir", str(cache), "--save-vocab", "vocab.txt", *TINY]
    cold, _, out = run(mlm, work)
    tokens = sum(int(n) for n in re.findall(r"\| (?:train|valid|test): (\d+) tokens", out))
    warm, one, _ = run(mlm, work)
    _, two, _ = run(mlm, work, nproc=2)
    ns = [str(ROOT / "ns_task.py"), "--bert-model", "mlm_bert.pt", "--dataset", "BookCorpus",
          "--data-dir", str(books), "--cache-dir", str(cache), "--save-vocab", "vocab.txt",
          "--batch_size", "24", "--bptt", "128", "--device", "cpu", "--dry-run"]
    _, ns_peak, _ = run(ns, work)
    shutil.rmtree(books)
    return dict(K=copies, tokens=tokens, cold=cold, build=tokens / max(cold - warm, 1e-9),
                warm=warm, one=one[0], two=[two[r] for r in sorted(two)], ns=ns_peak[0],
                store=folder_bytes(cache))


def build_scaling(wikitext, work, copies):
    """The store's build alone at K copies: 1 process, every core, and WordPiece."""
    try:
        import corpus
        import data
        import store
    except ImportError:
        return []  # a checkout without the token store
    books = work / "books_scaling"
    make_corpus(wikitext, books, copies)
    sources = corpus.corpus_sources("BookCorpus", books)
    files = sources["train"][0]
    words = data.Tokenizer()
    vocab = data.Vocab.from_counts(corpus.count_vocab("BookCorpus", sources, words, show=False))
    rows = []
    tokenizers = [("basic_english", words, vocab)]
    try:
        import wordpiece
        itos = wordpiece.train_vocab(corpus.read_lines(files[:1]), 30522)
        (work / "wp_vocab.txt").write_text("\n".join(itos) + "\n")
        tokenizers.append(("WordPiece", wordpiece.WordPiece(work / "wp_vocab.txt"),
                           wordpiece.load_vocab(work / "wp_vocab.txt")))
    except data.DataError:
        print("| (WordPiece not measured: pip install tokenizers)")
    for name, tok, voc in tokenizers:
        for workers in sorted({1, store.cores()}):
            source = store.Source("BookCorpus", files, corpus.read_lines,
                                  corpus.line_encoder("BookCorpus", tok, voc), tok.name, voc)
            start = time.time()
            built = store.build(source, work / f"scaling-{name}-{workers}", workers, show=False)
            rows.append((name, workers, built.num_tokens, time.time() - start))
            shutil.rmtree(work / f"scaling-{name}-{workers}")
    shutil.rmtree(books)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--wikitext", required=True, help="folder with WikiText-2's wiki.train.tokens[.gz]")
    p.add_argument("--copies", type=int, nargs="+", default=[1, 4, 16], metavar="K",
                   help="corpus sizes, in copies of WikiText-2's training text")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    a = p.parse_args()
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"| {cpu_name()}, {os.cpu_count()} cores; scripts of {ROOT}")
    print("| K | tokens | first run | build tokens/s | start-up from the store | peak RSS, 1 process "
          "| peak RSS, each of 2 torchrun processes | ns_task.py peak RSS | store on disk |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for k in a.copies:
            r = measure(k, a.wikitext, work)
            print(f"| {r['K']} | {r['tokens'] / 1e6:.1f}M | {r['cold']:.1f} s | "
                  f"{r['build'] / 1e6:.2f}M | {r['warm']:.1f} s | {r['one']:.0f} MB | "
                  f"{', '.join(f'{x:.0f}' for x in r['two'])} MB | {r['ns']:.0f} MB | "
                  f"{r['store'] / 1e6:.1f} MB |", flush=True)
        rows = build_scaling(a.wikitext, work, max(a.copies))
        if rows:
            print(f"\n| the store's build alone, K = {max(a.copies)} (all K files) | processes "
                  "| tokens | seconds | tokens/s |\n|---|---|---|---|---|")
            for name, workers, tokens, seconds in rows:
                print(f"| {name} | {workers} | {tokens / 1e6:.1f}M | {seconds:.1f} | "
                      f"{tokens / seconds / 1e6:.2f}M |")
    finally:
        if not a.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
