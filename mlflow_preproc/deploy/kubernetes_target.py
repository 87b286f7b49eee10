"""The ``preproc`` target's operations on Kubernetes (``-C backend=kubernetes``).

The plan, the checks and the image build are the Docker backend's
(:class:`~mlflow_preproc.deploy.target.PreprocDeploymentClient`); what differs is the last
step: the objects :func:`~mlflow_preproc.deploy.manifests.render` makes are pushed to an API
server with :class:`~mlflow_preproc.deploy.kubernetes_backend.KubernetesBackend` instead of
containers started on an engine.
"""

from __future__ import annotations

import sys

from mlflow_preproc import config as settings
from mlflow_preproc.deploy import options as opts
from mlflow_preproc.deploy.spec import Deployment, check_settings
from mlflow_preproc.deploy.target import (
    DeploymentError,
    PreprocDeploymentClient,
    _quiet_logger,
    _step,
    listed,
)


class KubernetesDeployments:
    """Create, update, delete, read and render deployments in a namespace."""

    def __init__(self, target: PreprocDeploymentClient, namespace: str | None):
        self.target = target
        self.namespace = namespace  # the target URI's (preproc:/kubernetes/<namespace>)

    def manifests(self, name: str, model_uri: str, given: dict) -> list[dict]:
        """The objects ``create`` would apply."""
        return self._objects(self.target._plan(name, model_uri,
                                               self._options(None, given, name)))

    def create(self, name: str, model_uri: str, flavor: str | None, given: dict) -> dict:
        options = self._options(flavor, given, name)
        d = self.target._plan(name, model_uri, options)
        objects = self._objects(d)  # every check of the options before the cluster is asked
        kube = self._backend(options)
        if _call(kube.get, name) is not None:
            raise DeploymentError(f"a deployment named {name} already exists in namespace "
                                  f"{options['namespace']}; use mlflow deployments update")
        return self._apply(kube, d, objects)

    def update(self, name: str, model_uri: str | None, flavor: str | None, given: dict) -> dict:
        from mlflow_preproc.deploy.kubernetes_backend import summary

        kube = self._backend(self._options(flavor, given, name))
        current = _call(kube.get, name)
        if current is None:
            raise self.target._not_found(name)
        before = summary(current)  # what it runs now, kept unless given again
        # Secret values are not in the stored options: the Deployment's container has them.
        env = {e["name"]: e["value"] for e in
               current["spec"]["template"]["spec"]["containers"][0].get("env", [])
               if "value" in e}
        stored = opts.restore_secrets(before["config"], env)
        options = self._options(flavor, {**stored, **given})
        d = self.target._plan(name, model_uri or before["model_uri"], options,
                              before["revision"] + 1)
        return self._apply(kube, d, self._objects(d))

    def delete(self, name: str, given: dict) -> None:
        if not _call(self._backend(self._options(None, given)).delete, name):
            raise self.target._not_found(name)

    def get(self, name: str) -> dict:
        from mlflow_preproc.deploy.kubernetes_backend import summary

        found = _call(self._backend(self._options(None, {})).get, name)
        if found is None:
            raise self.target._not_found(name)
        return summary(found)

    def list(self) -> list[dict]:
        from mlflow_preproc.deploy.kubernetes_backend import summary

        return [listed(summary(o)) for o in _call(self._backend(self._options(None, {})).list)]

    def _apply(self, kube, d: Deployment, objects: list[dict]) -> dict:
        """Build, push and apply ``objects``, ``d``'s (checked: :meth:`_objects`)."""
        from mlflow_preproc.deploy.kubernetes_backend import summary

        self.target._build(d)
        if d.options.get("registry") and settings.parse_bool(d.options["push"], "push"):
            self._push(d.image)
        _step(3, f"applying {len(objects)} objects to namespace {d.options['namespace']}")
        _call(kube.apply, objects)
        return summary(_call(kube.get, d.name))

    def _objects(self, d: Deployment) -> list[dict]:
        from mlflow_preproc.deploy.manifests import kubernetes_spec, max_replicas, render

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
                partitions = _partitions_if_reachable(consumer)
            most, source = max_replicas(d, partitions)
            print(f"      autoscaling: at most {most} replicas ({source})", file=sys.stderr)
        return render(d, partitions)

    def _options(self, flavor: str | None, given: dict,
                 name: str | None = None) -> dict[str, str]:
        given = {**given, "backend": "kubernetes"}
        if self.namespace is not None:
            given.setdefault("namespace", self.namespace)
        return self.target._options(flavor, given, name)

    @staticmethod
    def _backend(options: dict):
        from mlflow_preproc.deploy.kubernetes_backend import KubernetesBackend, api_client

        return KubernetesBackend(_call(api_client, options.get("kube_context")),
                                 options["namespace"])

    def _push(self, image: str) -> None:
        repository, _, tag = image.rpartition(":")
        _step(2, f"pushing {image}")
        for chunk in self.target._docker.images.push(repository, tag=tag, stream=True,
                                                     decode=True):
            if "error" in chunk:
                raise DeploymentError(f"cannot push {image}: {chunk['error']}; check -C "
                                      "registry=... and docker login")


def _call(call, *args):
    """A Kubernetes backend call, its errors as one ``Error:`` line."""
    from mlflow_preproc.deploy.kubernetes_backend import KubernetesError

    try:
        return call(*args)
    except KubernetesError as exc:
        raise DeploymentError(str(exc)) from None


def _partitions_if_reachable(cfg: settings.Config) -> int | None:
    """The input topic's partition count, if this machine reaches the broker (a cluster's
    broker often answers only inside the cluster: then -C partitions= must say it)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        admin = AdminClient({**cfg.kafka, "logger": _quiet_logger()})
        topic = admin.list_topics(topic=cfg["INPUT_TOPIC"], timeout=5).topics.get(
            cfg["INPUT_TOPIC"])
    except KafkaException:
        topic = None
    if topic is None or topic.error is not None:
        return None
    return len(topic.partitions)
