"""The package's layering (docs/design.md §9): every import inside ``nextvit_kernels`` goes to a
lower layer, so no two modules import each other, and a forward walks down, never back.

Read from the source (every ``import`` statement, at module level or inside a function, and every
``importlib.import_module`` of a literal name), not from what happens to be imported at run time.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "nextvit_kernels"

# Lowest first; a module may import only from layers below its own. A subpackage is one unit.
LAYERS = [
    {"config", "_library", "graphs"},
    {"blocks", "ops"},
    {"plan"},
    {"fused", "runtime", "clib"},
    {"model_file"},
    {"engine"},
    {"model", "timm_patch"},
    {"checkpoint"},
    {"cli", "harness", "onnx_export", "testing"},
    {"__init__"},  # the package facade: imports lazily whatever a user asks for
    {"aot", "bench", "serve"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path):
    """(line, unit) of every import of a package module in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    here = path.relative_to(ROOT).with_suffix("").parts  # ("nextvit_kernels", "ops", "mlp")
    package = here[:-1]  # (for __init__.py too: its package is itself)
    out = []

    def target(parts):
        if parts[:1] == ("nextvit_kernels",):
            out.append((node.lineno, parts[1] if len(parts) > 1 else "__init__"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target(tuple(alias.name.split(".")))
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            mod = base + tuple((node.module or "").split(".")) if node.module else base
            if len(mod) == 1 and mod == ("nextvit_kernels",):  # from nextvit_kernels import fused, ...
                for alias in node.names:
                    target(mod + (alias.name,))
            else:
                target(mod)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            target(tuple(node.args[0].value.split(".")))
    return out


def _graph():
    edges = {}
    for path in sorted(PKG.rglob("*.py")):
        unit = _unit(path)
        for line, dep in _imports(path):
            if dep != unit:
                edges.setdefault(unit, set()).add((dep, f"{path.relative_to(ROOT)}:{line}"))
    return edges


def test_every_module_has_a_layer():
    units = {_unit(p) for p in PKG.rglob("*.py")}
    assert units <= set(RANK), f"no layer for {sorted(units - set(RANK))}: add them to LAYERS (and docs/design.md §9)"


def test_imports_go_down_the_layers():
    up = [f"{where}: {unit} (layer {RANK[unit]}) imports {dep} (layer {RANK[dep]})"
          for unit, deps in _graph().items() for dep, where in deps if RANK[dep] >= RANK[unit]]
    assert not up, "imports that do not go down:\n" + "\n".join(sorted(up))


def test_no_import_circle():
    graph = {u: {d for d, _ in deps} for u, deps in _graph().items()}
    seen, stack = set(), []

    def visit(u):
        if u in stack:
            return stack[stack.index(u):] + [u]
        if u in seen:
            return None
        seen.add(u)
        stack.append(u)
        for d in sorted(graph.get(u, ())):
            cycle = visit(d)
            if cycle:
                return cycle
        stack.pop()
        return None

    for u in sorted(graph):
        cycle = visit(u)
        assert cycle is None, " -> ".join(cycle)


def test_the_model_leaves_inference_to_the_engine():
    deps = {d for d, _ in _graph()["model"]}
    assert not deps & {"fused", "graphs", "runtime", "model_file", "aot", "plan", "_library"}, deps


def test_the_layering_test_sees_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: an import of the model from the plan is reported."""
    fake = tmp_path / "nextvit_kernels"
    fake.mkdir()
    (fake / "plan.py").write_text("def f():\n    from .model import NextViT\n")
    (fake / "model.py").write_text("from . import plan\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"plan \(layer 2\) imports model \(layer 6\)"):
        test_imports_go_down_the_layers()
    with pytest.raises(AssertionError, match="model -> plan -> model|plan -> model -> plan"):
        test_no_import_circle()


def test_model_file_and_engine_run_without_triton():
    """Building a model, folding it and writing its model file (what the engine's C path does
    before the runtime loads it) import neither Triton nor the kernels."""
    code = ("import sys, torch\n"
            "import nextvit_kernels as nk\n"
            "from nextvit_kernels import engine, model_file, runtime\n"
            "m = nk.NextViT(depths=(1, 1, 5, 1), num_classes=10).eval()\n"
            "data = model_file.plan_bytes(model_file.fold_for_runtime(m, torch.float16))\n"
            "assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 10)\n"  # CPU under auto: the module graph
            "bad = sorted(n for n in sys.modules if n.split('.')[0] == 'triton' or n.startswith('nextvit_kernels.ops'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
