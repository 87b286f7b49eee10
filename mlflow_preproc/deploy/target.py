"""MLflow deployment target ``preproc``: preprocessing models on Docker or Kubernetes.

    mlflow deployments create -t preproc --name fink -m models:/fink-preproc/1 -C mode=both \\
        -C input_topic=fink-alert -C kafka_bootstrap_servers=127.0.0.1:9092

builds the model's serving image and runs it: as containers on a Docker engine (the default),
or as a Deployment in a Kubernetes namespace (-C backend=kubernetes). Target URI: ``preproc``,
``preproc:/<docker host>`` such as ``preproc:/unix:///run/docker.sock``, or
``preproc:/kubernetes[/<namespace>]``. ``list`` and ``get`` read the engine or the cluster
itself, so nothing is kept in a local file that could drift from what runs.

Rollout rules: ``create`` and ``update`` check the whole resulting configuration (every setting
through the settings table, the model, the ports, the broker and topics in a Kafka mode) before
building or stopping anything. New containers must prove themselves in the mode they run: REST
answers and every consumer has joined its group (its ``/healthz``). A ``create`` that fails
removes what it started; an ``update`` that fails removes the new containers and starts the
previous revision again, with its image, settings and consumer group. A deployment's consumer
group and output topic are fixed at ``create`` (default ``mlflow-preproc-<name>`` and
``<model>-<version>-<suffix>``) and kept by ``update`` unless set again.
"""

from __future__ import annotations

import json
import signal
import sys
import urllib.error
import urllib.request
from typing import Any

from mlflow.deployments import BaseDeploymentClient, PredictionsResponse

from mlflow_preproc.deploy import model_image, planner, steps
from mlflow_preproc.deploy.payload import scoring_payload
from mlflow_preproc.deploy import options as opts
from mlflow_preproc.deploy.backend import Backend, listed
from mlflow_preproc.deploy.docker import DockerDeployments
from mlflow_preproc.deploy.engine import Engine
from mlflow_preproc.deploy.errors import DeploymentError
from mlflow_preproc.deploy.kubernetes import KubernetesDeployments

__all__ = ["DeploymentError", "PreprocDeploymentClient", "listed", "ready_line", "run_local",
           "target_help"]
FLAVOR = planner.FLAVOR
# -C backend=NAME -> its class; a new backend is a folder beside docker/ and one line here.
BACKENDS: dict[str, type[Backend]] = {"docker": DockerDeployments,
                                      "kubernetes": KubernetesDeployments}


def target_help() -> str:
    """``mlflow deployments help -t preproc``: plain text, the docstring without its markup."""
    return f"{__doc__.strip().replace('``', '')}\n\n{opts.help_text()}"


def run_local(name: str, model_uri: str, flavor: str | None = None,
              config: dict | None = None) -> None:
    """``mlflow deployments run-local -t preproc``: build, run in the foreground; Ctrl-C or
    SIGTERM stops it and removes its container."""
    client = PreprocDeploymentClient("preproc")
    config = dict(config or {})
    # The engine of -C docker_host, if given: the one the container runs on, to follow and
    # to clean up.
    docker = DockerDeployments(client._engine_for(planner.resolve_options(flavor, config, name)))
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C
    try:
        deployment = client.create_deployment(name, model_uri, flavor, config)
        steps.note(f"running {deployment['image']} as {deployment['containers'][0]['name']}; "
                   "Ctrl-C stops it")
        for chunk in docker.follow_logs(name):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if docker.containers.containers(name):
            client.delete_deployment(name, config)


