"""The docker-compose file and the GitHub Actions workflow cannot run here (no Docker Hub,
no GitHub): check that every command they call exists and every setting they pass is accepted."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN
from mlflow_preproc import config
from mlflow_preproc.deploy import planner

PIPELINE = Path(__file__).resolve().parent.parent / "examples" / "pipeline"


def test_compose_services_pass_only_accepted_settings():
    compose = yaml.safe_load((PIPELINE / "docker-compose.yml").read_text())
    ours = [s for s in compose["services"].values()
            if s["image"].startswith("preprocessing-")]
    assert len(ours) == 2
    for service in ours:
        env = {k: str(v) for k, v in service["environment"].items()}
        image = config.load("image", environ=env)  # raises ConfigError on a bad value
        mode = image["MLFLOW_PREPROC_MODE"]
        known = {name for name, s in config.SETTINGS.items()}
        assert set(env) <= known, set(env) - known
        resolved = config.load("bridge" if mode == "bridge" else "stream", environ=env)
        resolved.require("INPUT_TOPIC")
        resolved.require("KAFKA_BOOTSTRAP_SERVERS")
        if mode == "bridge":
            resolved.require("API_URL")
        assert resolved.kafka == {"bootstrap.servers": "kafka:9092"}  # nothing leaks to librdkafka


def _commands(workflow: dict) -> list[list[str]]:
    commands = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            if "run" in step:
                text = re.sub(r"\$\{\{[^}]*\}\}", "X", step["run"]).replace("\n", " ")
                commands.append(shlex.split(text))
    return commands


def test_github_workflow_calls_existing_commands_with_valid_config():
    workflow = yaml.safe_load((PIPELINE / "github-actions-build-images.yml").read_text())
    assert workflow[True]["repository_dispatch"]["types"] == ["mlflow-model-version"]  # "on"
    mlflow_calls = [c for c in _commands(workflow) if c[0] == "mlflow"]
    assert {tuple(c[1:3]) for c in mlflow_calls} >= {("deployments", "create"),
                                                     ("models", "build-docker")}
    for cmd in mlflow_calls:
        # The real CLI knows the command and every option used.
        helped = subprocess.run([str(BIN / "mlflow"), *cmd[1:3], "--help"],
                                capture_output=True, text=True, timeout=120)
        assert helped.returncode == 0, helped.stderr
        for option in (a for a in cmd[3:] if a.startswith("-")):
            assert re.search(rf"(^|[\s,]){re.escape(option)}[\s,]", helped.stdout), option
        if cmd[1] == "deployments":
            assert cmd[cmd.index("-t") + 1] == "preproc"
            pairs = dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "-C")
            planner.resolve_options(None, pairs)  # raises on unknown keys


def test_workflow_config_validation_would_catch_a_typo():
    with pytest.raises(Exception, match="unknown config key"):
        planner.resolve_options(None, {"prot": "8080"})
