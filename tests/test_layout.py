"""The deploy package's layout, as #22 set it: imports run one way, so a backend cannot reach
into the adapter or the other backend. Read from the source (ast), fast."""

from __future__ import annotations

import ast
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent / "mlflow_preproc" / "deploy"


def _module(path: Path) -> str:
    parts = path.relative_to(DEPLOY.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each module of mlflow_preproc.deploy -> the deploy modules it imports (anywhere in it,
    also inside functions)."""
    graph = {}
    for path in DEPLOY.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[_module(path)] = found
    return {m: {i for i in found if i in graph and i != m} for m, found in graph.items()}


def test_no_backend_imports_the_adapter_or_the_other_backend():
    graph = _imports()
    for module, imported in graph.items():
        for backend, other in (("docker", "kubernetes"), ("kubernetes", "docker")):
            if module.startswith(f"mlflow_preproc.deploy.{backend}"):
                assert "mlflow_preproc.deploy.target" not in imported, module
                assert not any(i.startswith(f"mlflow_preproc.deploy.{other}")
                               for i in imported), module


def test_the_deploy_package_has_no_import_circle():
    graph = _imports()
    # A package's __init__ re-exports its modules: an edge to the package is one to them.
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, " -> ".join([*path, module])
        if module in done:
            return
        for imported in graph[module]:
            if not module.startswith(imported + "."):  # a module naming its own package
                visit(imported, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])
