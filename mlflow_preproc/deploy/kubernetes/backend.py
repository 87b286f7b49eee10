"""The Kubernetes backend: a deployment is objects in a namespace (``-C backend=kubernetes``,
or a ``preproc:/kubernetes[/namespace]`` target URI).

Planned and checked by :mod:`~mlflow_preproc.deploy.planner` as on Docker and built by
:mod:`~mlflow_preproc.deploy.model_image` on the Docker engine; what differs is the last step:
the objects :func:`~mlflow_preproc.deploy.kubernetes.manifests.render` makes are pushed to an
API server with :class:`~mlflow_preproc.deploy.kubernetes.api.KubernetesApi`, and Kubernetes
rolls the pods (and back, when they fail their probes).
"""

from __future__ import annotations

from typing import ClassVar

from mlflow_preproc import config as settings
from mlflow_preproc.deploy import broker_checks, model_image, planner, steps
from mlflow_preproc.deploy import options as opts
from mlflow_preproc.deploy.backend import listed
from mlflow_preproc.deploy.engine import Engine
from mlflow_preproc.deploy.errors import DeploymentError, not_found
from mlflow_preproc.deploy.spec import Deployment, check_settings


class KubernetesDeployments:
    """Create, update, delete, read and render deployments in one namespace."""

    name: ClassVar[str] = "kubernetes"

    def __init__(self, engine: Engine, namespace: str, kube_context: str | None = None):
        self.engine = engine  # builds (and pushes) the image
        self.namespace = namespace
        self.kube_context = kube_context

    @classmethod
    def from_options(cls, engine: Engine, options: dict[str, str]) -> KubernetesDeployments:
        return cls(engine, options["namespace"], options.get("kube_context"))

    def manifests(self, name: str, model_uri: str, options: dict[str, str]) -> list[dict]:
        """The objects ``create`` would apply; needs no cluster (nor a broker)."""
        return _objects(planner.plan(name, model_uri, options))

    def create(self, name: str, model_uri: str, options: dict[str, str]) -> dict:
        d = planner.plan(name, model_uri, options)
        objects = _objects(d)  # every check of the options before the cluster is asked
        api = self._api()
        if _call(api.get, name) is not None:
            raise DeploymentError(f"a deployment named {name} already exists in namespace "
                                  f"{self.namespace}; use mlflow deployments update")
        return self._apply(api, d, objects)

    def update(self, name: str, model_uri: str | None, given: dict[str, str]) -> dict:
        from mlflow_preproc.deploy.kubernetes.api import summary

        api = self._api()
        current = _call(api.get, name)
        if current is None:
            raise not_found(name)
        before = summary(current)  # what it runs now, kept unless given again
        # Secret values are not in the stored options: the Deployment's container has them.
        env = {e["name"]: e["value"] for e in
               current["spec"]["template"]["spec"]["containers"][0].get("env", [])
               if "value" in e}
        stored = opts.restore_secrets(before["config"], env)
        options = planner.resolve_options(None, {**stored, **given})
        if options.get("docker_host", self.engine.host) != self.engine.host:
            self.engine = Engine(options["docker_host"])  # the engine it was created with
        d = planner.plan(name, model_uri or before["model_uri"], options,
                         before["revision"] + 1)
        return self._apply(api, d, _objects(d))

    def delete(self, name: str, options: dict[str, str]) -> None:
        if not _call(self._api().delete, name):
            raise not_found(name)  # nothing of that name made by this target

    def get(self, name: str) -> dict:
        from mlflow_preproc.deploy.kubernetes.api import summary

        found = _call(self._api().get, name)
        if found is None:
            raise not_found(name)
        return summary(found)

    def list(self) -> list[dict]:
        from mlflow_preproc.deploy.kubernetes.api import summary

        return [listed(summary(o)) for o in _call(self._api().list)]

    def _apply(self, api, d: Deployment, objects: list[dict]) -> dict:
        """Build, push and apply ``objects``, ``d``'s (checked: :func:`_objects`)."""
        from mlflow_preproc.deploy.kubernetes.api import summary

        model_image.build(self.engine.client, d)
        if d.options.get("registry") and settings.parse_bool(d.options["push"], "push"):
            self._push(d.image)
        steps.step(3, f"applying {len(objects)} objects to namespace {self.namespace}")
        _call(api.apply, objects)
        return summary(_call(api.get, d.name))

    def _api(self):
        from mlflow_preproc.deploy.kubernetes.api import KubernetesApi, api_client

        return KubernetesApi(_call(api_client, self.kube_context), self.namespace)

    def _push(self, image: str) -> None:
        repository, _, tag = image.rpartition(":")
        steps.step(2, f"pushing {image}")
        for chunk in self.engine.client.images.push(repository, tag=tag, stream=True,
                                                    decode=True):
            if "error" in chunk:
                raise DeploymentError(f"cannot push {image}: {chunk['error']}; check -C "
                                      "registry=... and docker login")


def _objects(d: Deployment) -> list[dict]:
    """The objects of ``d``, after checking what the pods will read."""
    from mlflow_preproc.deploy.kubernetes.manifests import kubernetes_spec, max_replicas, render

    if d.mode == "run":
        raise DeploymentError("mode=run reads stdin, which a Kubernetes Deployment has "
                              "none of; use serve, kafka, both or bridge")
    try:
        consumer = check_settings(kubernetes_spec(d))
    except settings.ConfigError as exc:
        raise DeploymentError(str(exc)) from None
    partitions = int(d.options["partitions"]) if d.options.get("partitions") else None
    autoscaled = d.mode in ("kafka", "both") and settings.parse_bool(
        d.options["autoscaling"], "autoscaling")
    if autoscaled:
        if partitions is None:
            partitions = broker_checks.partitions_if_reachable(consumer)
        most, source = max_replicas(d, partitions)
        steps.note(f"      autoscaling: at most {most} replicas ({source})")
    try:
        return render(d, partitions)
    except settings.ConfigError as exc:
        raise DeploymentError(str(exc)) from None


def _call(call, *args):
    """A Kubernetes API call, its errors as one ``Error:`` line."""
    from mlflow_preproc.deploy.kubernetes.api import KubernetesError

    try:
        return call(*args)
    except KubernetesError as exc:
        raise DeploymentError(str(exc)) from None
