"""MLflow deployment target ``preproc``: preprocessing models as Docker containers.

    mlflow deployments create -t preproc --name fink -m models:/fink-preproc/1 -C mode=both \\
        -C input_topic=fink-alert -C kafka_bootstrap_servers=127.0.0.1:9092

builds the model's serving image with the Docker SDK and starts its container(s). Deployments
are Docker containers labelled ``org.mlflow-preproc.deployment=<name>``: ``list``/``get`` read
Docker itself, so nothing is kept in a local file that could drift from what runs.
Target URI: ``preproc``, or ``preproc:/<docker host>`` such as ``preproc:/unix:///run/docker.sock``.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mlflow_preproc import config as settings
from mlflow_preproc.deploy.image_build import (
    LABEL,
    BuildError,
    build_image,
    docker_reference,
    model_python_version,
    prepare_context,
)

FLAVOR = "preprocessing"
DEPLOYMENT_LABEL = f"{LABEL}.deployment"

# Deployment keys (-C key=value); every setting of the settings table is accepted too, by its
# lowercase name (-C input_topic=fink-alert), as are env.NAME=value and label.NAME=value.
CONFIG_KEYS: dict[str, tuple[str, str, str]] = {
    # key: (default, meaning, example)
    "mode": ("serve", "serve, kafka, both, run or bridge (see MLFLOW_PREPROC_MODE)", "both"),
    "port": ("8080", "scoring server port on the host; replica i listens on port+i", "5001"),
    "replicas": ("1", "containers; in kafka/both mode they share one consumer group", "2"),
    "consumers": ("1", "Kafka consumer processes per container", "2"),
    "workers": ("", "scoring server workers per container (MLflow's default: CPU count)", "2"),
    "image": ("preprocessing-{model_name}-{version}", "image repository name", "fink-prep"),
    "tag": ("latest", "image tag", "v1"),
    "base_image": ("python:{python_version}-slim", "base image of the build", "python:3.11-slim"),
    "python_version": ("the model's", "Python version of the default base image", "3.11.7"),
    "network_mode": ("host", "Docker network mode of builds and containers", "host"),
    "docker_host": ("DOCKER_HOST or the local socket", "Docker engine to use",
                    "unix:///run/docker.sock"),
    "no_cache": ("false", "build without Docker's layer cache", "true"),
    "health_timeout": ("120", "seconds to wait for a new container to be healthy", "300"),
    "remove_image": ("false", "delete only: also remove the image", "true"),
}
PREFIX_KEYS = {"env.": "set a container environment variable", "label.": "add a Docker label"}


class DeploymentError(MlflowException, click.ClickException):
    """A deployment failed for a reason the user can fix; the message says how.

    Also a ClickException, so the ``mlflow deployments`` CLI prints one line, not a traceback.
    """

    def __init__(self, message: str):
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)
        click.ClickException.__init__(self, message)

    def __str__(self) -> str:
        return self.message


def target_help() -> str:
    """``mlflow deployments help -t preproc``."""
    lines = [__doc__.strip(), "", "Config keys (-C key=value):", ""]
    for key, (default, meaning, example) in CONFIG_KEYS.items():
        lines.append(f"  {key:<16} {meaning}\n  {'':<16} default: {default}; e.g. -C {key}={example}")
    for prefix, meaning in PREFIX_KEYS.items():
        lines.append(f"  {prefix + 'NAME':<16} {meaning}; e.g. -C {prefix}LOG_LEVEL=DEBUG")
    lines += ["", "Streaming settings, by lowercase name (see README.md, Settings):", ""]
    for s in settings.SETTINGS.values():
        if s.modes != ("image",):
            default = "" if s.default in (None, "") else f" (default {s.default})"
            lines.append(f"  {s.env.lower():<26} {s.help}{default}; e.g. -C "
                         f"{s.env.lower()}={s.example}")
    return "\n".join(lines)


def run_local(name: str, model_uri: str, flavor: str | None = None,
              config: dict | None = None) -> None:
    """``mlflow deployments run-local -t preproc``: build, run in the foreground, Ctrl-C stops."""
    client = PreprocDeploymentClient("preproc")
    config = dict(config or {})
    container = None
    try:
        deployment = client.create_deployment(name, model_uri, flavor, config)
        container = client._docker.containers.get(deployment["containers"][0]["name"])
        print(f"running {deployment['image']} as {container.name}; Ctrl-C stops it",
              file=sys.stderr)
        for chunk in container.logs(stream=True, follow=True):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        if container is not None:
            client.delete_deployment(name)


class PreprocDeploymentClient(BaseDeploymentClient):
    """Deploys preprocessing models as containers on a Docker engine."""

    def __init__(self, target_uri: str):
        super().__init__(target_uri)
        _, _, rest = target_uri.partition(":/")
        self._docker_host = rest or None
        self._client = None

    # ---- the deployment API ----------------------------------------------------------------

    def create_deployment(self, name: str, model_uri: str, flavor: str | None = None,
                          config: dict | None = None, endpoint: str | None = None) -> dict:
        config = self._validate(flavor, config)
        if self._containers(name):
            raise DeploymentError(f"a deployment named {name} already exists; use mlflow "
                                  f"deployments update --name {name}, or delete it first")
        image, identity = self.build_image(model_uri, config, name)
        self._check_ports_free(config)
        self._start(name, image, identity, model_uri, config)
        return self.get_deployment(name)

    def update_deployment(self, name: str, model_uri: str | None = None,
                          flavor: str | None = None, config: dict | None = None,
                          endpoint: str | None = None) -> dict:
        old = self._containers(name)
        if not old:
            raise self._not_found(name)
        previous = json.loads(old[0].labels.get(f"{LABEL}.config", "{}"))
        config = self._validate(flavor, {**previous, **(config or {})})
        model_uri = model_uri or old[0].labels[f"{LABEL}.model-uri"]
        image, identity = self.build_image(model_uri, config, name)
        if config["mode"] in ("serve", "both"):
            # Host networking: the new container cannot bind the old one's port while it runs.
            # Prove the new image serves on a spare port first; only then swap.
            self._trial_serve(name, image, identity, config)
        for container in old:
            container.stop(timeout=_stop_timeout(config))
            container.remove()
        self._start(name, image, identity, model_uri, config)
        return self.get_deployment(name)

    def delete_deployment(self, name: str, config: dict | None = None,
                          endpoint: str | None = None) -> None:
        containers = self._containers(name)
        if not containers:
            raise self._not_found(name)
        image = containers[0].labels.get(f"{LABEL}.image")
        for container in containers:
            if container.status == "running":
                container.stop(timeout=_stop_timeout(container.labels))
            container.remove(force=True)
        if settings.parse_bool(str((config or {}).get("remove_image", "false")), "remove_image"):
            self._docker.images.remove(image)

    def list_deployments(self, endpoint: str | None = None) -> list[dict]:
        names = sorted({c.labels[DEPLOYMENT_LABEL] for c in self._containers()})
        return [self.get_deployment(n) for n in names]

    def get_deployment(self, name: str, endpoint: str | None = None) -> dict:
        containers = self._containers(name)
        if not containers:
            raise self._not_found(name)
        labels = containers[0].labels
        statuses = [c.status for c in containers]
        mode = labels.get(f"{LABEL}.mode", "serve")
        port = labels.get(f"{LABEL}.port")
        return {
            "name": name,
            "flavor": FLAVOR,
            "status": "running" if set(statuses) == {"running"} else "/".join(sorted(statuses)),
            "mode": mode,
            "model_uri": labels.get(f"{LABEL}.model-uri"),
            "image": labels.get(f"{LABEL}.image"),
            "endpoint": f"http://127.0.0.1:{port}" if mode in ("serve", "both") else None,
            "containers": [{"name": c.name, "id": c.short_id, "status": c.status}
                           for c in containers],
            "config": json.loads(labels.get(f"{LABEL}.config", "{}")),
        }

    def predict(self, deployment_name: str | None = None, inputs: Any = None,
                endpoint: str | None = None) -> PredictionsResponse:
        url = self.get_deployment(deployment_name)["endpoint"]
        if url is None:
            raise DeploymentError(f"deployment {deployment_name} runs no scoring server (mode "
                                  "kafka); update it with -C mode=both to call predict")
        body = json.dumps(_as_payload(inputs)).encode()
        request = urllib.request.Request(f"{url}/invocations", body,
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return PredictionsResponse.from_json(resp.read().decode())
        except urllib.error.HTTPError as err:
            raise DeploymentError(f"{deployment_name} answered HTTP {err.code}: "
                                  f"{err.read().decode()[:1000]}") from None
        except urllib.error.URLError as err:
            raise DeploymentError(f"cannot reach {deployment_name} at {url} ({err.reason}); "
                                  "check it runs: mlflow deployments get -t preproc") from None

    # ---- building and starting ---------------------------------------------------------------

    def build_image(self, model_uri: str, config: dict | None = None, name: str | None = None,
                    echo=None) -> tuple[str, Any]:
        """Build the serving image of a preprocessing model without starting it.

        Returns the image reference and the model's :class:`ModelIdentity`. ``config`` takes
        the same keys as ``create`` (``image``, ``tag``, ``base_image``, ``no_cache``...).
        ``echo`` receives the build's output lines (default: stderr).
        """
        import mlflow

        from mlflow_preproc.runtime.model_identity import ModelNotFound, resolve_model

        try:
            identity = resolve_model(model_uri)
        except ModelNotFound as exc:
            raise DeploymentError(str(exc)) from None
        config = self._validate(None, config)
        workdir = Path(tempfile.mkdtemp(prefix="mlflow-preproc-model-"))
        try:
            try:
                model_dir = Path(mlflow.artifacts.download_artifacts(identity.download_uri,
                                                                     dst_path=str(workdir)))
            except MlflowException as exc:
                raise DeploymentError(f"cannot download {model_uri}: "
                                      f"{exc.message.splitlines()[0]}") from None
            self._require_preprocessing(model_uri, model_dir)
            base = config.get("base_image") or \
                f"python:{config.get('python_version') or model_python_version(model_dir)}-slim"
            default_repo = (f"preprocessing-{identity.name}-{identity.version}"
                            if identity.name else f"preprocessing-{name or 'model'}")
            reference = f"{docker_reference(config.get('image') or default_repo)}:" \
                        f"{config.get('tag') or 'latest'}"
            registered = {"uri": identity.uri, "name": identity.name,
                          "version": identity.version}
            context = prepare_context(model_dir, base, registered)
            try:
                if echo is None:
                    print(f"building {reference} from {base}", file=sys.stderr)
                build_image(self._docker, context, reference,
                            {f"{LABEL}.model-uri": identity.uri},
                            network_mode=config["network_mode"],
                            nocache=settings.parse_bool(config["no_cache"], "no_cache"),
                            echo=echo)
            except BuildError as exc:
                raise DeploymentError(str(exc)) from None
            finally:
                shutil.rmtree(context, ignore_errors=True)
            return reference, identity
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _start(self, name: str, image: str, identity, model_uri: str, config: dict) -> None:
        base_port = int(config["port"])
        for i in range(int(config["replicas"])):
            self._run_container(f"{name}-{i}", image, _environment(config, identity,
                                                                   base_port + i),
                                _labels(name, image, model_uri, config, base_port + i),
                                config)
        for i in range(int(config["replicas"])):
            self._wait_healthy(f"{name}-{i}", config, base_port + i)

    def _run_container(self, container_name, image, environment, labels, config):
        return self._docker.containers.run(
            image, name=container_name, detach=True, network_mode=config["network_mode"],
            environment=environment, labels=labels,
            # The entrypoint exits non-zero when a child dies; let Docker restart it.
            restart_policy={"Name": "on-failure", "MaximumRetryCount": 5},
        )

    def _trial_serve(self, name: str, image: str, identity, config: dict) -> None:
        port = _free_port()
        trial_config = {**config, "mode": "serve", "port": str(port)}
        trial = self._run_container(f"{name}-trial", image,
                                    _environment(trial_config, identity, port),
                                    {f"{LABEL}.trial": name}, trial_config)
        try:
            self._wait_healthy(trial.name, trial_config, port)
        finally:
            trial.remove(force=True)

    def _wait_healthy(self, container_name: str, config: dict, port: int) -> None:
        deadline = time.monotonic() + float(config["health_timeout"])
        serving = config["mode"] in ("serve", "both")
        settled_at = time.monotonic() + 3  # a consumer that cannot start exits within seconds
        while time.monotonic() < deadline:
            container = self._docker.containers.get(container_name)
            if container.status in ("exited", "dead") or container.attrs["RestartCount"]:
                raise DeploymentError(
                    f"container {container_name} exited during start-up; its last log lines:\n"
                    + container.logs(tail=20).decode(errors="replace"))
            if serving and _answers(f"http://127.0.0.1:{port}/ping"):
                return
            if not serving and container.status == "running" and time.monotonic() > settled_at:
                return
            time.sleep(0.5)
        raise DeploymentError(f"container {container_name} was not healthy within "
                              f"{config['health_timeout']}s; see docker logs {container_name}")

    # ---- helpers -------------------------------------------------------------------------------

    @property
    def _docker(self):
        if self._client is None:
            import docker

            host = self._docker_host
            try:
                client = docker.DockerClient(base_url=host) if host else docker.from_env()
                client.ping()
            except Exception as exc:  # docker raises DockerException, requests errors...
                where = host or "the default socket (DOCKER_HOST or /var/run/docker.sock)"
                raise DeploymentError(
                    f"cannot reach a Docker engine at {where} ({type(exc).__name__}); start "
                    "one (bash scripts/docker-engine.sh start, or systemctl start docker) or "
                    "point -C docker_host=... at a running engine") from None
            self._client = client
        return self._client

    def _containers(self, name: str | None = None) -> list:
        wanted = f"{DEPLOYMENT_LABEL}={name}" if name else DEPLOYMENT_LABEL
        found = self._docker.containers.list(all=True, filters={"label": wanted})
        return sorted(found, key=lambda c: c.name)

    def _validate(self, flavor: str | None, config: dict | None) -> dict:
        if flavor not in (None, FLAVOR, "python_function"):
            raise DeploymentError(f"flavor {flavor!r} is not supported by the preproc target; "
                                  f"omit --flavor or use {FLAVOR}")
        config = {str(k): str(v) for k, v in (config or {}).items()}
        stream_keys = {s.env.lower() for s in settings.SETTINGS.values() if s.modes != ("image",)}
        unknown = [k for k in config if k not in CONFIG_KEYS and k.lower() not in stream_keys
                   and not k.startswith(tuple(PREFIX_KEYS))]
        if unknown:
            raise DeploymentError(
                f"unknown config key(s) {', '.join(sorted(unknown))}; valid keys: "
                f"{', '.join(CONFIG_KEYS)}, env.NAME, label.NAME and the streaming settings "
                f"({', '.join(sorted(stream_keys))}); see mlflow deployments help -t preproc")
        if "docker_host" in config:
            self._docker_host = config["docker_host"]
        resolved = {k: v[0] for k, v in CONFIG_KEYS.items()
                    if k not in ("image", "base_image", "python_version", "docker_host",
                                 "workers")}
        resolved.update(config)
        if resolved["mode"] not in ("serve", "kafka", "both", "run", "bridge"):
            raise DeploymentError(f"mode={resolved['mode']!r} is not one of serve, kafka, "
                                  "both, run, bridge")
        for key in ("port", "replicas", "consumers", "health_timeout"):
            if not resolved[key].isdigit():
                raise DeploymentError(f"{key}={resolved[key]!r} is not a whole number; e.g. "
                                      f"-C {key}={CONFIG_KEYS[key][2]}")
        return resolved

    @staticmethod
    def _require_preprocessing(model_uri: str, model_dir: Path) -> None:
        import yaml

        flavors = yaml.safe_load((model_dir / "MLmodel").read_text()).get("flavors", {})
        if FLAVOR not in flavors:
            raise DeploymentError(
                f"{model_uri} is not a preprocessing model (its flavors: "
                f"{', '.join(flavors) or 'none'}); the preproc target deploys models logged "
                "with mlflow.preproc.log_model; use mlflow models build-docker for others")

    def _check_ports_free(self, config: dict) -> None:
        if config["mode"] not in ("serve", "both") or config["network_mode"] != "host":
            return
        for i in range(int(config["replicas"])):
            port = int(config["port"]) + i
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise DeploymentError(f"port {port} is already in use on this host; pass "
                                          "-C port=<a free port>")

    @staticmethod
    def _not_found(name: str) -> DeploymentError:
        return DeploymentError(f"no deployment named {name}; mlflow deployments list -t "
                               "preproc shows the deployments")


def _environment(config: dict, identity, port: int) -> dict[str, str]:
    env = {"MLFLOW_PREPROC_MODE": config["mode"], "PORT": str(port),
           "KAFKA_CONSUMERS": config["consumers"]}
    if config.get("workers"):
        env["MLFLOW_MODELS_WORKERS"] = config["workers"]
    for key, value in config.items():
        if key.upper() in settings.SETTINGS and key not in CONFIG_KEYS:
            env[key.upper()] = value
        elif key.startswith("env."):
            env[key[len("env."):]] = value
    if config["mode"] in ("kafka", "both") and "OUTPUT_TOPIC" not in env and identity.name:
        # The model inside the image is a local path; name the legacy default topic here.
        suffix = env.get("KAFKA_TOPIC_SUFFIX", settings.SETTINGS["KAFKA_TOPIC_SUFFIX"].default)
        env["OUTPUT_TOPIC"] = settings.sanitize_topic(
            f"{identity.name}-{identity.version}-{suffix}")
    return env


def _labels(name: str, image: str, model_uri: str, config: dict, port: int) -> dict[str, str]:
    labels = {DEPLOYMENT_LABEL: name, f"{LABEL}.model-uri": model_uri, f"{LABEL}.image": image,
              f"{LABEL}.mode": config["mode"], f"{LABEL}.port": str(port),
              f"{LABEL}.config": json.dumps({k: v for k, v in config.items()
                                             if k not in ("remove_image",)})}
    labels.update({k[len("label."):]: v for k, v in config.items() if k.startswith("label.")})
    return labels


def _as_payload(inputs: Any) -> dict:
    if hasattr(inputs, "to_dict"):  # the CLI reads -I files into a DataFrame
        return {"inputs": json.loads(inputs.to_json(orient="records"))}
    if isinstance(inputs, dict) and {"inputs", "dataframe_records", "dataframe_split",
                                     "instances"} & set(inputs):
        return inputs
    return {"inputs": inputs if isinstance(inputs, list) else [inputs]}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_timeout(config_or_labels: dict) -> int:
    shutdown = config_or_labels.get("shutdown_timeout_s") or \
        settings.SETTINGS["SHUTDOWN_TIMEOUT_S"].default
    return int(float(shutdown)) + 10
