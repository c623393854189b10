"""Shared helpers: tiny corpora in the real formats, and running the scripts."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("the cat sat on a mat . the dog ran fast , and a big red house @-@ tree "
         "stood near the river ( it was 1 @,@ 200 m long ) ; = = history = =").split()


def write_wikitext(folder, lines_per_split=(300, 40, 40), seed=0):
    """wiki.{train,valid,test}.tokens in WikiText's layout (' word word \\n', blank lines)."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), lines_per_split):
        with open(folder / f"wiki.{split}.tokens", "w", encoding="utf-8") as f:
            for _ in range(n):
                k = rng.choice([0, 5, 20, 40])
                f.write(" " + " ".join(rng.choice(WORDS) for _ in range(k)) + " \n")
    return folder


TINY = ["--emsize", "32", "--nhid", "64", "--nlayers", "2", "--nhead", "2",
        "--batch_size", "4", "--bptt", "16", "--log-interval", "10", "--cache-dir", ""]


def script_env(**extra):
    """The scripts' environment in tests: unbuffered output, and no GPU even where there
    is one, so that every run (DDP ones included) is the CPU run the tests expect."""
    return dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", **extra)


def run_script(script, *args, cwd, check=True, timeout=300):
    """Run one of the task scripts as a user would; returns the CompletedProcess."""
    env = script_env()
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_without(package, tmp_path, *flags):
    """mlm_task.py on a tiny corpus, where importing package fails (an optional
    dependency that is not installed); returns the CompletedProcess."""
    fake = tmp_path / "fake"
    (fake / package).mkdir(parents=True)
    (fake / package / "__init__.py").write_text(f"raise ImportError('no {package} here')\n")
    wt = write_wikitext(tmp_path / "wt", (100, 30, 30))
    return subprocess.run([sys.executable, str(ROOT / "mlm_task.py"), "--data-dir", str(wt), *TINY,
                           "--dry-run", *map(str, flags)], cwd=tmp_path,
                          env=script_env(PYTHONPATH=str(fake)), capture_output=True, text=True,
                          timeout=300)


def id_vocab(size=1000):
    """A vocabulary whose tokens are their own ids written out ("17" has id 17)."""
    import data
    return data.Vocab([str(i) for i in range(size)], roles=data.Roles(0, 1, 2, 3, 4, 5), tag="ids")


def id_store(folder, lines, vocab_size=1000):
    """A token store (store.Tokens of all its lines) holding the given lines of ids."""
    import numpy as np
    import store
    text = folder / "ids.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("".join(" ".join(map(str, line)) + "\n" for line in lines))

    def encode(lines):
        per_line = [line.split() for line in lines]
        return (np.array([int(t) for t in sum(per_line, [])], np.int64),
                np.array([len(t) for t in per_line], np.int64))
    source = store.Source("ids", [text], lambda files: (line for f in files for line in open(f)),
                          encode, "ids", id_vocab(vocab_size))
    built = store.build(source, folder / "store", workers=1, show=False)
    return built.lines(0, built.num_lines)


class Payload:
    """What a pickled file that would run code holds (never to be loaded)."""
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.fixture
def wikitext(tmp_path):
    return write_wikitext(tmp_path / "wikitext")


SQUAD_PARAGRAPHS = [
    ("The Eiffel Tower, built in 1889, is 330 m tall. It stands in Paris, the capital of France.",
     [("When was the Eiffel Tower built?", "1889"), ("How tall is the tower?", "330 m"),
      ("Where does it stand?", "Paris"), ("Paris is the capital of which country?", "France")]),
    ('The river "Rhine" flows through Basel; it is 1,230 km long and ends in the North Sea.',
     [("Which river flows through Basel?", "Rhine"), ("How long is the Rhine?", "1,230 km"),
      ("Where does the Rhine end?", "the North Sea")]),
    ("Prime numbers have exactly two divisors: one and themselves. Two is the only even prime.",
     [("How many divisors does a prime have?", "two"), ("Which prime is even?", "Two")]),
]


def write_squad(path, paragraphs=SQUAD_PARAGRAPHS, copies=1, prefix="q"):
    """A SQuAD v1.1 file: each (context, [(question, answer)]) becomes a paragraph whose
    answer_start is the answer's first occurrence in the context."""
    import json
    data, n = [], 0
    for c in range(copies):
        paras = []
        for context, qas in paragraphs:
            items = []
            for question, answer in qas:
                start = context.index(answer)
                items.append({"id": f"{prefix}{n}", "question": question,
                              "answers": [{"text": answer, "answer_start": start}]})
                n += 1
            paras.append({"context": context, "qas": items})
        data.append({"title": f"T{c}", "paragraphs": paras})
    Path(path).write_text(json.dumps({"data": data, "version": "1.1"}))
    return Path(path)
