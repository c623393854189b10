"""plot.py: the curves of the results files."""
import json
import subprocess
import sys

import pytest

import monitor
from conftest import ROOT


def test_plot_draws_the_results_files(tmp_path):
    pytest.importorskip("matplotlib")
    import plot
    (tmp_path / "mlm_loss.jsonl").write_text("\n".join(json.dumps(r) for r in [
        dict(record="train", epoch=1, step=5, steps=10, loss=7.1, ppl=1212.0, lr=1.0, ms_per_batch=1.0),
        dict(record="train", epoch=1, step=10, steps=10, loss=6.9, ppl=992.0, lr=1.0, ms_per_batch=1.0),
        dict(record="valid", epoch=1, seconds=1.0, loss=6.8, ppl=898.0),
        dict(record="test", split="test", loss=6.7, ppl=812.0)]) + "\n")
    qa = [dict(record="valid", epoch=e, seconds=1.0, loss=4.0 - e, exact=e, f1=5.0 * e) for e in (1, 2)]
    qa.append(dict(record="test", split="dev", loss=2.0, exact=2.0, f1=10.0))
    (tmp_path / "qa_loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(ROOT / "plot.py"), "mlm_loss.jsonl", "qa_loss.jsonl",
                           "-o", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "3 panels" in proc.stdout  # F1 too
    run = plot.curves(monitor.read_results(tmp_path / "mlm_loss.jsonl"))
    assert run["steps"] == [(0.5, 7.1), (1.0, 6.9)] and run["valid"][1]["loss"] == 6.8
    assert run["test"]["ppl"] == 812.0
    (tmp_path / "notes.txt").write_text("| epoch   1 |    10/   20 batches | loss  5.00\n")
    bad = subprocess.run([sys.executable, str(ROOT / "plot.py"), "notes.txt", "-o", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not a results file" in bad.stderr and "Traceback" not in bad.stderr
