"""bench.py: the timing in turns, and a run with a tiny model."""
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
