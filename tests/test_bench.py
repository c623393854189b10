"""bench.py: the timing in turns, and a run with a tiny model."""
import re
import time

import torch

import bench
from conftest import run_script


def test_steps_are_timed_in_turns_so_a_drifting_machine_weighs_on_all_alike():
    # Two steps of equal cost on a "machine" that gets slower every round: timed in
    # turns they come out equal; each was warmed up once, then called once per round.
    rounds, calls = [0], {"a": 0, "b": 0}

    def step(name):
        def fn():
            calls[name] += 1
            time.sleep(0.004 * (1 + rounds[0]))
            if name == "b":
                rounds[0] += 1
        return fn

    ta, tb = bench.timed_together([step("a"), step("b")], 4, torch.device("cpu"))
    assert calls == {"a": 5, "b": 5}
    assert abs(ta / tb - 1) < 0.25, (ta, tb)  # one after the other: b about 3.5x a


def test_bench_runs_a_tiny_model_and_prints_its_table(tmp_path):
    out = run_script("bench.py", "--emsize", "32", "--nhid", "64", "--nlayers", "1", "--nhead", "2",
                     "--vocab", "200", "--batch", "2", "--seq", "16", "--steps", "1",
                     "--device", "cpu", cwd=tmp_path).stdout
    assert "| this project, masked LM" in out and "| this project, QA" in out
    assert "| data pipeline: MLM" in out
    try:
        import transformers  # noqa: F401  (optional: bench.py only)
    except ImportError:
        assert "transformers is not installed" in out
    else:
        rows = [line for line in out.splitlines() if line.startswith("| this project")]
        assert all(line.rstrip(" |").endswith("x") for line in rows), rows


def test_recipe_preset_and_gpu_peaks_table():
    a = bench.parse(["--recipe", "--emsize", "999"])
    assert (a.emsize, a.nlayers, a.vocab, a.batch, a.optimizer, a.tie_weights) == \
        (128, 2, 28786, 32, "adamw", True)  # the preset wins over the size flags
    assert bench.card_peak(torch.device("cpu")) is None
    names = {"NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe",
             "NVIDIA H200": "H200", "NVIDIA A100-SXM4-80GB": "A100", "NVIDIA L4": "L4",
             "NVIDIA L40S": "L40S", "NVIDIA L40": "L40"}
    original = torch.cuda.get_device_name
    try:
        for name, card in names.items():
            torch.cuda.get_device_name = lambda device=None, name=name: name
            assert bench.card_peak(torch.device("cuda"))[0] == card
        torch.cuda.get_device_name = lambda device=None: "Some Future GPU"
        assert bench.card_peak(torch.device("cuda")) is None
        assert bench.card_peak(torch.device("cuda"), 500.0)[1] == 500e12
    finally:
        torch.cuda.get_device_name = original


def test_bench_runs_the_sync_free_step_with_adamw(tmp_path):
    out = run_script("bench.py", "--emsize", "32", "--nhid", "64", "--nlayers", "1", "--nhead", "2",
                     "--vocab", "200", "--batch", "2", "--seq", "16", "--steps", "1", "--device",
                     "cpu", "--mask-draw", "per-sequence", "--optimizer", "adamw", "--tie-weights",
                     "--mask-mode", "bert", "--amp", "bf16", cwd=tmp_path).stdout
    assert re.search(r"^\| bf16 speed-up of this project's steps over its fp32 ones: masked LM "
                     r"[\d.]+x, QA [\d.]+x$", out, re.M)
    assert "adamw | masks per-sequence" in out and "| this project, masked LM" in out


def test_bench_times_each_cpu_kernel_against_the_plain_path(tmp_path):
    out = run_script("bench.py", "--emsize", "32", "--nhid", "64", "--nlayers", "1", "--nhead", "2",
                     "--vocab", "200", "--batch", "2", "--seq", "16", "--steps", "1", "--device",
                     "cpu", "--dropout", "0.1", "--kernels", cwd=tmp_path).stdout
    for who in ("this project", "this project, plain", "this project, dropout kernel alone",
                "this project, attention kernel alone", "this project, loss kernel alone"):
        assert f"| {who}, masked LM " in out and f"| {who}, QA " in out
    for who in ("every kernel", "this project, dropout kernel alone",
                "this project, attention kernel alone", "this project, loss kernel alone"):
        assert re.search(rf"^\| speed-up over the plain path, {who}: masked LM fp32 [\d.]+x, QA fp32 "
                         rf"[\d.]+x$", out, re.M), who


def test_bench_amp_only_times_bf16_alone_against_transformers_bf16(tmp_path):
    out = run_script("bench.py", "--emsize", "32", "--nhid", "64", "--nlayers", "1", "--nhead", "2",
                     "--vocab", "200", "--batch", "2", "--seq", "16", "--steps", "1", "--device",
                     "cpu", "--mask-draw", "per-sequence", "--optimizer", "adamw", "--amp", "bf16",
                     "--amp-only", cwd=tmp_path).stdout
    rows = [line for line in out.splitlines()
            if line.startswith(("| this project", "| transformers ")) and "installed" not in line]
    assert rows and all(line.split("|")[2].strip() == "bf16" for line in rows), rows
    assert "speed-up of this project's steps over its fp32 ones" not in out
    try:
        import transformers  # noqa: F401  (optional: bench.py only)
    except ImportError:
        return
    head = next(line for line in out.splitlines() if line.startswith("| step"))
    assert "vs transformers bf16" in head and "vs transformers fp32" not in head
    for line in rows:  # a ratio for every step; transformers' own steps are 1.00x
        ratio = line.rstrip(" |").split("|")[-1].strip()
        assert re.fullmatch(r"[\d.]+x", ratio), line
        if line.startswith("| transformers"):
            assert ratio == "1.00x", line
