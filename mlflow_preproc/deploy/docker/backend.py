"""The Docker backend: a deployment is containers on one engine.

Containers are labelled ``org.mlflow-preproc.deployment=<name>``: ``list``/``get`` read Docker
itself, so nothing is kept in a local file that could drift from what runs. ``create`` and
``update`` check the whole resulting configuration (every container's settings, the ports, the
broker and its topics in a Kafka mode) before building or stopping anything; then
:mod:`~mlflow_preproc.deploy.docker.rollout` starts, proves and swaps revisions.
"""

from __future__ import annotations

from typing import ClassVar

from mlflow_preproc import config as settings
from mlflow_preproc.deploy import broker_checks, model_image, planner, steps
from mlflow_preproc.deploy import options as opts
from mlflow_preproc.deploy.backend import listed
from mlflow_preproc.deploy.docker import rollout
from mlflow_preproc.deploy.docker.containers import (
    Containers,
    NotHealthy,
    busy,
    free_ports,
    options_of,
    port_free,
    revision_of,
    spec_of,
)
from mlflow_preproc.deploy.engine import Engine
from mlflow_preproc.deploy.errors import DeploymentError, not_found
from mlflow_preproc.deploy.image_build import LABEL
from mlflow_preproc.deploy.resources import nano_cpus
from mlflow_preproc.deploy.spec import (
    ContainerSpec,
    Deployment,
    check_settings,
    container_spec,
    default_output_topic,
)


class DockerDeployments:
    """Deployments as containers on ``engine``."""

    name: ClassVar[str] = "docker"

    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def from_options(cls, engine: Engine, options: dict[str, str]) -> DockerDeployments:
        return cls(engine)

    @property
    def containers(self) -> Containers:
        return Containers(self.engine.client)

    def create(self, name: str, model_uri: str, options: dict[str, str]) -> dict:
        d = planner.plan(name, model_uri, options)
        # What the options and the model decide is checked before the engine is asked anything:
        # a bad setting is reported as itself, also when no engine runs.
        specs, consumer_settings = _checked_specs(d)
        if self.containers.containers(name):
            raise DeploymentError(f"a deployment named {name} already exists; use mlflow "
                                  f"deployments update --name {name}, or delete it first")
        _check_host(d, specs, consumer_settings)
        self._check_cpus(d)
        model_image.build(self.engine.client, d)
        steps.step(2, f"starting {steps.count(d.replicas, 'container')} ({d.mode})")
        try:
            rollout.start(self.containers, specs, d)
        except NotHealthy as exc:
            raise DeploymentError(f"{name} did not start, so nothing is left running: "
                                  f"{exc}") from None
        return self.get(name)

    def update(self, name: str, model_uri: str | None, given: dict[str, str]) -> dict:
        old = self.containers.current(name)
        if not old:
            raise not_found(name)
        revisions = sorted({revision_of(c) for c in self.containers.containers(name)})
        if len(revisions) > 1:  # an update sets the running revision aside while it starts
            raise busy(name, f"revisions {' and '.join(map(str, revisions))} both exist "
                       "(docker rm -f the containers of the one you do not want, if no "
                       "update runs)")
        # Secret values are not in the stored options: the running container has them.
        previous = opts.restore_secrets(options_of(old[0]), spec_of(old[0]).env)
        previous, ignored = opts.applied_by(previous, self.name)
        if ignored:  # accepted (and never applied) before Docker refused them: not kept
            steps.note(f"dropping {', '.join(ignored)}: Kubernetes only, never applied to "
                       "these containers")
        options = planner.resolve_options(None, {**previous, **given})
        model_uri = model_uri or old[0].labels[f"{LABEL}.model-uri"]
        d = planner.plan(name, model_uri, options, revision_of(old[0]) + 1)
        specs, consumer_settings = _checked_specs(d)
        _check_host(d, specs, consumer_settings, replacing=old)
        self._check_cpus(d)
        _note_kept_topic(d, previous, given)
        model_image.build(self.engine.client, d)
        if d.serving:
            # Host networking: the new container cannot bind the old one's port while it
            # runs. Prove the new image serves on a spare port before touching the old one.
            rollout.trial_serve(self.containers, d)
        rollout.swap(self.containers, old, d, specs)
        return self.get(name)

    def _check_cpus(self, d: Deployment) -> None:
        """A CPU limit the engine has the CPUs for (Docker refuses more at start, after the
        build)."""
        if not d.options.get("cpu_limit"):
            return
        available = self.engine.client.info().get("NCPU")
        if available and nano_cpus(d.options["cpu_limit"]) > available * 10**9:
            raise DeploymentError(f"cpu_limit={d.options['cpu_limit']} is more than the "
                                  f"{available} CPUs of the Docker engine; pass -C "
                                  f"cpu_limit={available} or less")

    def delete(self, name: str, options: dict[str, str]) -> None:
        containers = self.containers.containers(name)  # every revision
        if not containers:
            raise not_found(name)
        image = self.containers.current(name)[0].labels.get(f"{LABEL}.image")
        self.containers.stop(containers, rollout.stop_timeout(options_of(containers[0])))
        self.containers.remove(containers)
        if settings.parse_bool(options["remove_image"], "remove_image"):
            self.engine.client.images.remove(image)

    def get(self, name: str) -> dict:
        containers = self.containers.current(name)
        if not containers:
            raise not_found(name)
        labels = containers[0].labels
        options = options_of(containers[0])
        statuses = [c.status for c in containers]
        mode = labels.get(f"{LABEL}.mode", "serve")
        port = labels.get(f"{LABEL}.port")
        return {
            "name": name,
            "flavor": planner.FLAVOR,
            "backend": self.name,
            "status": "running" if set(statuses) == {"running"} else "/".join(sorted(statuses)),
            "mode": mode,
            "revision": revision_of(containers[0]),
            "model_uri": labels.get(f"{LABEL}.model-uri"),
            "image": labels.get(f"{LABEL}.image"),
            "endpoint": f"http://127.0.0.1:{port}" if mode in opts.SERVING_MODES else None,
            "consumer_group": options.get("consumer_group_id"),
            "output_topic": options.get("output_topic"),
            "containers": [{"name": c.name, "id": c.short_id, "status": c.status}
                           for c in containers],
            "config": opts.shown(options, self.name),
        }

    def list(self) -> list[dict]:
        names = sorted({c.labels[f"{LABEL}.deployment"] for c in self.containers.containers()})
        return [listed(self.get(n)) for n in names]

    def follow_logs(self, name: str):
        """The output of ``name``'s first container, as it comes (``run-local``)."""
        container = self.engine.client.containers.get(self.containers.current(name)[0].name)
        return container.logs(stream=True, follow=True)


