"""Draw the loss logs of one or more runs into a PNG (needs matplotlib).

    python plot.py mlm_loss.txt ns_loss.txt qa_loss.txt -o curves.png
    python plot.py runs/a/qa_loss.txt runs/b/qa_loss.txt -o qa.png

Reads the files the task scripts write (--loss-log): the train and validation loss of
each epoch and the test loss; or their printouts saved to a file (python mlm_task.py
... > mlm.log), which add the training loss of every --log-interval. One panel per task (masked LM, next sentence, span
selection, SQuAD, told apart by the file name), one colour per file; train loss solid, validation
dashed, the test loss a star after the last epoch.
"""
import argparse
import re
import sys
from pathlib import Path

KINDS = (("mlm", "masked LM"), ("ns", "next sentence"),
         ("cloze", "span selection (WikiText-2 questions)"), ("qa", "SQuAD question answering"))


def read_loss_log(path):
    """{'train': {epoch: loss}, 'val': {epoch: loss}, 'test': float or None, 'steps':
    [(fractional epoch, loss)]} from a loss log or a printout; ValueError when the file
    holds none of their lines."""
    log = dict(train={}, val={}, test=None, steps=[])
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| epoch\s+(\d+) \|\s*(\d+)/\s*(\d+) batches \|.*\| loss\s+(\S+)", line)
        if m:
            e, b, n, loss = m.groups()
            log["steps"].append((int(e) - 1 + int(b) / int(n), float(loss)))
            continue
        m = re.match(r"\| end of epoch\s+(\d+) \|.*?\| valid loss\s+(\S+)", line)
        if m:
            log["val"][int(m.group(1))] = float(m.group(2))
            continue
        m = re.match(r"\| End of training \| \S+ loss\s+(\S+)", line)
        if m:
            log["test"] = float(m.group(1))
            continue
        m = re.match(r"epoch\s+(\d+) \| (train|val) loss\s+(\S+)$", line.strip())
        if m:
            log[m.group(2)][int(m.group(1))] = float(m.group(3))
            continue
        m = re.match(r"test loss\s+(\S+)$", line.strip())
        if m:
            log["test"] = float(m.group(1))
    if not log["train"] and not log["val"] and log["test"] is None and not log["steps"]:
        raise ValueError("no 'epoch N | train loss', 'epoch N | val loss' or 'test loss' lines")
    return log


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("logs", nargs="+", help="loss logs (mlm_loss.txt, ns_loss.txt, qa_loss.txt)")
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
    logs = {}
    for path in a.logs:
        try:
            logs[path] = read_loss_log(path)
        except FileNotFoundError:
            sys.exit(f"plot.py: error: {path} not found; pass a loss log (--loss-log of a task)")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            sys.exit(f"plot.py: error: {path} is not a loss log written by the task scripts: {e}")

    panels = list(dict.fromkeys(kind_of(p) for p in logs))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (path, log) in enumerate(logs.items()):
        ax = axes[0][panels.index(kind_of(path))]
        c, label = colours[i % len(colours)], label_of(path, list(logs))
        if log["steps"]:
            x, y = zip(*log["steps"])
            ax.plot(x, y, "-", linewidth=1, color=c, label=f"{label}: train (every log interval)")
        for part, style, marker in (("train", "-", "o"), ("val", "--", "s")):
            if log[part]:
                epochs = sorted(log[part])
                ax.plot(epochs, [log[part][e] for e in epochs], style, marker=marker, color=c,
                        label=f"{label}: {'train' if part == 'train' else 'valid'}")
        if log["test"] is not None:
            last = max([*log["train"], *log["val"], 0])
            ax.plot([last + 0.25], [log["test"]], "*", markersize=12, color=c,
                    label=f"{label}: test")
    for ax, title in zip(axes[0], panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if a.title:
        fig.suptitle(a.title)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    print(f"| wrote {out} ({len(logs)} loss logs, {len(panels)} panels)")


if __name__ == "__main__":
    main()
