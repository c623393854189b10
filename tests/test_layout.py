"""The shape of the code: each module imports only modules below it, so the import graph
has no cycles, and no module rebinds module-level state after import."""
import ast

from conftest import ROOT

# Bottom to top: a module may import the ones before it, never one after it.
LAYERS = ["metrics", "utils", "monitor", "model", "cpu_kernels", "hf", "dist", "data", "samples", "wordpiece", "store", "corpus",
          "checkpoint",
          "train", "squad", "span_selection", "mlm_task", "ns_task", "qa_task", "span_task", "export", "versus_transformers", "bench", "bench_data", "plot",
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


MUTATORS = {"append", "extend", "insert", "pop", "popitem", "clear", "update", "setdefault", "add",
            "discard", "remove", "sort", "reverse"}


def _mutable(value):
    """Whether an assigned value is a new list, dict or set."""
    if isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
        return True
    return (isinstance(value, ast.Call) and isinstance(value.func, (ast.Name, ast.Attribute))
            and getattr(value.func, "id", getattr(value.func, "attr", None))
            in ("dict", "list", "set", "defaultdict", "Counter", "OrderedDict", "deque"))


def mutated_module_state(source):
    """The module-level names and class attributes bound to a list, dict or set that code
    in the module changes after import (a mutating method, an item set or deleted)."""
    tree = ast.parse(source)
    shared = set()  # names, and 'Class.attr' for class attributes
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        shared |= {t.id for t in targets if isinstance(t, ast.Name) and _mutable(node.value)}
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.Assign) and _mutable(item.value):
                    shared |= {f"{node.name}.{t.id}" for t in item.targets if isinstance(t, ast.Name)}
    attrs = {name.split(".")[1] for name in shared if "." in name}

    def holder(expr):
        """The shared state an expression names: NAME, or Class/cls.attr."""
        if isinstance(expr, ast.Name) and expr.id in shared:
            return expr.id
        if isinstance(expr, ast.Attribute) and expr.attr in attrs and isinstance(expr.value, ast.Name):
            return f"{expr.value.id}.{expr.attr}"
        return None

    found = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in MUTATORS and holder(node.func.value)):
                found.add(holder(node.func.value))
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                targets = node.targets if hasattr(node, "targets") else [node.target]
                found |= {holder(t.value) for t in targets
                          if isinstance(t, ast.Subscript) and holder(t.value)}
    return found


def test_no_module_state_is_mutated_after_import():
    """A list, dict or set made at import and changed by the code later is state shared by
    every caller (a buffer pool in a class attribute, a registry filled by calls): refused."""
    for m in LAYERS:
        assert not mutated_module_state((ROOT / f"{m}.py").read_text(encoding="utf-8")), m
    # what it catches: a pool in a class attribute, a module-level cache
    assert mutated_module_state("class Pool:\n    free = {}\n    @classmethod\n    def take(cls):\n"
                                "        return cls.free.pop(1)\n") == {"cls.free"}
    assert mutated_module_state("CACHE = {}\ndef get(k):\n    CACHE[k] = 1\n") == {"CACHE"}
    assert not mutated_module_state("NAMES = ['a']\ndef get():\n    return list(NAMES)\n")
