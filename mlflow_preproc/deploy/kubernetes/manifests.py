"""Kubernetes manifests for a deployment, from the same plan and container spec Docker runs.

:func:`render` turns a :class:`~mlflow_preproc.deploy.spec.Deployment` into plain dicts (one
per object, YAML-ready):

- a ``Deployment`` whose container is :func:`~mlflow_preproc.deploy.spec.container_spec`'s
  (image, environment, ports), secrets by reference, probes on REST's ``/health`` and the
  stream's ``/healthz``, a grace period longer than ``SHUTDOWN_TIMEOUT_S``;
- a ``Service`` when REST is served (and for ``/metrics`` when a ServiceMonitor is asked);
- in ``kafka``/``both`` mode a KEDA ``ScaledObject`` scaling on the consumer group's lag on
  the input topic, never past its partition count;
- a ``PodDisruptionBudget``, and only when asked: a Prometheus Operator ``ServiceMonitor``,
  a ``PrometheusRule`` with this deployment's alerting rules, a ``ConfigMap`` with the Grafana
  dashboard.

Pure: no Kubernetes client is needed to render.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from mlflow_preproc import config as settings
from mlflow_preproc.deploy import options as opts
from mlflow_preproc.deploy.image_build import LABEL
from mlflow_preproc.deploy.spec import DEPLOYMENT_LABEL, ContainerSpec, Deployment, container_spec

DEFAULT_METRICS_PORT = 9100
# maxReplicaCount when neither -C max_replicas nor the partition count is known (manifests
# rendered offline, as GitOps and CI do): a cost cap. KEDA's Kafka scaler never scales past
# the topic's partitions anyway (unless allowIdleConsumers is set, which we never set).
DEFAULT_MAX_REPLICAS = 10
CONTAINER = "preprocessing"
# Label values: at most 63 characters of [A-Za-z0-9_.-]; the rest goes to annotations.
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")


def kubernetes_spec(d: Deployment) -> ContainerSpec:
    """The container of every pod of ``d``: a pod has its own network, so the ports are fixed
    (``port``, ``metrics_port`` or 9100) instead of picked per replica as on one Docker host."""
    metrics = int(d.options.get("metrics_port") or DEFAULT_METRICS_PORT)
    spec = container_spec(d, 0, int(d.options["port"]), metrics if d.consuming else None)
    env, labels = dict(spec.env), dict(spec.labels)
    if not d.serving:  # no scoring server in the pod: no PORT for it
        env.pop("PORT", None)
        labels.pop(f"{LABEL}.port", None)
    return replace(spec, env=env, labels=labels)


def max_replicas(d: Deployment, partitions: int | None) -> tuple[int, str]:
    """The autoscaler's ``maxReplicaCount`` and where it came from, for the user to read."""
    given = int(d.options["max_replicas"]) if d.options.get("max_replicas") else None
    topic = d.options["input_topic"]
    if partitions and (given is None or given > partitions):
        # A replica past the partition count would idle.
        return partitions, f"the {partitions} partitions of {topic}"
    if given is not None:
        return given, "-C max_replicas"
    return DEFAULT_MAX_REPLICAS, (
        f"the default: the partitions of {topic} could not be read from here; KEDA never "
        "scales past them, and -C max_replicas=N sets another cap")


def render(d: Deployment, partitions: int | None = None) -> list[dict[str, Any]]:
    """The objects of ``d``; ``partitions`` (the input topic's) caps the autoscaler."""
    spec = kubernetes_spec(d)
    labels, annotations = _split_labels(spec.labels)
    selector = {DEPLOYMENT_LABEL: d.name}
    objects = [_deployment(d, spec, labels, annotations, selector)]
    monitor = settings.parse_bool(d.options["service_monitor"], "service_monitor") and d.consuming
    if d.serving or monitor:
        objects.append(_service(d, spec, labels, selector, monitor))
    if d.mode in ("kafka", "both") and settings.parse_bool(d.options["autoscaling"],
                                                           "autoscaling"):
        objects.append(_scaled_object(d, labels, partitions))
    objects.append(_disruption_budget(d, labels, selector))
    if monitor:
        objects.append(_service_monitor(d, labels, selector))
    if d.consuming and settings.parse_bool(d.options["prometheus_rule"], "prometheus_rule"):
        objects.append(_prometheus_rule(d, labels))
    if d.consuming and settings.parse_bool(d.options["grafana_dashboard"], "grafana_dashboard"):
        objects.append(_dashboard_config_map(d, labels))
    return objects


def _meta(d: Deployment, labels: dict, annotations: dict | None = None) -> dict:
    meta: dict[str, Any] = {"name": d.name, "namespace": d.options["namespace"],
                            "labels": labels}
    if annotations:
        meta["annotations"] = annotations
    return meta


