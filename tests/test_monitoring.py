"""Seeing and using results: progress, TensorBoard, plots, --predict, the laptop recipe."""
import ast
import io
import json
import re
import subprocess
import sys

import pytest

import data
import monitor
from conftest import ROOT, TINY, run_script, script_env, write_squad, write_wikitext


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_lines_when_not_a_terminal():
    out = io.StringIO()
    p = monitor.Progress("tokenizing", total=4, unit="lines", every=0.0, quiet=0.0, stream=out)
    for _ in range(4):
        p.update()
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("| tokenizing: [") and "(1/4 lines)" in lines[0]
    assert "100% (4/4 lines)" in lines[-2] and lines[-1].startswith("| tokenizing: done, 4 lines")
    assert "\r" not in out.getvalue()


def test_progress_bar_on_a_terminal_and_silence_for_quick_work():
    tty = Terminal()
    p = monitor.Progress("evaluating", total=3, unit="batches", quiet=0.0, stream=tty)
    p.update(3)
    p.close()
    assert tty.getvalue().startswith("\r| evaluating: [") and tty.getvalue().endswith("\n")
    quick = io.StringIO()
    for _ in monitor.progress(range(1000), "quick", stream=quick):  # under `quiet` seconds
        pass
    assert quick.getvalue() == ""
    silent = io.StringIO()
    monitor.ENABLED = False
    try:
        p = monitor.Progress("other rank", total=2, every=0.0, quiet=0.0, stream=silent)
        p.update(2)
        p.close()
    finally:
        monitor.ENABLED = True
    assert silent.getvalue() == ""


