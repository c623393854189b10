"""recipe.py: one configuration run stage by stage, a table of results, resumed runs."""
import json
import re
import sys

import pytest
import torch

import monitor
import recipe
from conftest import write_squad, write_wikitext

# The recipe's stages at the sizes of a test: the same flags, smaller numbers.
TINY_RECIPE = dict(size=["--emsize", 32, "--nhid", 64, "--nlayers", 1, "--nhead", 2, "--dropout", 0.0],
                   common=["--batch_size", 4, "--bptt", 32, "--optimizer", "adamw", "--warmup", 2,
                           "--clip", 1.0, "--log-interval", 100],
                   mlm=["--epochs", 1, "--lr", 1e-3, "--mask-mode", "bert", "--tie-weights"],
                   ns=["--epochs", 1, "--lr", 3e-5, "--min_sentence_len", 10],
                   span=["--epochs", 1],
                   squad=["--epochs", 2, "--keep", "last", "--decode", "expected-f1",
                          "--decode-temperature", 0.67])


def _files(tmp_path):
    wt = write_wikitext(tmp_path / "wt", (200, 40, 40))
    squad = tmp_path / "squad"
    squad.mkdir()
    write_squad(squad / "dev-split-train-v1.1.json", copies=3)
    write_squad(squad / "dev-split-eval-v1.1.json", prefix="d")
    return ["--wikitext", str(wt), "--squad", str(squad), "--out", str(tmp_path / "out")]


def _run(monkeypatch, capsys, argv):
    for key, value in TINY_RECIPE.items():
        monkeypatch.setitem(recipe.RECIPE, key, value)
    monkeypatch.setattr(sys, "argv", ["recipe.py", *argv])
    recipe.main()
    return capsys.readouterr().out


def test_recipe_runs_the_pipeline_and_writes_the_table(tmp_path, monkeypatch, capsys):
    argv = _files(tmp_path) + ["--seeds", "2"]
    _run(monkeypatch, capsys, argv)
    out = tmp_path / "out"
    table = (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    squad_runs = [f"{k}_s{s}" for k in ("qa", "qa_random") for s in (1, 2)]
    assert list(results) == ["mlm", "ns", "span", *squad_runs]
    assert 1 < results["mlm"]["test ppl"] < 1e6 and 0 <= results["ns"]["test accuracy"] <= 100
    assert results["span"]["questions"] > 5  # WikiText-2 valid questions
    for name in squad_runs:
        r = results[name]
        assert r["questions"] == 9 and 0 <= r["EM"] <= r["F1"] <= 100
        command = r["command"]
        assert " --keep last --decode expected-f1 --decode-temperature 0.67 " in command
        assert "--match-feature --shape-feature --freeze-embeddings" in command
        assert "| train: 27 questions" in (out / f"{name}.log").read_text()  # every article
        records = monitor.read_results(out / f"{name}_loss.jsonl")
        assert not [x for x in records if x["record"] == "valid"]  # nothing chosen on the way
    assert "--checkpoint" in results["qa_s1"]["command"] and "--random-init" in results["qa_random_s1"]["command"]
    assert "--seed 21192391 " in results["qa_s1"]["command"] and "--seed 21192392 " in results["qa_s2"]["command"]
    for kind, n in (("qa", 4), ("qa_random", 5)):
        f1 = [results[f"{kind}_s{s}"]["F1"] for s in (1, 2)]
        mean, sd = sum(f1) / 2, abs(f1[0] - f1[1]) / 2 ** 0.5
        assert f"| {n}. SQuAD v1.1" in table and f"2 seeds: **F1 {mean:.2f} ± {sd:.2f}**" in table
    gains = [results[f"qa_s{s}"]["F1"] - results[f"qa_random_s{s}"]["F1"] for s in (1, 2)]
    assert f"F1 {sum(gains) / 2:+.2f} ± {abs(gains[0] - gains[1]) / 2 ** 0.5:.2f} points" in table
    assert "| 3. span selection (questions made from WikiText-2)" in table
    amp = "bf16" if recipe.cpu_flags() else "none"  # --amp auto
    assert f"Precision: {'bf16 autocast' if amp == 'bf16' else 'fp32'} (--amp auto)." in table
    assert f"--amp {amp} " in results["mlm"]["command"]
    assert f"torch's {torch.backends.cpu.get_cpu_capability()} kernels" in table
    # run again: every stage is found done; with fewer seeds and no baseline, only the table
    again = _run(monkeypatch, capsys, argv)
    assert again.count("done in an earlier run") == 7
    fewer = _run(monkeypatch, capsys, _files(tmp_path / "b") + ["--seeds", "1", "--no-baseline"])
    assert "| 5. SQuAD" not in fewer and "pretraining's gain" not in fewer


def test_the_recipe_is_one_configuration_whatever_the_precision(tmp_path):
    """Precision changes the speed only: the stages' commands differ in --amp alone."""
    for name in ("dev-split-train-v1.1.json", "dev-split-eval-v1.1.json"):
        (tmp_path / name).write_text("{}")
    base = ["--wikitext", "w", "--squad", str(tmp_path)]
    stages = {amp: [argv for _, argv, _ in recipe.commands(recipe.parse(base + ["--amp", amp]),
                                                           tmp_path / "out")]
              for amp in ("none", "bf16")}
    assert len(stages["none"]) == 3 + 2 * 3
    for fp32, bf16 in zip(stages["none"], stages["bf16"]):
        assert [w for w in fp32 if w != "none"] == [w for w in bf16 if w != "bf16"]


@pytest.mark.parametrize("flags, message", [(["--seeds", "0"], "--seeds must be at least 1"),
                                            (["--wikitext", "nowhere"], "--wikitext nowhere is not a folder")])
def test_recipe_bad_flags_are_one_line(tmp_path, monkeypatch, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        _run(monkeypatch, capsys, _files(tmp_path) + flags)
    assert message in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        _run(monkeypatch, capsys, _files(tmp_path / "x") + ["--squad", str(tmp_path / "empty")])
    assert re.search("dev-split-train-v1.1.json", str(e.value))
