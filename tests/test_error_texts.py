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
    "--jars": "spark-submit", "--packages": "spark-submit",
}
# Upper-case names in messages that are other programs' settings or placeholders.
OTHER_NAMES = {
    "DOCKER_HOST": "the Docker client's", "MLFLOW_TRACKING_URI": "MLflow's",
    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "MLflow's",
    "PIP_DISABLE_PIP_VERSION_CHECK": "pip's, in a Dockerfile",
    "HOST_FILE": "a placeholder in -C mount.PATH=HOST_FILE",
    "PYSPARK_SUBMIT_ARGS": "pyspark's (spark-submit's arguments)",
    "MODEL_DIR": "a placeholder in a usage line",
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


# ---- #37 item 6: install instructions name extras that exist, installed from the clone -------

ROOT = PACKAGE.parent
_EXTRA = re.compile(r"""pip install (?:-e )?['"]?([\w.-]*)\[([\w,-]+)\]""")


def extras() -> set[str]:
    """The extras setup.py declares."""
    (call,) = [node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
               if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"]
    (declared,) = [k.value for k in call.keywords if k.arg == "extras_require"]
    return {key.value for key in declared.keys}


def install_texts() -> Iterator[tuple[str, str]]:
    """(where, text) of the package's sources, the README, the guides and the scripts."""
    files = [*PACKAGE.rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").rglob("*.md"),
             *(ROOT / "scripts").glob("*.sh"), *(ROOT / "examples").rglob("*")]
    for path in sorted(p for p in files if p.is_file() and p.suffix in (".py", ".md", ".sh")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            yield f"{path.relative_to(ROOT)}:{number}", line


def test_every_extra_a_text_names_exists_and_installs_from_the_clone():
    """The package is on no index: `pip install 'mlflow-preproc[spark]'` fails for everyone;
    `pip install '.[spark]'` in the clone is what works."""
    wrong = []
    for where, line in [*install_texts(), *texts()]:  # texts: a message split over lines
        for package, named in _EXTRA.findall(line):
            if package == "mlflow-preproc":
                wrong.append(f"{where}: {package}[{named}] is on no index; '.[{named}]' in "
                             "the clone")
            elif package in (".", "") and not set(named.split(",")) <= extras():
                wrong.append(f"{where}: setup.py has no extra {set(named.split(',')) - extras()}")
    assert not wrong, "\n".join(wrong)


def test_the_readme_lists_every_extra_and_what_demo_installs():
    readme = (ROOT / "README.md").read_text()
    listed = readme[readme.index("Optional parts are extras"):].split("\n\n")[0]
    assert {e for e in extras() if e != "test"} <= set(re.findall(r"'\.\[(\w+)\]'", listed)), \
        listed
    (installs,) = re.findall(r'pip install --quiet (-e "\.\[[\w,]+\]")',
                             (ROOT / "scripts" / "dev.sh").read_text())
    assert f"`pip install {installs}`" in readme, f"the README does not say demo runs {installs}"


def test_setup_py_gives_its_license_once_as_an_spdx_expression():
    """A "License ::" classifier beside license= made every build of the package (demo's
    install, pip install '.[broker]') print setuptools' deprecation banner, four times (#37)."""
    (call,) = [node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
               if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"]
    given = {k.arg: ast.literal_eval(k.value) for k in call.keywords
             if k.arg in ("license", "classifiers")}
    assert given["license"] == "Apache-2.0"
    assert not [c for c in given["classifiers"] if c.startswith("License ::")], given
