"""The layering rules of the tree: `tlcr_ray` imports without Ray (only `cli` reaches the Ray layers),
its module-level imports form no circle, and `actors/` and `serve/` never import each other."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Every tlcr_ray module, imported in a fresh interpreter where `import ray` raises ImportError.
IMPORT_ALL_WITHOUT_RAY = """
import importlib, pkgutil, sys
sys.modules["ray"] = None
import tlcr_ray
failed = []
for info in pkgutil.walk_packages(tlcr_ray.__path__, "tlcr_ray."):
    if info.name == "tlcr_ray.cli":
        continue
    try:
        importlib.import_module(info.name)
    except ImportError as exc:
        failed.append(f"{info.name}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _modules(package: str) -> dict[str, Path]:
    root = REPO / package
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported by statements that run at import time (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_every_library_module_imports_without_ray():
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL_WITHOUT_RAY], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"modules that need ray:\n{proc.stdout}{proc.stderr[-2000:]}"


def test_library_imports_form_no_circle():
    modules = _modules("tlcr_ray")
    graph = {name: {m for m in _top_level_imports(path) if m in modules and m != name}
             for name, path in modules.items()}
    # A package's __init__ is imported before its submodules: an edge sub -> its own package is not a circle.
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_ray_layers_do_not_import_each_other():
    for package, other in (("actors", "serve"), ("serve", "actors")):
        for name, path in _modules(package).items():
            bad = [m for m in _top_level_imports(path) if m == other or m.startswith(other + ".")]
            assert not bad, f"{name} imports {bad}"


def test_the_ray_init_layer_imports_neither_ray_layer():
    for name, path in _modules("ray_init").items():
        bad = [m for m in _top_level_imports(path) if m.split(".")[0] in ("actors", "serve")]
        assert not bad, f"{name} imports {bad}"
