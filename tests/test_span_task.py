"""span_task.py: span-selection pretraining on questions made from WikiText, new ones every
epoch, then SQuAD from its model."""
import json
import re

import torch

import checkpoint
import monitor
from conftest import TINY, run_script, write_squad, write_wikitext


def test_span_selection_then_squad(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (200, 40, 40))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", cwd=tmp_path)
    common = ["--bert-model", "mlm_bert.pt", "--batch_size", "8", "--bptt", "48",
              "--optimizer", "adamw", "--lr", "1e-3", "--match-feature"]
    span = run_script("span_task.py", *common, "--data-dir", wt, "--epochs", "3",
                      "--log-interval", "1000", cwd=tmp_path)
    found = re.search(r"^\| (\d+) questions made from wiki\.train\.tokens \((\d+) windows with the "
                      r"answer inside\), \d+ from wiki\.valid\.tokens; new ones every epoch$",
                      span.stdout, re.M)
    first = int(found.group(2))
    later = re.findall(r"^\| epoch (\d): (\d+) other questions \(seed (\d)\), (\d+) windows$",
                       span.stdout, re.M)
    assert [(e, s) for e, _, s, _ in later] == [("2", "1"), ("3", "2")]
    assert all(0 < int(n) <= first for *_, n in later)  # never more steps than the first epoch
    assert re.search(r"^\| End of training \| valid loss .*\n\| original-style token metrics "
                     r"\(\d+ of \d+ questions\)", span.stdout, re.M)
    test = monitor.read_results(tmp_path / "span_loss.jsonl")[-1]
    answers = json.loads((tmp_path / "span_predictions.json").read_text())
    assert test["record"] == "test" and test["questions"] == len(answers) > 5
    assert all(k.startswith("span-") for k in answers)
    write_squad(tmp_path / "train.json", copies=2)
    write_squad(tmp_path / "dev.json", prefix="d")
    qa = run_script("qa_task.py", *common, "--epochs", "1", "--train-file", "train.json",
                    "--dev-file", "dev.json", "--checkpoint", "span_model.pt", cwd=tmp_path)
    assert "| starting from the weights in span_model.pt" in qa.stdout
    before = checkpoint.load(tmp_path / "span_model.pt", "qa_task")["model"]
    after = checkpoint.load(tmp_path / "qa_model.pt", "qa_task")["model"]
    assert set(before) == set(after) and not torch.equal(before["qa_span.weight"],
                                                          after["qa_span.weight"])


def test_span_task_needs_wikitext(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_script("span_task.py", "--data-dir", tmp_path / "empty", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "WikiText2 not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
