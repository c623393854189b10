"""Seeing and using results: progress, TensorBoard, plots, --predict, the laptop recipe."""
import ast
import gzip
import io
import json
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import data
import monitor
import recipe
import squad
from conftest import ROOT, TINY, run_script, run_without, script_env, write_squad, write_wikitext


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
    p = monitor.Progress("other rank", total=2, every=0.0, quiet=0.0, stream=silent,
                         enabled=False)
    p.update(2)
    p.close()
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
    size = (wt / "wiki.train.tokens").stat().st_size
    assert re.search(rf"^\| tokenizing WikiText2 wiki.train.tokens: \[#* *\] +\d+% \(\d[\d,]*/{size:,} "
                     r"bytes\) \d+ s, ~\d+ s left$", proc.stdout, re.M)
    assert re.search(rf"^\| tokenizing WikiText2 wiki.train.tokens: done, {size:,} bytes in ", proc.stdout,
                     re.M)
    assert re.search(r"^\| counting WikiText2's vocabulary: done, ", proc.stdout, re.M)
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
    proc = run_without("tensorboard", tmp_path, "--tensorboard", tmp_path / "tb")
    assert proc.returncode == 2
    assert "pip install tensorboard" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlm_bert.pt").exists()


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


def test_results_file_holds_the_numbers_of_the_printout(tmp_path):
    """The JSON lines and the printout come from the same records; a resumed run's
    repeated records are read once."""
    wt = write_wikitext(tmp_path / "wt", (300, 40, 40))
    proc = run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "2", "--log-interval", "5",
                      cwd=tmp_path)
    records = monitor.read_results(tmp_path / "mlm_loss.jsonl")
    kinds = [r["record"] for r in records]
    assert kinds.count("valid") == 2 and kinds[-1] == "test" and kinds.count("train") >= 2
    printed = [line for line in proc.stdout.splitlines() if line.startswith("| epoch ")]
    assert printed == [monitor.train_line(r, ("5.2f", "8.2f")) for r in records if r["record"] == "train"]
    valid = [r for r in records if r["record"] == "valid"]
    assert f"| valid loss {valid[-1]['loss']:5.2f} | valid ppl {valid[-1]['ppl']:8.2f}" in proc.stdout
    assert f"| End of training | test loss {records[-1]['loss']:5.2f} |" in proc.stdout
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in records if r["record"] == "train")
    with open(tmp_path / "mlm_loss.jsonl", "a") as f:  # a resumed run writes a step again
        f.write(json.dumps(dict(records[0], loss=1.0)) + "\n")
    again = monitor.read_results(tmp_path / "mlm_loss.jsonl")
    first = [r for r in again if (r["record"], r.get("step")) == ("train", records[0]["step"])
             and r["epoch"] == 1]
    assert len(again) == len(records) and [r["loss"] for r in first] == [1.0]


def test_profile_writes_a_trace_and_the_costliest_operations(tmp_path):
    """--profile: the steps asked for, once per run (first epoch only), a Chrome trace,
    the per-step times and a table; an epoch too short for them says so and trains on."""
    wt = write_wikitext(tmp_path / "wt", (300, 40, 40))
    proc = run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "2", "--profile", "prof",
                      "--profile-steps", "2:3", cwd=tmp_path)
    heads = re.findall(r"^\| profile: (\d+) steps \| host ([\d.]+) ms/step$", proc.stdout, re.M)
    assert len(heads) == 1 and heads[0][0] == "3" and float(heads[0][1]) > 0, proc.stdout
    rows = re.findall(r"^\| (aten::\S+) +\| +([\d.]+) \| +([\d.]+) \| +([\d.]+)% \|$", proc.stdout, re.M)
    assert len(rows) >= 5, proc.stdout
    times = [float(r[2]) for r in rows]
    assert times == sorted(times, reverse=True) and 0 < sum(float(r[3]) for r in rows) <= 100.5
    trace = json.loads((tmp_path / "prof" / "trace_rank0.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if str(e.get("name", "")).startswith("ProfilerStep")}
    assert len(steps) == 3, steps  # the 3 recorded steps, not the skipped ones
    assert "| End of training |" in proc.stdout
    batches = int(re.search(r"^\| train: \d+ tokens, (\d+) batches$", proc.stdout, re.M).group(1))
    cut = run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", "--profile", "cut",
                     "--profile-steps", f"{batches - 2}:5", cwd=tmp_path)
    assert re.search(r"^\| profile: 2 steps \| host [\d.]+ ms/step$", cut.stdout, re.M), cut.stdout
    late = run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", "--profile", "late",
                      "--profile-steps", "100000:2", cwd=tmp_path)
    assert "| profile: the epoch ended before step 100001; nothing was recorded" in late.stdout
    assert not (tmp_path / "late" / "trace_rank0.json").exists()
    assert "| End of training |" in late.stdout


