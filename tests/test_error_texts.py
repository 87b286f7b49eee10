"""What error texts tell a user to type exists: every ``--flag`` the package's strings name is
a flag of some ``mlflow-preproc`` command (or of the other program named beside it), and every
setting-like name (``KAFKA_BOOTSTRAP_SERVERS``) is a setting or a name the code itself uses.
Read from the source (ast), fast."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from test_cli import parsers

from mlflow_preproc.config import LIBRDKAFKA_PREFIX, SETTINGS

PACKAGE = Path(__file__).resolve().parent.parent / "mlflow_preproc"
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
_NAME = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")

# Flags of other programs that messages name, with the program that takes them.
OTHER_PROGRAMS_FLAGS = {
    "--listener-url": "tansu broker", "--advertised-listener-url": "tansu broker",
    "--storage-engine": "tansu broker",
    "--cpus": "docker run", "--memory": "docker run",
    "--env-manager": "mlflow models serve", "--flavor": "mlflow deployments create",
    "--requirement": "pip install", "--no-cache-dir": "pip install",
}
# Upper-case names in messages that are other programs' settings or placeholders.
OTHER_NAMES = {
    "DOCKER_HOST": "the Docker client's", "MLFLOW_TRACKING_URI": "MLflow's",
    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "MLflow's",
    "PIP_DISABLE_PIP_VERSION_CHECK": "pip's, in a Dockerfile",
    "HOST_FILE": "a placeholder in -C mount.PATH=HOST_FILE",
}


def texts() -> Iterator[tuple[str, str]]:
    """(where, text) of every string constant of the package but docstrings."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                           ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings:
                yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", node.value


def test_every_flag_a_message_names_is_a_flag_of_a_command():
    flags = {option for parser in parsers().values() for action in parser._actions
             for option in action.option_strings}
    unknown = sorted(f"{where}: {flag}" for where, text in texts()
                     for flag in _FLAG.findall(text)
                     if flag not in flags and flag not in OTHER_PROGRAMS_FLAGS)
    assert not unknown, "no command has these flags:\n" + "\n".join(unknown)


def test_every_setting_a_message_names_exists():
    # A name the code uses on its own (an environment variable it reads or sets, a module
    # attribute it looks up, an error code it compares) is real; one only ever written inside
    # prose is a setting that does not exist.
    used = {text for _, text in texts() if _NAME.fullmatch(text)}
    unknown = sorted(f"{where}: {name}" for where, text in texts() if not _NAME.fullmatch(text)
                     for name in _NAME.findall(text)
                     if name not in SETTINGS and name not in used and name not in OTHER_NAMES
                     and not name.startswith(LIBRDKAFKA_PREFIX))
    assert not unknown, "no setting has these names:\n" + "\n".join(unknown)
