"""The package's layout: imports run one way (#22 for deploy, #39 for the rest), so the data
path reads top to bottom (record in -> decode -> pre_processing -> encode -> record out) and a
part can be read without the parts above it. Read from the source (ast), fast."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlflow_preproc"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(path: Path, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    base = _module(path).split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> dict[str, set[str]]:
    """Each module of mlflow_preproc -> the package's modules it imports (anywhere in it, also
    inside functions; ``from package import module`` counts as the module)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (module := _absolute(path, node)):
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[_module(path)] = found
    return {m: {i for i in found if i in graph and i != m} for m, found in graph.items()}


GRAPH = _imports()


def _reached(module: str) -> set[str]:
    """Every module ``module`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for imported in GRAPH[todo.pop()]:
            if imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return seen


def _in(module: str, *areas: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in areas)


def test_the_package_has_no_import_circle():
    # A package's __init__ re-exports its modules: an edge to the package is one to them.
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, " -> ".join([*path, module])
        if module in done:
            return
        for imported in GRAPH[module]:
            if not module.startswith(imported + "."):  # a module naming its own package
                visit(imported, [*path, module])
        done.add(module)

    for module in GRAPH:
        visit(module, [])


def test_the_record_runtime_imports_no_mode_that_runs_it():
    # runtime/ (the flavor, decoding, records, files) is what every mode shares and what a
    # logged model ships: it never reaches Kafka's loop, Spark, deployments or the CLI.
    above = ("mlflow_preproc.streaming", "mlflow_preproc.spark", "mlflow_preproc.deploy",
             "mlflow_preproc.builds", "mlflow_preproc.image", "mlflow_preproc.monitoring",
             "mlflow_preproc.cli")
    for module in GRAPH:
        if _in(module, "mlflow_preproc.runtime"):
            assert not [i for i in GRAPH[module] if _in(i, *above)], module


def test_the_formats_package_is_modules_of_one_job_under_its_table():
    # Each module of runtime/formats imports its siblings, never the package's __init__ (the
    # public table re-exporting them), and none is a file of everything again.
    formats = "mlflow_preproc.runtime.formats"
    modules = [m for m in GRAPH if m.startswith(formats + ".")]
    assert len(modules) >= 6, modules
    for module in modules:
        assert formats not in GRAPH[module], module
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        assert len(path.read_text().splitlines()) <= 450, module


def test_the_loops_collaborators_never_import_the_loop():
    # The loop's concerns (assignment, output, delivery, headers, message size, clients,
    # topics, checkpoint, transactions, errors) are below it: each can be read and tested
    # without it, and raising FatalError never needs the loop.
    loop = "mlflow_preproc.streaming.loop"
    users = {loop, "mlflow_preproc.streaming.stream", "mlflow_preproc.streaming.bridge"}
    collaborators = {m for m in GRAPH[loop] if _in(m, "mlflow_preproc.streaming")} - users
    assert {"mlflow_preproc.streaming.assignment", "mlflow_preproc.streaming.output",
            "mlflow_preproc.streaming.headers", "mlflow_preproc.streaming.topics"} <= collaborators
    for module in collaborators:
        assert not _reached(module) & users, module


def test_no_backend_imports_the_adapter_or_the_other_backend():
    for module, imported in GRAPH.items():
        for backend, other in (("docker", "kubernetes"), ("kubernetes", "docker")):
            if module.startswith(f"mlflow_preproc.deploy.{backend}"):
                assert "mlflow_preproc.deploy.target" not in imported, module
                assert not any(i.startswith(f"mlflow_preproc.deploy.{other}")
                               for i in imported), module


def test_the_settings_table_and_the_secrets_rule_are_the_ground():
    # config.py loads before anything heavy (stream catches SIGTERM from its first fraction
    # of a second) and every part reads it: it imports no other module of the package.
    for module in ("mlflow_preproc.config", "mlflow_preproc.secrets"):
        assert not {i for i in GRAPH[module] if i != "mlflow_preproc"}, module
