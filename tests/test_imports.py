"""The package's shape: the import graph has no circle and no arrow from the layers to training,
importing a layer loads no training code, and ``import umilayers`` needs only the core
dependencies (torch, einops, numpy)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "umilayers"

#: What ``import umilayers`` and the layers may load: everything but these.
TRAINING = ("umilayers.train", "umilayers.cli", "umilayers.demo", "umilayers.__main__")
#: The layers, the model and the data side: none of them may reach TRAINING.
LAYERS = ("umilayers", "umilayers.attention", "umilayers.projection", "umilayers.fusion", "umilayers.losses",
          "umilayers.pseudo_labels", "umilayers.model", "umilayers.baselines", "umilayers.metrics",
          "umilayers.data", "umilayers.data.store", "umilayers.data.dataset", "umilayers.data.synthetic")
#: The one import inside a function that is allowed: the lazy ``umilayers.fit`` (PEP 562).
LAZY = {("umilayers", "umilayers.train")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported umilayers module, inside a function)`` for every import statement of a file."""
    tree = ast.parse(path.read_text())
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [base]).strip(".")
                for alias in child.names:  # `from umilayers import demo` imports a module too
                    candidate = f"{base}.{alias.name}"
                    found.append((candidate if _is_module(candidate) else base, nested))
            visit(child, nested)

    visit(tree, False)
    return [(name, nested) for name, nested in found if name == "umilayers" or name.startswith("umilayers.")]


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        graph[module] = {name for name, _ in _imports(path) if name != module and (module, name) not in LAZY}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_import_graph_has_no_circle():
    graph = _graph()
    circles = sorted(m for m in graph if m in _reachable(graph, m))
    assert not circles, f"modules on an import circle: {circles}"


def test_layers_have_no_arrow_to_training():
    graph = _graph()
    for layer in LAYERS:
        reached = sorted(m for m in _reachable(graph, layer) if m.startswith(TRAINING))
        assert not reached, f"{layer} imports training code: {reached}"


def test_no_package_import_hidden_in_a_function():
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        hidden += [f"{module} -> {name}" for name, nested in _imports(path) if nested and (module, name) not in LAZY]
    assert not hidden, f"imports of the package inside functions: {hidden}"


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_importing_a_layer_loads_no_training_code():
    # One fresh interpreter imports each layer in turn and lists what got loaded by then.
    code = (
        "import importlib, json, sys\n"
        f"loaded = {{}}\nfor name in {list(LAYERS)!r}:\n"
        "    importlib.import_module(name)\n"
        "    loaded[name] = sorted(m for m in sys.modules if m.startswith('umilayers'))\n"
        "print(json.dumps(loaded))\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    for layer, modules in json.loads(result.stdout).items():
        assert not [m for m in modules if m.startswith(TRAINING)], f"import {layer} loaded {modules}"


def test_training_loads_on_first_use():
    result = _run("import sys, umilayers\n"
                  "assert 'umilayers.train' not in sys.modules\n"
                  "fit = umilayers.fit\n"
                  "import umilayers.train\n"
                  "assert fit is umilayers.train.fit and umilayers.FitConfig is umilayers.train.FitConfig\n")
    assert result.returncode == 0, result.stderr


#: Optional extras; `import umilayers` and every layer must work without any of them.
OPTIONAL = ("tqdm", "matplotlib", "timm", "torchvision", "torchaudio", "h5py", "PIL", "xformers", "scipy",
            "hypothesis", "sphinx")


def test_core_dependencies_suffice():
    # An import hook refuses every optional package, as on a machine with only torch, einops and
    # numpy (the wheel's dependencies); no second environment needed.
    code = (
        "import importlib, sys\n"
        "class Refuse:\n"
        f"    blocked = {OPTIONAL!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.blocked:\n"
        "            raise ImportError(f'{name} is not installed (refused by the test)')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Refuse())\n"
        f"for name in {list(LAYERS)!r}:\n"
        "    importlib.import_module(name)\n"
        "import torch, umilayers\n"
        "model = umilayers.UnseenModalityModel({'rgb': 8}, num_outputs=3, dim=8, num_tokens=2,\n"
        "                                      projection_depth=1, fusion_depth=1, heads=2)\n"
        "out = model({'rgb': torch.randn(2, 4, 8)})\n"
        "model.loss(out, torch.tensor([0, 2]), torch.full((2, 3), 1 / 3)).total.backward()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in Refuse.blocked))\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