def test_scripts_print_periodic_progress_lines(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (300, 40, 40))
    env = script_env(BERT_PROGRESS_EVERY="0", BERT_PROGRESS_QUIET="0")
    proc = subprocess.run([sys.executable, str(ROOT / "mlm_task.py"), "--data-dir", str(wt), *TINY,
                           "--epochs", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    # not a terminal: plain lines, never redraws
    assert "\r" not in proc.stdout
    assert re.search(r"^\| tokenizing WikiText2 train: \d+ lines, \d+ s$", proc.stdout, re.M)
    assert re.search(r"^\| tokenizing WikiText2 train: done, 300 lines in ", proc.stdout, re.M)
    assert re.search(r"^\| evaluating: \[#* *\] +\d+% \(\d+/\d+ batches\)", proc.stdout, re.M)


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    wt = write_wikitext(tmp_path / "wt", (300, 40, 40))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "2", "--log-interval", "2",
               "--tensorboard", tmp_path / "tb", cwd=tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/ppl", "train/lr", "train/tokens_per_s", "train/sequences_per_s",
            "valid/loss", "valid/ppl", "test/loss", "test/ppl"} <= tags
    assert [e.step for e in events.Scalars("valid/ppl")] == [1, 2]
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(steps) and len(steps) >= 2
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_s"))


def test_tensorboard_missing_is_one_clear_error(tmp_path):
    fake = tmp_path / "fake"
    (fake / "tensorboard").mkdir(parents=True)
    (fake / "tensorboard" / "__init__.py").write_text("raise ImportError('no tensorboard here')\n")
    wt = write_wikitext(tmp_path / "wt", (100, 30, 30))
    proc = subprocess.run([sys.executable, str(ROOT / "mlm_task.py"), "--data-dir", str(wt), *TINY,
                           "--dry-run", "--tensorboard", str(tmp_path / "tb")], cwd=tmp_path,
                          env=script_env(PYTHONPATH=str(fake)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "pip install tensorboard" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlm_bert.pt").exists()


def test_plot_draws_loss_logs_and_printouts(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "mlm_loss.txt").write_text(
        "lr:    6.0\nepoch   1 | train loss  7.10000\nepoch   2 | train loss  6.50000\n"
        "epoch   1 | val loss  6.90000\nepoch   2 | val loss  6.40000\ntest loss  6.30000\n")
    (tmp_path / "qa.log").write_text(
        "| epoch   1 |    10/   20 batches | lr 0.00100 | ms/batch 5.00 | loss  5.00 | ppl  148.41\n"
        "| epoch   1 |    20/   20 batches | lr 0.00100 | ms/batch 5.00 | loss  4.00 | ppl   54.60\n"
        "| end of epoch   1 | time:  1.00s | valid loss  4.10 | exact    1.000% | f1    5.000%\n"
        "| End of training | dev loss  4.10 | exact    1.000% | f1    5.000%\n")
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(ROOT / "plot.py"), "mlm_loss.txt", "qa.log",
                           "-o", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "2 panels" in proc.stdout
    import plot
    log = plot.read_loss_log(tmp_path / "qa.log")
    assert log["steps"] == [(0.5, 5.0), (1.0, 4.0)] and log["val"] == {1: 4.1} and log["test"] == 4.1
    (tmp_path / "notes.txt").write_text("nothing here\n")
    bad = subprocess.run([sys.executable, str(ROOT / "plot.py"), "notes.txt", "-o", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not a loss log" in bad.stderr and "Traceback" not in bad.stderr


def test_match_feature_marks_context_words_of_the_question():
    paras = [dict(context="Paris is big. Zorblax lives in Paris.", qas=[dict(
        id="a", question="Where does Zorblax live?", answers=[("Paris", 0)])])]
    tok = data.Tokenizer()
    vocab = data.Vocab.build([tok("paris is big . lives in where does")])
    _, f = data.squad_features(paras, tok, vocab, 32)
    c = int(f["ctx_start"][0])
    ctx = tok("Paris is big. Zorblax lives in Paris.")
    marked = [t for t, m in zip(ctx, f["match"][0, c:c + len(ctx)].tolist()) if m]
    assert marked == ["zorblax"]  # an <unk> word still matches by its text; '.' never does
    assert f["match"][0, :c].sum() == 0


@pytest.fixture(scope="module")
def trained_qa(tmp_path_factory):
    """A tiny encoder and a QA model fine-tuned with --match-feature."""
    tmp = tmp_path_factory.mktemp("qa")
    wt = write_wikitext(tmp / "wt", (200, 40, 40))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", cwd=tmp)
    write_squad(tmp / "train.json", copies=5)
    write_squad(tmp / "dev.json", prefix="d")
    run_script("qa_task.py", "--bert-model", "mlm_bert.pt", "--train-file", "train.json",
               "--dev-file", "dev.json", "--batch_size", "8", "--bptt", "48", "--epochs", "2",
               "--match-feature", "--optimizer", "adamw", "--lr", "1e-3", cwd=tmp)
    return tmp


def test_predict_answers_like_the_evaluation(trained_qa):
    tmp = trained_qa
    evaluated = json.loads((tmp / "predictions.json").read_text())
    proc = run_script("qa_task.py", "--predict", "--predict-file", "dev.json", "--bptt", "48",
                      "--predictions", "asked.json", cwd=tmp)
    assert json.loads((tmp / "asked.json").read_text()) == evaluated
    assert len(re.findall(r"^\| answer: .* \| score -?[\d.]+ \| probability [\d.]+$", proc.stdout,
                          re.M)) == 9
    (tmp / "mine.json").write_text(json.dumps([
        {"question": "How tall is the tower?", "context": "The tower is 330 m tall."}]))
    one = run_script("qa_task.py", "--predict", "--question", "How tall is the tower?",
                     "--context", "The tower is 330 m tall.", "--bptt", "48", cwd=tmp)
    listed = run_script("qa_task.py", "--predict", "--predict-file", "mine.json", "--bptt", "48",
                        "--predictions", "mine_answers.json", cwd=tmp)
    answer = re.search(r"^\| answer: (.*) \| score", one.stdout, re.M).group(1)
    assert answer == re.search(r"^\| answer: (.*) \| score", listed.stdout, re.M).group(1)
    assert json.loads((tmp / "mine_answers.json").read_text())["1"] == ast.literal_eval(answer)


@pytest.mark.parametrize("flags, message", [
    (["--question", "Why?"], "add --predict"),
    (["--predict", "--question", "Why?"], "--predict needs --question with --context"),
    (["--predict", "--predict-file", "missing.json"], "cannot read --predict-file missing.json"),
    (["--predict", "--predict-file", "train.json", "--save", "mlm_bert.pt"],
     "'encoder' checkpoint where 'qa_task' is expected"),
])
def test_predict_bad_input(trained_qa, flags, message):
    proc = run_script("qa_task.py", *flags, cwd=trained_qa, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_match_feature_checkpoint_needs_the_flag(trained_qa):
    proc = run_script("qa_task.py", "--bert-model", "mlm_bert.pt", "--train-file", "train.json",
                      "--dev-file", "dev.json", "--bptt", "48", "--checkpoint", "qa_model.pt",
                      "--save", "other.pt", cwd=trained_qa, check=False)
    assert proc.returncode == 2 and "--match-feature" in proc.stderr
    assert "Traceback" not in proc.stderr and not (trained_qa / "other.pt").exists()


def test_random_init_starts_from_fresh_weights(trained_qa):
    import torch
    import utils
    from model import QuestionAnswerTask
    vocab = data.Vocab.load(trained_qa / "torchtext_bert_vocab.pt")
    args = utils.base_parser("x", lr=1, epochs=1, batch_size=1, log_interval=1, save="x",
                             state="").parse_args([])
    args.bert_model, args.dropout = str(trained_qa / "mlm_bert.pt"), None
    pretrained, _ = utils.finetune_model(QuestionAnswerTask, args, vocab, torch.device("cpu"))
    args.random_init = True
    fresh, _ = utils.finetune_model(QuestionAnswerTask, args, vocab, torch.device("cpu"))
    assert pretrained.bert_model.config == fresh.bert_model.config
    a, b = pretrained.bert_model.state_dict(), fresh.bert_model.state_dict()
    assert not torch.equal(a["bert_embed.embed.weight"], b["bert_embed.embed.weight"])


def test_recipe_runs_the_pipeline_and_writes_the_table(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (200, 40, 40))
    squad = tmp_path / "squad"
    squad.mkdir()
    write_squad(squad / "dev-split-train-v1.1.json", copies=3)
    write_squad(squad / "dev-split-eval-v1.1.json", prefix="d")
    cmd = [sys.executable, str(ROOT / "recipe.py"), "--wikitext", str(wt), "--squad", str(squad),
           "--out", str(tmp_path / "out"), "--emsize", "32", "--nhid", "64", "--nlayers", "2",
           "--nhead", "2", "--mlm-epochs", "1", "--cloze-epochs", "1", "--qa-epochs", "1", "--batch-size", "4",
           "--bptt", "32", "--min-sentence-len", "10"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    table = (tmp_path / "out" / "results.md").read_text()
    assert re.search(r"^\| 1\. masked LM \(WikiText-2\) \| valid ppl [\d.]+, test ppl [\d.]+ \|", table, re.M)
    assert re.search(r"^\| 2\. next sentence .* test loss [\d.]+, accuracy [\d.]+% \|", table, re.M)
    assert re.search(r"^\| 3\. span selection \(questions made from WikiText-2\) \| WikiText-2 valid, "
                     r"\d+ questions: EM [\d.]+, F1 [\d.]+ \|", table, re.M)
    for what in ("pretrained encoder", r"random init \(baseline\), fixed word vectors",
                 r"random init \(baseline\), word vectors trained"):
        assert re.search(rf"^\| [456]\. SQuAD v1\.1, {what} \| dev-split, all 9 questions: \*\*EM [\d.]+, "
                         r"F1 [\d.]+\*\*; original-style", table, re.M)
    assert re.search(r"pretraining's gain \| F1 [-+][\d.]+ points over 5; F1 [-+][\d.]+ points over 6 \|",
                     table)
    assert "Machine:" in table and "--match-feature" in table and "--random-init" in table
    assert re.search(r"^\| pipeline \(1-4\) \| \| \*\*[\d.]+ min\*\* \|", table, re.M)
    assert table.count("--freeze-embeddings") == 3  # the QA stages 3-5; stage 6 trains them
    assert table.count("--cloze-dir") == 1 and table.count("--checkpoint") == 1
    again = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and again.stdout.count("done in an earlier run") == 6
    longer = subprocess.run(cmd + ["--qa-epochs", "2", "--no-baseline"], cwd=tmp_path,
                            env=script_env(), capture_output=True, text=True, timeout=600)
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr
    assert re.findall(r"^== (\w+): done in an earlier run", longer.stdout, re.M) == ["mlm", "ns", "cloze"]
    assert re.search(r"^== qa: python qa_task\.py .*--epochs 2", longer.stdout, re.M)
    assert "--tie-weights" in table
    clash = subprocess.run(cmd + ["--freeze-pretraining"], cwd=tmp_path, env=script_env(),
                           capture_output=True, text=True, timeout=60)
    assert clash.returncode != 0 and "add --no-tie-weights" in clash.stderr
    missing = subprocess.run(cmd[:4] + ["--squad", str(wt)], cwd=tmp_path, env=script_env(),
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "dev-split-train-v1.1.json" in missing.stderr