@pytest.mark.parametrize("flags, message", [
    (["--profile-steps", "5"], "expected SKIP:COUNT"),
    (["--profile-steps", "3:0"], "COUNT 1 or more"),
    (["--profile", "afile"], "--profile afile: cannot make that folder"),
])
def test_profile_bad_flags_are_one_clear_error(tmp_path, flags, message):
    wt = write_wikitext(tmp_path / "wt", (300, 40, 40))
    (tmp_path / "afile").write_text("not a folder")
    proc = run_script("mlm_task.py", "--data-dir", wt, *TINY, "--epochs", "1", "--profile", "p",
                      *flags, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlm_bert.pt").exists()


class _Event:
    def __init__(self, key, count, cpu, own_cpu, device=None, cuda=None):
        self.key, self.count, self.cpu_time_total, self.self_cpu_time_total = key, count, cpu, own_cpu
        if device is not None:  # torch 2.4 on
            self.self_device_time_total = device
        if cuda is not None:  # torch before 2.4
            self.self_cuda_time_total = cuda


@pytest.mark.parametrize("field", ["device", "cuda"])
def test_profile_lines_give_host_and_device_time_per_step(field):
    events = [_Event("ProfilerStep*", 4, 40_000.0, 1_000.0, **{field: 0.0}),
              _Event("aten::mm", 48, 8_000.0, 8_000.0, **{field: 20_000.0}),
              _Event("aten::add_", 400, 6_000.0, 6_000.0, **{field: 4_000.0})]
    marks = _Event("ProfilerStep*", 4, 24_000.0, 0.0, **{field: 24_000.0})  # the GPU's copy
    marks.device_type, marks.is_user_annotation = "DeviceType.CUDA", True
    region = _Event("## Call CompiledFxGraph ##", 4, 9_000.0, 0.0, **{field: 9_000.0})
    region.is_user_annotation = True  # spans kernels counted already
    events += [marks, region]
    lines = monitor.profile_lines(events, on_device=True, steps=4)
    assert lines[0] == "| profile: 4 steps | host 10.00 ms/step | device kernels 6.00 ms/step"
    assert lines[2].startswith("| aten::mm ") and "|       12.0 |           5.000 |  83.3% |" in lines[2]
    assert lines[3].startswith("| aten::add_ ") and "|  16.7% |" in lines[3]
    cpu = monitor.profile_lines(events, on_device=False, steps=4)
    assert cpu[0] == "| profile: 4 steps | host 10.00 ms/step" and "host ms/step" in cpu[1]
    assert cpu[2].startswith("| aten::mm ") and "|           2.000 |  57.1% |" in cpu[2]


def test_match_feature_marks_context_words_of_the_question():
    paras = [dict(context="Paris is big. Zorblax lives in Paris.", qas=[dict(
        id="a", question="Where does Zorblax live?", answers=[("Paris", 0)])])]
    tok = data.Tokenizer()
    vocab = data.Vocab.build([tok("paris is big . lives in where does")])
    _, f = squad.squad_features(paras, tok, vocab, 32)
    c = int(f.ctx_start[0])
    ctx = tok("Paris is big. Zorblax lives in Paris.")
    marked = [t for t, m in zip(ctx, f.match[0, c:c + len(ctx)].tolist()) if m]
    assert marked == ["zorblax"]  # an <unk> word still matches by its text; '.' never does
    assert f.match[0, :c].sum() == 0


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
    with gzip.open(tmp / "dev.json.gz", "wt", encoding="utf-8") as f:  # as the SQuAD files
        f.write((tmp / "dev.json").read_text())
    run_script("qa_task.py", "--predict", "--predict-file", "dev.json.gz", "--bptt", "48",
               "--predictions", "asked_gz.json", cwd=tmp)
    assert json.loads((tmp / "asked_gz.json").read_text()) == evaluated
    (tmp / "plain.json.gz").write_text((tmp / "dev.json").read_text())
    bad = run_script("qa_task.py", "--predict", "--predict-file", "plain.json.gz", "--bptt", "48",
                     cwd=tmp, check=False)
    assert bad.returncode == 2 and "cannot read --predict-file plain.json.gz" in bad.stderr
    assert "Traceback" not in bad.stderr
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
    (["--predict", "--question", "Why?", "--context", ""], "--context is empty"),
    (["--predict", "--question", "  ", "--context", "The sky is blue."], "--question is empty"),
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


def test_match_neighbours_train_predict_and_must_be_given_again(trained_qa):
    common = ["--bert-model", "mlm_bert.pt", "--train-file", "train.json", "--dev-file",
              "dev.json", "--bptt", "48", "--batch_size", "8", "--epochs", "1", "--match-feature"]
    run_script("qa_task.py", *common, "--match-neighbours", "--save", "nb.pt", "--predictions",
               "nb.json", "--loss-log", "nb.txt", cwd=trained_qa)
    assert "neighbour_embed.weight" in checkpoint.load(trained_qa / "nb.pt", "qa_task")["model"]
    run_script("qa_task.py", "--predict", "--predict-file", "dev.json", "--bptt", "48", "--save",
               "nb.pt", "--predictions", "nb_asked.json", cwd=trained_qa)
    assert (json.loads((trained_qa / "nb_asked.json").read_text())
            == json.loads((trained_qa / "nb.json").read_text()))
    for flags, message in ((["--checkpoint", "nb.pt"], "neighbour_embed"),
                           (["--match-neighbours", "--checkpoint", "qa_model.pt"], "neighbour_embed")):
        bad = run_script("qa_task.py", *common, *flags, "--save", "other.pt", cwd=trained_qa,
                         check=False)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
        assert "the layers of --match-neighbours" in bad.stderr  # names the flag to change
    bad = run_script("qa_task.py", *[c for c in common if c != "--match-feature"],
                     "--match-neighbours", "--save", "other.pt", cwd=trained_qa, check=False)
    assert bad.returncode == 2 and "add --match-feature" in bad.stderr
    assert not (trained_qa / "other.pt").exists()


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


def _tiny_recipe(tmp_path, nlayers, *flags):
    """WikiText and dev-split SQuAD files in tmp_path, and the recipe.py command that runs
    a tiny pipeline on them into tmp_path/out with these flags."""
    wt = write_wikitext(tmp_path / "wt", (200, 40, 40))
    squad = tmp_path / "squad"
    squad.mkdir()
    write_squad(squad / "dev-split-train-v1.1.json", copies=3)
    write_squad(squad / "dev-split-eval-v1.1.json", prefix="d")
    return [sys.executable, str(ROOT / "recipe.py"), "--wikitext", str(wt), "--squad", str(squad),
            "--out", str(tmp_path / "out"), "--emsize", "32", "--nhid", "64", "--nlayers",
            str(nlayers), "--nhead", "2", "--mlm-epochs", "1", "--batch-size", "4", "--bptt", "32",
            "--min-sentence-len", "10", *flags]


def test_recipe_runs_the_pipeline_and_writes_the_table(tmp_path):
    cmd = _tiny_recipe(tmp_path, 2, "--cloze-epochs", "1", "--qa-epochs", "2", "--seeds", "2",
                       "--holdout-articles", "1", "--keep", "best", "--decode", "choose",
                       "--trainable-baseline")
    wt = tmp_path / "wt"
    proc = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    table = (tmp_path / "out" / "results.md").read_text()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    squad_runs = [f"{k}_s{s}" for k in ("qa", "qa_random", "qa_random_trainable") for s in (1, 2)]
    assert list(results) == ["mlm", "ns", "cloze", *squad_runs]
    assert all(r["seconds"] > 0 and r["command"].startswith(("mlm_task.py", "ns_task.py", "qa_task.py"))
               for r in results.values())
    assert 1 < results["mlm"]["test ppl"] < 1e6 and 1 < results["mlm"]["valid ppl"] < 1e6
    assert results["ns"]["test loss"] > 0 and 0 <= results["ns"]["test accuracy"] <= 100
    assert results["cloze"]["questions"] > 5  # WikiText-2 valid questions
    for name in squad_runs:
        r = results[name]
        assert r["questions"] == 9 and 0 <= r["EM"] <= r["F1"] <= 100 and 0 <= r["kept"] <= 9
        assert r["chosen_epoch"] in (1, 2) and 0 <= r["chosen_f1"] <= 100
        # chosen on the held-out article (its 9 questions), reported on the evaluation file
        records = monitor.read_results(tmp_path / "out" / f"{name}_loss.jsonl")
        assert [r["questions"] for r in records if r["record"] == "valid"] == [9, 9]
        assert records[-1]["record"] == "test" and records[-1]["f1"] == r["F1"]
        assert "--holdout-articles 1" in r["command"]
    assert "--seed 21192391 " in results["qa_s1"]["command"] and "--seed 21192392 " in results["qa_s2"]["command"]
    for kind, n in (("qa", 4), ("qa_random", 5), ("qa_random_trainable", 6)):
        f1 = [results[f"{kind}_s{s}"]["F1"] for s in (1, 2)]
        mean, sd = sum(f1) / 2, abs(f1[0] - f1[1]) / 2 ** 0.5
        assert f"| {n}. SQuAD v1.1" in table and f"2 seeds: **F1 {mean:.2f} ± {sd:.2f}**" in table
    gains = [results[f"qa_s{s}"]["F1"] - results[f"qa_random_s{s}"]["F1"] for s in (1, 2)]
    assert f"F1 {sum(gains) / 2:+.2f} ± {abs(gains[0] - gains[1]) / 2 ** 0.5:.2f} points over 5" in table
    assert "epoch chosen on 1 held-out training articles" in table
    assert "| 3. span selection (mixed questions, new ones every epoch, 1 epoch, made" in table
    assert "Machine:" in table and "--match-feature" in table and "--random-init" in table
    assert f"torch's {torch.backends.cpu.get_cpu_capability()} kernels" in table
    # --amp auto by default: bf16 autocast where this CPU has bf16 instructions, else fp32
    amp = "bf16" if recipe.cpu_flags() else "none"
    precision = "bf16 autocast" if amp == "bf16" else "fp32"
    assert f"Precision: {precision} (--amp auto)." in table
    assert f"--amp {amp} " in results["mlm"]["command"]
    neighbours = amp == "none"  # --match-neighbours auto: on in fp32
    assert all(("--match-neighbours" in results[name]["command"]) == neighbours
               for name in ["cloze", *squad_runs])
    assert ("(--match-neighbours)" in table) == neighbours
    assert table.count("--freeze-embeddings") == 5  # the QA stages 3-5 (two seeds); 6 trains them
    assert table.count("--cloze-dir") == 1 and table.count("--checkpoint") == 2
    assert table.count("--shape-feature") == 7  # every QA stage, by default
    # by default: mixed span-selection questions, new ones every epoch; the decoding chosen
    # per run on the held-out article
    assert results["cloze"]["command"].endswith(" --cloze-style mixed --cloze-fresh")
    assert all(" --decode choose " in results[name]["command"] for name in squad_runs)
    chosen = {name: results[name]["decoding"] for name in squad_runs}
    assert all(c == "best" or re.fullmatch(r"expected-f1 T [\d.]+", c) for c in chosen.values())
    assert (f"chosen, by seed: pretrained: {chosen['qa_s1']}, {chosen['qa_s2']}; random init: "
            f"{chosen['qa_random_s1']}, {chosen['qa_random_s2']}") in table
    for name in squad_runs:  # the held-out F1 in the table is the chosen decoding's
        records = monitor.read_results(tmp_path / "out" / f"{name}_loss.jsonl")
        assert results[name]["chosen_f1"] == [r for r in records if r["record"] == "decode"][-1]["f1"]
    again = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and again.stdout.count("done in an earlier run") == 9
    longer = subprocess.run(cmd + ["--qa-epochs", "1", "--no-baseline", "--decode", "best"],
                            cwd=tmp_path, env=script_env(), capture_output=True, text=True,
                            timeout=600)
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr
    assert re.findall(r"^== (\w+): done in an earlier run", longer.stdout, re.M) == ["mlm", "ns", "cloze"]
    ran = re.search(r"^== qa_s1: python qa_task\.py .*$", longer.stdout, re.M).group(0)
    assert " --epochs 1 " in ran and " --decode" not in ran
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "decoding" not in results["qa_s1"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "SQuAD answers: the most probable span of each window." in table
    # the baseline runs of the earlier command stay in results.json, not in this table
    assert "qa_random_s1" in results and "| 4. SQuAD" in table
    assert "| 5. SQuAD" not in table and "pretraining's gain" not in table
    no_held_out = subprocess.run(cmd + ["--holdout-articles", "0"],
                                 cwd=tmp_path, env=script_env(), capture_output=True, text=True,
                                 timeout=60)
    assert no_held_out.returncode != 0 and "give --holdout-articles N" in no_held_out.stderr
    assert "--tie-weights" in table
    clash = subprocess.run(cmd + ["--freeze-pretraining"], cwd=tmp_path, env=script_env(),
                           capture_output=True, text=True, timeout=60)
    assert clash.returncode != 0 and "add --no-tie-weights" in clash.stderr
    missing = subprocess.run(cmd[:4] + ["--squad", str(wt)], cwd=tmp_path, env=script_env(),
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "dev-split-train-v1.1.json" in missing.stderr


def _recipe_stages(tmp_path, *flags):
    """{stage: its command's words} that recipe.py would run with flags, on dev-split
    SQuAD files in tmp_path (only their names are read); and the base flags."""
    for name in ("dev-split-train-v1.1.json", "dev-split-eval-v1.1.json"):
        (tmp_path / name).write_text("{}")
    base = ["--wikitext", "w", "--squad", str(tmp_path)]
    return ({name: [str(x) for x in argv]
             for name, argv, _ in recipe.commands(recipe.parse(base + list(flags)), tmp_path / "out")},
            base)


def test_recipe_span_selection_epochs_follow_the_precision(tmp_path):
    """--cloze-epochs auto: 8 under bf16, 5 in fp32 (whose hour has no room for more on an
    AVX2-only CPU); a number given is kept, and the stage's command carries it."""
    for amp, n in (("bf16", "8"), ("none", "5")):
        stages, base = _recipe_stages(tmp_path, "--amp", amp)
        cloze = stages["cloze"]
        assert cloze[cloze.index("--epochs") + 1] == n
    assert recipe.parse(base + ["--amp", "bf16"]).cloze_epochs == 8
    assert recipe.parse(base + ["--amp", "none"]).cloze_epochs == 5
    assert recipe.parse(base + ["--amp", "bf16", "--cloze-epochs", "2"]).cloze_epochs == 2
    assert recipe.parse(base + ["--amp", "none", "--cloze-epochs", "0"]).cloze_epochs == 0
    auto = recipe.parse(base)
    assert auto.amp == "auto" and auto.cloze_epochs == recipe.CLOZE_EPOCHS[recipe.amp(auto)]


def test_recipe_match_neighbours_follow_the_precision(tmp_path, capsys):
    """--match-neighbours auto: on in fp32, off under bf16, in every QA stage (span
    selection, SQuAD, baselines) alike; on/off override it; it needs the match feature."""
    for flags, on in ((["--amp", "none"], True), (["--amp", "bf16"], False),
                      (["--amp", "bf16", "--match-neighbours", "on"], True),
                      (["--amp", "none", "--match-neighbours", "off"], False),
                      (["--amp", "none", "--no-match-feature"], False)):
        stages, base = _recipe_stages(tmp_path, *flags)
        qa = [name for name in stages if name not in ("mlm", "ns")]
        assert {"cloze", "qa_s1", "qa_random_s1"} <= set(qa)
        assert all(("--match-neighbours" in stages[name]) == on for name in qa), flags
    with pytest.raises(SystemExit) as e:
        recipe.parse(base + ["--no-match-feature", "--match-neighbours", "on"])
    assert e.value.code == 2 and "leave out --no-match-feature" in capsys.readouterr().err


def test_recipe_with_a_wordpiece_vocabulary(tmp_path):
    pytest.importorskip("tokenizers")
    out = tmp_path / "out"
    cmd = _tiny_recipe(tmp_path, 1, "--cloze-epochs", "1", "--qa-epochs", "1", "--seeds", "1",
                       "--holdout-articles", "1", "--no-baseline", "--cloze-style", "sentence",
                       "--no-cloze-fresh", "--tokenizer", "wordpiece", "--vocab-size", "300",
                       "--pretrain-seed", "5")
    proc = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    vocab = (out / "vocab.txt").read_text().split("\n")
    assert 100 < len(vocab) - 1 <= 300 and vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert any(t.startswith("##") for t in vocab)
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["mlm", "ns", "cloze", "qa_s1"] and results["qa_s1"]["questions"] == 9
    for r in results.values():
        assert f"--tokenizer wordpiece --vocab-file {out / 'vocab.txt'}" in r["command"]
    assert "--vocab-size 300" in results["mlm"]["command"]
    assert [" --seed 5" in r["command"] for r in results.values()] == [True, True, True, False]
    assert "ran once, with seed 5." in (out / "results.md").read_text()
    assert "--cloze-style" not in results["cloze"]["command"]  # the whole sentence, as before
    assert "--cloze-fresh" not in results["cloze"]["command"]
    assert "Tokenizer: WordPiece, a 300-token vocabulary" in (out / "results.md").read_text()
    small = subprocess.run(cmd[:-3] + ["50"], cwd=tmp_path, env=script_env(),
                           capture_output=True, text=True, timeout=60)
    assert small.returncode != 0 and "--vocab-size 50 is too small" in small.stderr


def test_recipe_defaults_train_on_every_article_with_settings_fixed_in_advance(tmp_path):
    out = tmp_path / "out"
    cmd = _tiny_recipe(tmp_path, 1, "--cloze-epochs", "0", "--qa-epochs", "2", "--seeds", "1",
                       "--no-baseline")
    proc = subprocess.run(cmd, cwd=tmp_path, env=script_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    results = json.loads((out / "results.json").read_text())
    command = results["qa_s1"]["command"]
    assert " --keep last --decode expected-f1 --decode-temperature 0.67 " in command
    assert "--holdout-articles" not in command
    assert "| train: 27 questions" in (out / "qa_s1.log").read_text()  # every article
    assert results["qa_s1"]["chosen_epoch"] is None and results["qa_s1"]["questions"] == 9
    table = (out / "results.md").read_text()
    assert "the last of 2 epochs kept, trained on every training article, nothing chosen)" in table
    assert "SQuAD answers: the span of highest expected F1 (temperature 0.67)." in table
    for flags, message in ((["--decode", "best", "--decode-temperature", "0.5"],
                            "--decode-temperature is for --decode expected-f1"),
                           (["--decode", "choose"], "give --holdout-articles N"),
                           (["--decode-temperature", "0"], "must be positive")):
        bad = subprocess.run(cmd + flags, cwd=tmp_path, env=script_env(), capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode != 0 and message in bad.stderr, flags


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
    run_script("qa_task.py", "--predict", "--predict-file", "dev.json", "--bptt", "48",
               "--save", "shape.pt", "--predictions", "shape_asked.json", cwd=tmp)
    assert (json.loads((tmp / "shape_asked.json").read_text())
            == json.loads((tmp / "shape_answers.json").read_text()))
    back = run_script("qa_task.py", "--bert-model", "mlm_bert.pt", "--train-file", "train.json",
                      "--dev-file", "dev.json", "--bptt", "48", "--match-feature", "--checkpoint",
                      "shape.pt", "--save", "other.pt", cwd=tmp, check=False)
    assert back.returncode == 2 and "shape_embed.weight" in back.stderr
    assert "Traceback" not in back.stderr and not (tmp / "other.pt").exists()