def _specs(d: Deployment) -> list[ContainerSpec]:
    base_port = int(d.options["port"])
    given_metrics = d.options.get("metrics_port")
    specs = []
    for i in range(d.replicas):
        metrics = None
        if d.consuming:
            metrics = (int(given_metrics) + i * d.consumers if given_metrics
                       else free_ports(d.consumers))
        specs.append(container_spec(d, i, base_port + i, metrics))
    return specs


def _checked_specs(d: Deployment) -> tuple[list[ContainerSpec], settings.Config | None]:
    """The containers of ``d``, their environment read by the settings table as they will
    read it; and the consumer's settings in a consuming mode. Contacts nothing."""
    specs = _specs(d)
    try:
        return specs, [check_settings(spec) for spec in specs][0]
    except settings.ConfigError as exc:
        raise DeploymentError(str(exc)) from None


def _check_host(d: Deployment, specs: list[ContainerSpec],
                consumer_settings: settings.Config | None, replacing: list = ()) -> None:
    """What this host and the broker must allow, before building: free ports, the broker
    answering, the topics."""
    held = {int(c.labels.get(f"{LABEL}.port", 0)) for c in replacing}
    if d.serving and d.options["network_mode"] == "host":
        for spec in specs:
            if spec.rest_port not in held and not port_free(spec.rest_port):
                raise DeploymentError(f"port {spec.rest_port} is already in use on this "
                                      "host; pass -C port=<a free port>")
    if consumer_settings is not None:
        broker_checks.check_topics(consumer_settings)


def _note_kept_topic(d: Deployment, previous: dict, given: dict) -> None:
    if d.mode not in ("kafka", "both") or "output_topic" in given:
        return
    new_default = default_output_topic(d.identity, d.options)
    kept = d.options.get("output_topic")
    if previous.get("output_topic") and new_default and new_default != kept:
        steps.note(f"keeping the output topic {kept} (the default for this version would be "
                   f"{new_default}; -C output_topic=... changes it)")