def _deployment(d, spec: ContainerSpec, labels, annotations, selector) -> dict:
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "env": [{"name": k, "value": v} for k, v in spec.env.items()] + [
            {"name": name, "valueFrom": {"secretKeyRef": dict(zip(("name", "key"),
                                                                   ref.split("/")))}}
            for name, ref in opts.secret_env(d.options).items()],
        "ports": _ports(spec),
        **_probes(spec),
    }
    if spec.resources:
        container["resources"] = spec.resources
    volumes, mounts = _volumes(spec)
    if mounts:
        container["volumeMounts"] = mounts
    shutdown = float(d.options.get("shutdown_timeout_s") or
                     settings.SETTINGS["SHUTDOWN_TIMEOUT_S"].default)
    pod: dict[str, Any] = {
        # Longer than the stream's own shutdown, so consumers commit before they are killed.
        "terminationGracePeriodSeconds": int(shutdown) + 15,
        "containers": [container],
    }
    if volumes:
        pod["volumes"] = volumes
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(d, labels, annotations),
        "spec": {
            "replicas": int(d.options["min_replicas"]) if _autoscaled(d) else d.replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def _ports(spec: ContainerSpec) -> list[dict]:
    ports = []
    if spec.rest_port is not None:
        ports.append({"name": "http", "containerPort": spec.rest_port})
    for j, port in enumerate(spec.metrics_ports):
        ports.append({"name": "metrics" if j == 0 else f"metrics-{j}", "containerPort": port})
    return ports


def _probes(spec: ContainerSpec) -> dict:
    """REST is ready when ``/health`` answers; a consumer is alive while ``/healthz`` says it
    makes progress. A startup probe gives the model time to load before liveness counts."""
    rest = {"httpGet": {"path": "/health", "port": "http"}} if spec.rest_port else None
    stream = {"httpGet": {"path": "/healthz", "port": "metrics"}} if spec.metrics_ports else None
    ready, alive = rest or stream, stream or rest
    return {
        "startupProbe": {**alive, "periodSeconds": 5, "failureThreshold": 60},
        "readinessProbe": {**ready, "periodSeconds": 10},
        "livenessProbe": {**alive, "periodSeconds": 20, "failureThreshold": 3},
    }


def _volumes(spec: ContainerSpec) -> tuple[list[dict], list[dict]]:
    volumes, mounts = [], []
    for i, (target, source) in enumerate(sorted(spec.mounts.items())):
        kind, _, ref = source.partition(":")
        name, _, key = ref.partition("/")
        volume = f"mount-{i}"
        if kind == "secret":
            content: dict[str, Any] = {"secret": {"secretName": name}}
        else:
            content = {"configMap": {"name": name}}
        if key:  # one key of it, as the file at `target`
            next(iter(content.values()))["items"] = [{"key": key, "path": key}]
        volumes.append({"name": volume, **content})
        mounts.append({"name": volume, "mountPath": target, "readOnly": True,
                       **({"subPath": key} if key else {})})
    return volumes, mounts


def _service(d, spec: ContainerSpec, labels, selector, monitor: bool) -> dict:
    ports = []
    if spec.rest_port is not None:
        ports.append({"name": "http", "port": spec.rest_port, "targetPort": "http"})
    if monitor:
        ports.append({"name": "metrics", "port": spec.metrics_ports[0],
                      "targetPort": "metrics"})
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(d, labels),
            "spec": {"selector": selector, "ports": ports}}


def _autoscaled(d: Deployment) -> bool:
    return d.mode in ("kafka", "both") and settings.parse_bool(d.options["autoscaling"],
                                                               "autoscaling")


def _scaled_object(d: Deployment, labels, partitions: int | None) -> dict:
    most, _ = max_replicas(d, partitions)
    trigger = {
        "bootstrapServers": d.options.get("kafka_bootstrap_servers") or
        settings.SETTINGS["KAFKA_BOOTSTRAP_SERVERS"].default,
        "consumerGroup": d.options["consumer_group_id"],
        "topic": d.options["input_topic"],
        "lagThreshold": d.options["lag_threshold"],
        "offsetResetPolicy": d.options.get("auto_offset_reset") or "earliest",
    }
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": _meta(d, labels),
        "spec": {"scaleTargetRef": {"name": d.name},
                 "minReplicaCount": int(d.options["min_replicas"]),
                 "maxReplicaCount": max(most, int(d.options["min_replicas"]), 1),
                 "triggers": [{"type": "kafka", "metadata": trigger}]},
    }


def _disruption_budget(d: Deployment, labels, selector) -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(d, labels),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}}}


def _service_monitor(d: Deployment, labels, selector) -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": _meta(d, labels),
            "spec": {"selector": {"matchLabels": selector},
                     "endpoints": [{"port": "metrics", "path": "/metrics"}]}}


def _prometheus_rule(d: Deployment, labels) -> dict:
    # The Prometheus Operator names the scrape job after the Service (the ServiceMonitor's),
    # which is the deployment's name: the rules watch this deployment only.
    from mlflow_preproc.monitoring.alert_rules import rule_group

    group = rule_group(job=d.name, namespace=d.options["namespace"])
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": _meta(d, labels), "spec": {"groups": [group]}}


def _dashboard_config_map(d: Deployment, labels) -> dict:
    # grafana_dashboard=1 is what Grafana's dashboard sidecar (its Helm chart) looks for.
    from mlflow_preproc.monitoring.dashboard import dashboard_json

    try:
        dashboard = dashboard_json()
    except ModuleNotFoundError as exc:
        raise settings.ConfigError("grafana_dashboard=true builds the dashboard with "
                                   "grafana-foundation-sdk: pip install '.[monitoring]' "
                                   f"in the mlflow-preproc clone ({exc.name} is missing)") \
            from None
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(d, {**labels, "grafana_dashboard": "1"}),
            "data": {"mlflow-preproc.json": dashboard}}


def _split_labels(docker_labels: dict[str, str]) -> tuple[dict, dict]:
    """The Docker labels as Kubernetes labels where their values may be labels, else as
    annotations (model URIs, the stored configuration)."""
    labels, annotations = {"app.kubernetes.io/name": "mlflow-preproc",
                           "app.kubernetes.io/managed-by": "mlflow-preproc"}, {}
    for key, value in docker_labels.items():
        (labels if _LABEL_VALUE.match(value) else annotations)[key] = value
    return labels, annotations


def to_yaml(objects: list[dict]) -> str:
    """The objects as one multi-document YAML stream (no anchors: kubectl users read it)."""
    import yaml

    class Plain(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    return "---\n".join(yaml.dump(o, Dumper=Plain, sort_keys=False) for o in objects)
