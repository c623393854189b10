"""qa_task.py: SQuAD fine-tuning end to end, its choices of model and answers, and
--predict."""
import ast
import gzip
import json
import re

import pytest
import torch

import data
import checkpoint
import monitor
from conftest import TINY, run_script, write_squad, write_wikitext


def test_pipeline_mlm_ns_qa(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (200, 40, 40))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", cwd=tmp_path)
    common = ["--batch_size", "8", "--bptt", "48", "--log-interval", "5", "--epochs", "2"]
    ns = run_script("ns_task.py", "--bert-model", "mlm_bert.pt", "--dataset", "WikiText2",
                    "--data-dir", wt, "--min_sentence_len", "10", *common, cwd=tmp_path)
    assert re.search(r"^\| end of epoch +1 \| time: +[\d.]+s \| valid loss +[\d.]+ \| valid accuracy",
                     ns.stdout, re.M)
    assert re.search(r"^\| End of training \| test loss +[\d.]+ \| test ppl +[\d.]+ \| test accuracy",
                     ns.stdout, re.M)
    assert (tmp_path / "ns_loss.txt").read_text().splitlines()[-1].startswith("test loss")
    vocab = data.Vocab.load(tmp_path / "torchtext_bert_vocab.pt")
    assert checkpoint.load_encoder(tmp_path / "ns_bert.pt", vocab).config["ninp"] == 32
    write_squad(tmp_path / "train.json", copies=5)
    write_squad(tmp_path / "dev.json", prefix="d")
    qa = run_script("qa_task.py", "--bert-model", "ns_bert.pt", "--train-file", "train.json",
                    "--dev-file", "dev.json", *common, cwd=tmp_path)
    assert re.search(r"^\| end of epoch +2 \| time: +[\d.]+s \| valid loss +[\d.]+ \| exact +[\d.]+% \| "
                     r"f1 +[\d.]+%$", qa.stdout, re.M)
    assert re.search(r"^\| original-style token metrics \(\d+ of 9 questions\)", qa.stdout, re.M)
    assert re.search(r"^\| End of training \| dev loss", qa.stdout, re.M)
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert sorted(preds) == sorted(f"d{i}" for i in range(9))
    assert all(isinstance(v, str) for v in preds.values())
    ckpt = checkpoint.load(tmp_path / "qa_model.pt", "qa_task")
    assert "qa_span.weight" in ckpt["model"]
    # choosing on held-out training articles: the dev file is scored once, at the end
    held = run_script("qa_task.py", "--bert-model", "ns_bert.pt", "--train-file", "train.json",
                      "--dev-file", "dev.json", "--holdout-articles", "2", *common,
                      "--save", "held.pt", "--predictions", "held.json", "--loss-log", "held.txt",
                      cwd=tmp_path)
    assert "| train: 27 questions" in held.stdout and "| held-out articles (2): 18 questions" in held.stdout
    records = monitor.read_results(tmp_path / "held.jsonl")
    assert [r["questions"] for r in records if r["record"] == "valid"] == [18, 18]
    assert records[-1]["record"] == "test" and records[-1]["questions"] == 9
    assert re.search(r"^\| End of training \| test loss", held.stdout, re.M)
    assert sorted(json.loads((tmp_path / "held.json").read_text())) == sorted(f"d{i}" for i in range(9))
    for n, match in (("5", "has 5 articles: cannot hold out 5"), ("-1", "must be 0 .off. or positive")):
        bad = run_script("qa_task.py", "--bert-model", "ns_bert.pt", "--train-file", "train.json",
                         "--dev-file", "dev.json", "--holdout-articles", n, *common,
                         "--save", "held.pt", cwd=tmp_path, check=False)
        assert bad.returncode == 2 and re.search(match, bad.stderr) and "Traceback" not in bad.stderr
    # a step fed the wrong file: one clear line, exit 2, nothing overwritten
    before = (tmp_path / "ns_bert.pt").read_bytes()
    bad = run_script("ns_task.py", "--bert-model", "ns_model.pt", "--dataset", "WikiText2",
                     "--data-dir", wt, *common, cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "'ns_task' checkpoint where 'encoder' is expected" in bad.stderr
    assert (tmp_path / "ns_bert.pt").read_bytes() == before
    short = run_script("qa_task.py", "--bert-model", "ns_bert.pt", "--train-file", "train.json",
                       "--dev-file", "dev.json", "--bptt", "8", cwd=tmp_path, check=False)
    assert short.returncode == 2 and "raise --bptt" in short.stderr and "Traceback" not in short.stderr


def test_freeze_embeddings_keeps_the_word_vectors(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (150, 30, 30))
    key = "bert_embed.embed.weight"
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", "--layout", "pre-ln",
               cwd=tmp_path)
    enc = checkpoint.load(tmp_path / "mlm_bert.pt", "encoder")["model"]
    write_squad(tmp_path / "train.json", copies=2)
    write_squad(tmp_path / "dev.json", prefix="d")
    common = ["--bert-model", "mlm_bert.pt", "--train-file", "train.json", "--dev-file", "dev.json",
              "--batch_size", "8", "--bptt", "48", "--epochs", "1", "--optimizer", "adamw",
              "--lr", "1e-2", "--match-feature"]
    proc = run_script("qa_task.py", *common, "--freeze-embeddings", cwd=tmp_path)
    assert "--freeze-embeddings: the word embeddings stay as loaded" in proc.stdout
    qa = checkpoint.load(tmp_path / "qa_model.pt", "qa_task")["model"]
    assert torch.equal(qa["bert_model." + key], enc[key])
    assert not torch.equal(qa["bert_model.layers.0.linear1.weight"], enc["layers.0.linear1.weight"])
    assert qa["bert_model.final_norm.weight"].shape == enc["final_norm.weight"].shape  # pre-LN kept
    run_script("qa_task.py", *common, "--save", "moved.pt", cwd=tmp_path)
    moved = checkpoint.load(tmp_path / "moved.pt", "qa_task")["model"]
    assert not torch.equal(moved["bert_model." + key], enc[key])


