"""Draw the results of one or more runs into a PNG (needs matplotlib).

    python plot.py mlm_loss.jsonl ns_loss.jsonl qa_loss.jsonl -o curves.png
    python plot.py runs/a/qa_loss.jsonl runs/b/qa_loss.jsonl -o qa.png

Reads the JSON-lines results the task scripts write beside their loss logs (--loss-log's
path with .jsonl).
One loss panel per task (masked LM, next sentence, span selection, SQuAD, told apart by
the file name), one colour per file: the training loss of every log interval, the
validation loss of each epoch (dashed) and the test loss (a star after the last
epoch). Files with exact match and F1 (SQuAD, span selection) add a panel of their F1
per epoch, with the final score as a star.
"""
import argparse
import sys
from pathlib import Path

from monitor import read_results
from utils import UserError

KINDS = (("mlm", "masked LM"), ("ns", "next sentence"),
         ("span", "span selection (WikiText-2 questions)"), ("qa", "SQuAD question answering"))


def curves(records):
    """{'steps': [(fractional epoch, train loss)], 'valid': {epoch: record}, 'test': record
    or None} from a results file's records."""
    out = dict(steps=[], valid={}, test=None)
    for r in records:
        if r["record"] == "train":
            out["steps"].append((r["epoch"] - 1 + r["step"] / r["steps"], r["loss"]))
        elif r["record"] == "valid":
            out["valid"][r["epoch"]] = r
        elif r["record"] == "test":
            out["test"] = r
    return out


def kind_of(path):
    stem = Path(path).stem.lower()
    for prefix, title in KINDS:
        if stem.startswith(prefix):
            return title
    return "loss"


def label_of(path, all_paths):
    p = Path(path)
    names = [Path(q).name for q in all_paths]
    return p.name if names.count(p.name) == 1 else f"{p.parent.name}/{p.name}"


def draw(ax, run, key, label, colour, with_steps):
    """One file's curve of key (loss or f1) on ax."""
    if with_steps and run["steps"]:
        x, y = zip(*run["steps"])
        ax.plot(x, y, "-", linewidth=1, color=colour, label=f"{label}: train (every log interval)")
    epochs = sorted(e for e, r in run["valid"].items() if key in r)
    if epochs:
        ax.plot(epochs, [run["valid"][e][key] for e in epochs], "--", marker="s", color=colour,
                label=f"{label}: valid")
    if run["test"] is not None and key in run["test"]:
        last = max([*run["valid"], 0])
        ax.plot([last + 0.25], [run["test"][key]], "*", markersize=12, color=colour,
                label=f"{label}: {run['test'].get('split', 'test')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("results", nargs="+",
                    help="results files of the tasks (mlm_loss.jsonl, ns_loss.jsonl, qa_loss.jsonl)")
    ap.add_argument("-o", "--output", default="curves.png", help="the PNG to write")
    ap.add_argument("--title", default=None, help="a title over the panels")
    a = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        sys.exit(f"plot.py: error: drawing needs matplotlib ({e}); install it with "
                 "`pip install matplotlib`")
    out = Path(a.output)
    if not out.parent.is_dir():
        sys.exit(f"plot.py: error: the folder of --output {out} does not exist; create it first")
    runs = {}
    for path in a.results:
        try:
            runs[path] = curves(read_results(path))
        except FileNotFoundError:
            sys.exit(f"plot.py: error: {path} not found; pass a results file (a task's --loss-log path with .jsonl)")
        except UserError as e:  # a format version this code does not read
            sys.exit(f"plot.py: error: {e}")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            sys.exit(f"plot.py: error: {path} is not a results file of the task scripts: {e}")
        if not runs[path]["steps"] and not runs[path]["valid"] and runs[path]["test"] is None:
            sys.exit(f"plot.py: error: {path} holds no records yet")

    # (title, key): a loss panel per kind, then an F1 panel per kind that has F1
    panels = [(kind_of(p), "loss") for p in runs]
    panels += [(kind_of(p), "f1") for p, run in runs.items()
               if any("f1" in r for r in [*run["valid"].values(), run["test"] or {}])]
    panels = list(dict.fromkeys(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (path, run) in enumerate(runs.items()):
        for key in ("loss", "f1"):
            if (kind_of(path), key) in panels:
                ax = axes[0][panels.index((kind_of(path), key))]
                draw(ax, run, key, label_of(path, list(runs)), colours[i % len(colours)],
                     with_steps=key == "loss")
    for ax, (title, key) in zip(axes[0], panels):
        ax.set_title(title if key == "loss" else f"{title}: F1")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if key == "loss" else "F1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if a.title:
        fig.suptitle(a.title)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    print(f"| wrote {out} ({len(runs)} results files, {len(panels)} panels)")


if __name__ == "__main__":
    main()
