"""The project's numbers do not move when its code is reorganised: tiny runs through the
three scripts end with weights bitwise equal to a reference made by earlier code.

tests/reference/torch-<version>.pt holds that reference for the torch versions CI runs
(made with `python tests/reference_runs.py DIR` at commit REFERENCE_COMMIT). With
another torch version, the reference is made on the spot by running the scripts of
REFERENCE_COMMIT, taken from the git history, on this machine.
"""
import shutil
import subprocess
import tarfile
import io

import pytest
import torch

import reference_runs
from conftest import ROOT

REFERENCE_COMMIT = "4782011467eac88e8fe36c9f4fa0978cda34774a"


def _reference(tmp_path):
    stored = ROOT / "tests" / "reference" / reference_runs.reference_name()
    if stored.is_file():
        ref = torch.load(stored, weights_only=True)
        return ref["weights"], ref["answers"]
    if shutil.which("git") is None:
        pytest.skip(f"no {stored.name} and no git to make it from {REFERENCE_COMMIT[:7]}")
    proc = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", REFERENCE_COMMIT],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"no {stored.name}, and commit {REFERENCE_COMMIT[:7]} is not in this clone")
    old = tmp_path / "old"
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(old, filter="data")
    return reference_runs.run_all(tmp_path / "old_runs", root=old)


def test_final_weights_and_answers_equal_the_reference(tmp_path):
    ref_weights, ref_answers = _reference(tmp_path)
    weights, answers = reference_runs.run_all(tmp_path / "runs")
    assert answers == ref_answers
    for name, ref in ref_weights.items():
        mine = weights[name]
        assert sorted(mine) == sorted(ref), name
        for key in ref:
            diff = (mine[key].double() - ref[key].double()).abs().max().item()
            assert torch.equal(mine[key], ref[key]), f"{name} {key}: max abs difference {diff:.3g}"
