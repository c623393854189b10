"""The shape of the code: each module imports only modules below it, so the import graph
has no cycles, and no module rebinds module-level state after import."""
import ast

from conftest import ROOT

# Bottom to top: a module may import the ones before it, never one after it.
LAYERS = ["metrics", "utils", "monitor", "model", "hf", "dist", "data", "samples", "wordpiece", "store", "corpus",
          "checkpoint",
          "train", "squad", "cloze", "mlm_task", "ns_task", "qa_task", "export", "peer", "bench", "bench_data", "plot",
          "recipe"]


def _imports(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


def test_every_module_is_in_a_layer():
    assert sorted(p.stem for p in ROOT.glob("*.py")) == sorted(LAYERS)


def test_modules_import_only_modules_below_them():
    upward = {(m, i) for m in LAYERS for i in _imports(ROOT / f"{m}.py")
              if LAYERS.index(i) >= LAYERS.index(m)}
    assert upward == set()


def test_no_module_state_is_rebound_after_import():
    for m in LAYERS:
        tree = ast.parse((ROOT / f"{m}.py").read_text(encoding="utf-8"))
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], m
