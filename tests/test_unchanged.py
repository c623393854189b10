"""The project's numbers do not move when its code is reorganised: tiny runs through the
three scripts end with weights bitwise equal to a reference made by earlier code.

tests/reference/torch-<version>.pt holds that reference for the torch versions CI runs
(made with `python tests/reference_runs.py DIR` at commit REFERENCE_COMMIT, on a CPU
with AVX-512). With another torch version, or on a CPU whose kernels round differently
from that one's (AVX2 only, say), the reference is made on the spot by running the
scripts of REFERENCE_COMMIT, taken from the git history, on this machine.
"""
import shutil
import subprocess
import tarfile
import io

import pytest
import torch

import reference_runs
from conftest import ROOT

REFERENCE_COMMIT = "cecf3ba2c17f1f72d8134c85916834d1291b5917"


def _stored():
    """The stored reference of this torch version, or None."""
    stored = ROOT / "tests" / "reference" / reference_runs.reference_name()
    if not stored.is_file():
        return None
    ref = torch.load(stored, weights_only=True)
    return ref["weights"], ref["answers"]


def _from_history(tmp_path):
    """The reference made here and now by the scripts of REFERENCE_COMMIT."""
    if shutil.which("git") is None:
        pytest.skip(f"no git to make the reference from {REFERENCE_COMMIT[:7]}")
    proc = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", REFERENCE_COMMIT],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"commit {REFERENCE_COMMIT[:7]} is not in this clone")
    old = tmp_path / "old"
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(old, filter="data")
    return reference_runs.run_all(tmp_path / "old_runs", root=old)


def _differences(weights, answers, ref_weights, ref_answers):
    """What differs from the reference, as lines (none: bitwise equal)."""
    found = [] if answers == ref_answers else ["the answers differ"]
    for name, ref in ref_weights.items():
        mine = weights[name]
        if sorted(mine) != sorted(ref):
            found.append(f"{name}: other tensors")
            continue
        for key in ref:
            if not torch.equal(mine[key], ref[key]):
                diff = (mine[key].double() - ref[key].double()).abs().max().item()
                found.append(f"{name} {key}: max abs difference {diff:.3g}")
    return found


def test_final_weights_and_answers_equal_the_reference(tmp_path):
    """Against the stored reference; where this CPU computes it differently (the BLAS
    kernels differ between CPUs even on one thread: differences of about 1e-8), against
    the reference made on this machine by the earlier code."""
    weights, answers = reference_runs.run_all(tmp_path / "runs")
    stored = _stored()
    if stored is not None and not _differences(weights, answers, *stored):
        return
    ref = _from_history(tmp_path)
    found = _differences(weights, answers, *ref)
    assert not found, "\n".join(found[:10])