def _tiny_squad_run(tmp_path, copies, epochs):
    """A tiny encoder in tmp_path, SQuAD files of `copies` training articles and one
    evaluation article, and qa_task.py flags that fine-tune it for `epochs`."""
    wt = write_wikitext(tmp_path / "wt", (200, 40, 40))
    run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", cwd=tmp_path)
    write_squad(tmp_path / "train.json", copies=copies)
    write_squad(tmp_path / "dev.json", prefix="d")
    return ["--bert-model", "mlm_bert.pt", "--batch_size", "8", "--bptt", "48", "--epochs",
            str(epochs), "--optimizer", "adamw", "--lr", "1e-3", "--train-file", "train.json",
            "--dev-file", "dev.json", "--doc-stride", "16"]


def test_expected_f1_answers_end_to_end(tmp_path):
    common = _tiny_squad_run(tmp_path, copies=2, epochs=1)
    runs = {}
    for name, extra in (("best", []), ("ef1", ["--decode", "expected-f1"]),
                        ("cold", ["--decode", "expected-f1", "--decode-temperature", "1e-6"])):
        run_script("qa_task.py", *common, *extra, "--predictions", f"{name}.json",
                   "--loss-log", f"{name}.txt", cwd=tmp_path)
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
        record = monitor.read_results(tmp_path / f"{name}.jsonl")[-1]
        assert record["questions"] == len(runs[name]) > 0
    # the same model (same seed): only the choice of span differs; near 0 K it is the best span
    assert runs["cold"] == runs["best"]
    assert all(isinstance(v, str) for v in runs["ef1"].values())
    bad = run_script("qa_task.py", *common, "--decode-temperature", "0.5", cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "--decode-temperature is for --decode expected-f1" in bad.stderr


def test_keep_last_trains_on_every_article_and_scores_the_evaluation_file_once(tmp_path):
    common = _tiny_squad_run(tmp_path, copies=3, epochs=2)
    # the same run choosing on the dev file scores it after every epoch: the reference
    run_script("qa_task.py", *common, "--loss-log", "best.txt", "--save", "best.pt",
               "--predictions", "best.json", cwd=tmp_path)
    proc = run_script("qa_task.py", *common, "--keep", "last", "--loss-log", "last.txt",
                      "--save", "last.pt", "--predictions", "last.json", cwd=tmp_path)
    assert "| train: 27 questions" in proc.stdout  # all 3 articles
    assert "| evaluation, scored once at the end: 9 questions" in proc.stdout
    assert proc.stdout.count("nothing scored: the last epoch is kept") == 2
    records = monitor.read_results(tmp_path / "last.jsonl")
    assert not [r for r in records if r["record"] == "valid"]  # no file scored between epochs
    assert records[-1]["record"] == "test" and records[-1]["questions"] == 9
    # the kept model is the last epoch's: its score on the dev file is the reference's
    # epoch 2 (the same seed trains the same model)
    reference = [r for r in monitor.read_results(tmp_path / "best.jsonl") if r["record"] == "valid"]
    assert [r["epoch"] for r in reference] == [1, 2]
    assert records[-1]["f1"] == reference[1]["f1"]
    assert records[-1]["loss"] == pytest.approx(reference[1]["loss"], rel=1e-5)
    # with held-out articles, their scores are shown every epoch and the last epoch is kept
    held = run_script("qa_task.py", *common, "--keep", "last", "--holdout-articles", "1",
                      "--loss-log", "held.txt", "--save", "held.pt", "--predictions", "held.json",
                      cwd=tmp_path)
    assert "| train: 18 questions" in held.stdout and "nothing scored" not in held.stdout
    assert len([r for r in monitor.read_results(tmp_path / "held.jsonl") if r["record"] == "valid"]) == 2


def test_the_file_scored_at_the_end_is_read_before_training(tmp_path):
    common = _tiny_squad_run(tmp_path, copies=3, epochs=1)
    (tmp_path / "broken.json").write_text('{"data": [')
    for flags in ([], ["--keep", "last"], ["--holdout-articles", "1"]):
        bad = run_script("qa_task.py", *common, *flags, "--test-file", "broken.json",
                         "--save", "bad.pt", "--loss-log", "bad.txt", cwd=tmp_path, check=False)
        assert bad.returncode == 2 and "cannot read SQuAD file broken.json" in bad.stderr
        assert "Traceback" not in bad.stderr and "end of epoch" not in bad.stdout
        assert not (tmp_path / "bad.pt").exists()
    # trained blind on every article, a dev file it would never score is not read
    blind = [a if a != "dev.json" else "absent.json" for a in common]
    proc = run_script("qa_task.py", *blind, "--keep", "last", "--test-file", "dev.json",
                      "--loss-log", "blind.txt", cwd=tmp_path)
    assert "| evaluation, scored once at the end: 9 questions" in proc.stdout
    assert monitor.read_results(tmp_path / "blind.jsonl")[-1]["questions"] == 9


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
    proc = run_script("qa_task.py", "--predict", "dev.json", "--bptt", "48",
                      "--predictions", "asked.json", cwd=tmp)
    assert json.loads((tmp / "asked.json").read_text()) == evaluated
    with gzip.open(tmp / "dev.json.gz", "wt", encoding="utf-8") as f:  # as the SQuAD files
        f.write((tmp / "dev.json").read_text())
    run_script("qa_task.py", "--predict", "dev.json.gz", "--bptt", "48",
               "--predictions", "asked_gz.json", cwd=tmp)
    assert json.loads((tmp / "asked_gz.json").read_text()) == evaluated
    (tmp / "plain.json.gz").write_text((tmp / "dev.json").read_text())
    bad = run_script("qa_task.py", "--predict", "plain.json.gz", "--bptt", "48",
                     cwd=tmp, check=False)
    assert bad.returncode == 2 and "cannot read --predict plain.json.gz" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert len(re.findall(r"^\| answer: .* \| score -?[\d.]+ \| probability [\d.]+$", proc.stdout,
                          re.M)) == 9
    (tmp / "mine.json").write_text(json.dumps([
        {"question": "How tall is the tower?", "context": "The tower is 330 m tall."}]))
    one = run_script("qa_task.py", "--predict", "--question", "How tall is the tower?",
                     "--context", "The tower is 330 m tall.", "--bptt", "48", cwd=tmp)
    listed = run_script("qa_task.py", "--predict", "mine.json", "--bptt", "48",
                        "--predictions", "mine_answers.json", cwd=tmp)
    answer = re.search(r"^\| answer: (.*) \| score", one.stdout, re.M).group(1)
    assert answer == re.search(r"^\| answer: (.*) \| score", listed.stdout, re.M).group(1)
    assert json.loads((tmp / "mine_answers.json").read_text())["1"] == ast.literal_eval(answer)


@pytest.mark.parametrize("flags, message", [
    (["--question", "Why?"], "add --predict"),
    (["--predict", "--question", "Why?"], "--predict needs --question with --context"),
    (["--predict", "dev.json", "--question", "Why?"], "--predict dev.json answers the questions of that file: drop --question"),
    (["--predict", "missing.json"], "cannot read --predict missing.json"),
    (["--predict", "--question", "Why?", "--context", ""], "--context is empty"),
    (["--predict", "--question", "  ", "--context", "The sky is blue."], "--question is empty"),
    (["--predict", "train.json", "--save", "mlm_bert.pt"],
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
    import dist
    import qa_task
    vocab = data.Vocab.load(trained_qa / "torchtext_bert_vocab.pt")
    args = qa_task.build_parser().parse_args(["--bert-model", str(trained_qa / "mlm_bert.pt")])
    pretrained = qa_task.encoder(args, vocab, dist.Context())
    args.random_init = True
    fresh = qa_task.encoder(args, vocab, dist.Context())
    assert pretrained.config == fresh.config
    a, b = pretrained.state_dict(), fresh.state_dict()
    assert not torch.equal(a["bert_embed.embed.weight"], b["bert_embed.embed.weight"])


def test_shape_feature_from_a_model_without_it(trained_qa):
    """--shape-feature fine-tunes on from a QA model without it (its shape embedding starts
    at random); --predict then reads the questions with shapes, as the evaluation did."""
    tmp = trained_qa
    run_script("qa_task.py", "--bert-model", "mlm_bert.pt", "--train-file", "train.json",
               "--dev-file", "dev.json", "--batch_size", "8", "--bptt", "48", "--epochs", "1",
               "--match-feature", "--shape-feature", "--optimizer", "adamw", "--lr", "1e-3",
               "--checkpoint", "qa_model.pt", "--save", "shape.pt", "--predictions",
               "shape_answers.json", "--loss-log", "shape_loss.txt", cwd=tmp)
    state = checkpoint.load(tmp / "shape.pt", "qa_task")["model"]
    assert state["shape_embed.weight"].shape[0] == 6
    before = checkpoint.load(tmp / "qa_model.pt", "qa_task")["model"]
    assert not torch.equal(before["match_embed.weight"], state["match_embed.weight"])
    run_script("qa_task.py", "--predict", "dev.json", "--bptt", "48",
               "--save", "shape.pt", "--predictions", "shape_asked.json", cwd=tmp)
    assert (json.loads((tmp / "shape_asked.json").read_text())
            == json.loads((tmp / "shape_answers.json").read_text()))
    back = run_script("qa_task.py", "--bert-model", "mlm_bert.pt", "--train-file", "train.json",
                      "--dev-file", "dev.json", "--bptt", "48", "--match-feature", "--checkpoint",
                      "shape.pt", "--save", "other.pt", cwd=tmp, check=False)
    assert back.returncode == 2 and "shape_embed.weight" in back.stderr
    assert "Traceback" not in back.stderr and not (tmp / "other.pt").exists()
