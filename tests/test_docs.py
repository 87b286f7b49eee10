"""Every shell and Python block of README.md and docs/ runs, or says why it does not.

A documented command must not drift from the code: each fenced ``bash`` or ``python`` block
is run, top to bottom, in one shell per document, in an empty folder with no
``MLFLOW_TRACKING_URI`` (a newcomer's machine: MLflow's default ``./mlflow.db``), with only
the processes the document starts in the background, stopped at its end by their PIDs.
A comment line just above a block changes what happens to it:

- ``<!-- file: NAME -->``: the block is written to ``NAME`` (a module the next blocks use);
- ``<!-- not run: REASON -->``: the block is not run, and the reason must say why (a cluster,
  a registry or a remote host this machine does not have, or the test that runs the same
  commands on real components).

Blocks of other languages (``text``, ``yaml``...) are output or data and are not run; a block
with no language at all is refused, so that nothing is left out by accident.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BIN

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
        ROOT / "benchmarks" / "README.md"]
RUNNABLE = ("bash", "python")
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARK = re.compile(r"^<!-- (file|not run): (.*?) -->$")


@dataclass
class Block:
    path: Path
    line: int
    language: str
    text: str
    mark: str | None = None  # "file" or "not run"
    argument: str = ""  # the file name, or the reason

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the mark of the line above each."""
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        mark = _MARK.match(lines[i - 1]) if i else None
        found.append(Block(path, i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                           *(mark.groups() if mark else ())))
        i = end + 1
    return found


def script(path: Path) -> str:
    """One bash script running the runnable blocks of ``path`` in order."""
    parts = ["set -euo pipefail",
             # What the document started in the background stops with it, by PID.
             "trap 'for p in $(jobs -p); do kill $p 2>/dev/null || true; done; wait' EXIT"]
    for n, block in enumerate(blocks(path)):
        if block.mark == "file":
            parts.append(f"mkdir -p \"$(dirname {block.argument})\"\n"
                         f"cat > {block.argument} <<'DOC_BLOCK_EOF'\n{block.text}DOC_BLOCK_EOF")
        elif block.mark is None and block.language == "python":
            parts.append(f"echo '--- {block.where}' >&2\n"
                         f"cat > .block-{n}.py <<'DOC_BLOCK_EOF'\n{block.text}DOC_BLOCK_EOF\n"
                         f"python .block-{n}.py")
        elif block.mark is None and block.language == "bash":
            parts.append(f"echo '--- {block.where}' >&2\n{block.text}")
    return "\n".join(parts) + "\n"


def runs(path: Path) -> bool:
    return any(b.mark is None and b.language in RUNNABLE for b in blocks(path))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_has_a_language_and_every_skip_a_reason(path):
    for block in blocks(path):
        assert block.language, f"{block.where}: a block needs a language (```text for output)"
        if block.mark == "not run":
            assert len(block.argument.split()) >= 3, f"{block.where}: say why it is not run"
        if block.mark == "file":
            assert re.fullmatch(r"[\w./-]+", block.argument), block.where


@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.parametrize("path", [p for p in DOCS if runs(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_documented_commands_run_as_written(path, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["REPO"] = str(ROOT)  # documents that use the repository's example data say $REPO
    (tmp_path / "doc.sh").write_text(script(path))
    done = subprocess.run(["bash", "doc.sh"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` removed,
    spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_between_the_documents_leads_somewhere(path):
    for target in _LINK.findall(path.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.relative_to(ROOT)}: {target} does not exist"
        if anchor:
            assert linked.is_file() and anchor in anchors(linked), \
                f"{path.relative_to(ROOT)}: no heading #{anchor} in {linked.name}"


@pytest.mark.parametrize("guide, backends", [
    ("images-and-target.md", ("docker", "kubernetes")), ("kubernetes.md", ("kubernetes",))])
def test_the_deployment_guides_say_which_keys_each_backend_takes(guide, backends):
    # Written from the table the target checks keys with, so a key moved to another backend
    # shows up here as a stale guide (#33, finding 4).
    from mlflow_preproc.deploy.options import backend_keys_markdown

    text = (ROOT / "docs" / "guides" / guide).read_text()
    for backend in backends:
        assert backend_keys_markdown(backend) in text, f"{guide}: rewrite the {backend} " \
            "sentence with mlflow_preproc.deploy.options.backend_keys_markdown"
