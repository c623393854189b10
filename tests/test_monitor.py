"""Seeing and using results: progress, TensorBoard, plots, --predict, the laptop recipe."""
import io
import json
import re
import subprocess
import sys

import pytest

import monitor
from conftest import ROOT, TINY, run_script, run_without, script_env, write_wikitext


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