class PreprocDeploymentClient(BaseDeploymentClient):
    """The ``preproc`` target: checks what it is given, hands it to one backend."""

    def __init__(self, target_uri: str):
        super().__init__(target_uri)
        _, _, rest = target_uri.partition(":/")
        # preproc:/kubernetes[/namespace] reads Kubernetes (get and list take no -C keys)
        self._kube_namespace = None
        if rest == "kubernetes" or rest.startswith("kubernetes/"):
            self._kube_namespace = rest.partition("/")[2] or "default"
            rest = ""
        self._engine = Engine(rest or None)

    # ---- the deployment API ----------------------------------------------------------------

    def create_deployment(self, name: str, model_uri: str, flavor: str | None = None,
                          config: dict | None = None, endpoint: str | None = None) -> dict:
        options = planner.resolve_options(flavor, self._given(config), name)
        created = self._backend(options).create(name, model_uri, options)
        if options["backend"] == "docker":
            steps.note(ready_line(created))
        return created

    def update_deployment(self, name: str, model_uri: str | None = None,
                          flavor: str | None = None, config: dict | None = None,
                          endpoint: str | None = None) -> dict:
        given = self._given(config)
        # What is given is checked before the backend is asked what runs now.
        options = planner.resolve_options(flavor, given, name)
        return self._backend(options).update(name, model_uri, given)

    def delete_deployment(self, name: str, config: dict | None = None,
                          endpoint: str | None = None) -> None:
        options = planner.resolve_options(None, self._given(config))  # before anything stops
        self._backend(options).delete(name, options)

    def list_deployments(self, endpoint: str | None = None) -> list[dict]:
        return self._backend(planner.resolve_options(None, self._given({}))).list()

    def get_deployment(self, name: str, endpoint: str | None = None) -> dict:
        return self._backend(planner.resolve_options(None, self._given({}))).get(name)

    def predict(self, deployment_name: str | None = None, inputs: Any = None,
                endpoint: str | None = None) -> PredictionsResponse:
        url = self.get_deployment(deployment_name)["endpoint"]
        if url is None:
            raise DeploymentError(f"deployment {deployment_name} runs no scoring server (mode "
                                  "kafka); update it with -C mode=both to call predict")
        body = json.dumps(scoring_payload(inputs)).encode()
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

    # ---- beyond MLflow's API: the build service and mlflow-preproc manifests --------------

    def build_image(self, model_uri: str, config: dict | None = None, name: str | None = None,
                    echo=None) -> tuple[str, Any]:
        """Build the serving image of a preprocessing model without starting it.

        Returns the image reference and the model's :class:`ModelIdentity`. ``config`` takes
        the same keys as ``create`` (``image``, ``tag``, ``base_image``, ``no_cache``...).
        ``echo`` receives the build's output lines (default: only a failure's tail, printed).
        """
        options = planner.resolve_options(None, config)
        deployment = planner.plan(name or "model", model_uri, options)
        model_image.build(self._engine_for(options).client, deployment, echo)
        return deployment.image, deployment.identity

    def manifests(self, name: str, model_uri: str, config: dict | None = None) -> list[dict]:
        """The Kubernetes objects ``create -C backend=kubernetes`` would apply."""
        given = self._given({**(config or {}), "backend": "kubernetes"})
        options = planner.resolve_options(None, given, name)
        return self._backend(options).manifests(name, model_uri, options)

    # ---- which backend -------------------------------------------------------------------

    def _given(self, config: dict | None) -> dict:
        """The ``-C`` keys, with what the target URI says (``preproc:/kubernetes/ns``)."""
        given = dict(config or {})
        if self._kube_namespace is not None:
            given["backend"] = "kubernetes"
            given.setdefault("namespace", self._kube_namespace)
        return given

    def _engine_for(self, options: dict[str, str]) -> Engine:
        if options.get("docker_host") and options["docker_host"] != self._engine.host:
            self._engine = Engine(options["docker_host"])
        return self._engine

    def _backend(self, options: dict[str, str]) -> Backend:
        return BACKENDS[options["backend"]].from_options(self._engine_for(options), options)


def ready_line(deployment: dict) -> str:
    """What a created deployment answers on: the line that ends `mlflow deployments create`
    (MLflow itself prints only the name)."""
    name = deployment["name"]
    if deployment.get("endpoint"):
        return (f"{name} is ready: POST {deployment['endpoint']}/invocations, or mlflow "
                f"deployments predict -t preproc --name {name} -I input.json")
    return (f"{name} is running: consumer group {deployment.get('consumer_group')}, output "
            f"topic {deployment.get('output_topic')}; mlflow deployments get -t preproc "
            f"--name {name} shows its health")
