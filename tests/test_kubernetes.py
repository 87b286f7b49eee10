"""Kubernetes from the `preproc` target: manifests validated offline, the Deployment's container
run on the real Docker engine, and the backend's requests to an API server.

No cluster runs here. The manifests are checked against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail) and the KEDA and Prometheus Operator
custom resources against their CRDs' types as published on PyPI (cloudcoil-models-*,
generated from the projects' CRDs, Apache-2.0), with the same strictness. The backend talks to
FakeKubernetesApiServer, an HTTP server on loopback that records what the real `kubernetes`
client sends (the only fake here, because no API server exists on this machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import typing
import urllib.request
from urllib.parse import parse_qs, urlparse

import mlflow
import pytest

from conftest import (
    BIN,
    DATA,
    JsonHandler,
    consume,
    free_port,
    produce,
    serve_on_loopback,
    unique,
)

pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test,kubernetes]'")

K8S_VERSION = "1.37.0"


def features(alert):
    return {"objectId": alert["objectId"], "mag": alert["candidate"]["magpsf"]}


@pytest.fixture
def registered(tracking_uri):
    with mlflow.start_run():
        mlflow.preproc.log_model(features, name="p", registered_model_name="kube-prep",
                                 pip_requirements=[])
    return "models:/kube-prep/1"


def render(model_uri: str, **options: str) -> list[dict]:
    from mlflow_preproc.deploy.target import PreprocDeploymentClient

    return PreprocDeploymentClient("preproc").manifests("fink", model_uri, options)


KAFKA = {"input_topic": "fink-alert", "kafka_bootstrap_servers": "kafka.alerts:9092",
         "partitions": "6"}
CASES = {
    "serve": {"mode": "serve"},
    "kafka, autoscaled": {"mode": "kafka", **KAFKA},
    "kafka, fixed replicas": {"mode": "kafka", **KAFKA, "autoscaling": "false",
                              "replicas": "3"},
    "both, secrets, mounts, resources, monitor": {
        "mode": "both", **KAFKA, "max_replicas": "20", "min_replicas": "2",
        "secret_env.LIBRDKAFKA_SASL_PASSWORD": "kafka-user/password",
        "kafka_security_protocol": "SASL_SSL", "env.LIBRDKAFKA_SASL_MECHANISM": "PLAIN",
        "mount./etc/kafka/ca.pem": "secret:kafka-ca/ca.pem",
        "mount./etc/kafka/client": "configmap:kafka-client",
        "kafka_config_file": "/etc/kafka/client/client.properties",
        "cpu_request": "250m", "memory_request": "512Mi", "cpu_limit": "1",
        "memory_limit": "1Gi", "service_monitor": "true", "registry": "registry.example.org/fink",
        "prometheus_rule": "true", "grafana_dashboard": "true",
        "processing_guarantee": "exactly-once"},
    "bridge": {"mode": "bridge", "input_topic": "features", "output_topic": "predictions",
               "api_url": "http://classifier.alerts:8080",
               "kafka_bootstrap_servers": "kafka.alerts:9092"},
}


def strict_crd_check(model: type, obj: typing.Any, where: str = "") -> None:
    """Validate ``obj`` with a CRD's pydantic model, and fail on a field the CRD does not
    have (as ``kubectl apply --validate=strict`` does); pydantic alone ignores them."""
    from pydantic import BaseModel

    model.model_validate(obj)
    fields = {(f.alias or name): f.annotation for name, f in model.model_fields.items()}
    unknown = set(obj) - set(fields)
    assert not unknown, f"{where or model.__name__}: unknown fields {sorted(unknown)}"
    for key, value in obj.items():
        for inner in _models_in(fields[key]):
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    strict_crd_check(inner, item, f"{where}.{key}")
            assert issubclass(inner, BaseModel)


def _models_in(annotation) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def validate(obj: dict) -> None:
    import kubernetes_validate

    if obj["kind"] == "ScaledObject":
        from cloudcoil.models.keda.v1alpha1 import ScaledObject

        strict_crd_check(ScaledObject, obj)
    elif obj["kind"] == "ServiceMonitor":
        from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

        strict_crd_check(ServiceMonitor, obj)
    elif obj["kind"] == "PrometheusRule":
        from cloudcoil.models.prometheus_operator.v1 import PrometheusRule

        strict_crd_check(PrometheusRule, obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_every_manifest_validates_offline(registered, case):
    started = time.perf_counter()
    objects = render(registered, **CASES[case])
    rendered_s = time.perf_counter() - started
    kinds = [o["kind"] for o in objects]
    print(f"\n{case}: {len(objects)} objects {kinds} in {rendered_s:.2f} s")
    for obj in objects:
        validate(obj)
    expected = {"serve": ["Deployment", "Service", "PodDisruptionBudget"],
                "kafka, autoscaled": ["Deployment", "ScaledObject", "PodDisruptionBudget"],
                "kafka, fixed replicas": ["Deployment", "PodDisruptionBudget"],
                "both, secrets, mounts, resources, monitor": [
                    "Deployment", "Service", "ScaledObject", "PodDisruptionBudget",
                    "ServiceMonitor", "PrometheusRule", "ConfigMap"],
                "bridge": ["Deployment", "PodDisruptionBudget"]}[case]
    assert kinds == expected


def test_an_invalid_manifest_would_be_caught(registered):
    """The checks above can fail: a field the API does not know, a bad CRD field."""
    import copy

    import kubernetes_validate

    objects = {o["kind"]: o for o in render(registered, mode="kafka", **KAFKA)}
    broken = copy.deepcopy(objects["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["lagThreshold"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    scaled = copy.deepcopy(objects["ScaledObject"])
    scaled["spec"]["maxReplicas"] = 5  # KEDA's field is maxReplicaCount
    with pytest.raises(AssertionError, match="unknown fields"):
        validate(scaled)


def test_what_the_manifests_say(registered):
    objects = {o["kind"]: o for o in render(registered, **CASES[
        "both, secrets, mounts, resources, monitor"])}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example.org/fink/preprocessing-kube-prep-1:latest"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["MLFLOW_PREPROC_MODE"] == "both"
    assert env["CONSUMER_GROUP_ID"] == "mlflow-preproc-fink"
    assert env["OUTPUT_TOPIC"] == "kube-prep-1-preprocessed"
    assert env["PROCESSING_GUARANTEE"] == "exactly-once"  # a setting, passed on (#35)
    assert env["LIBRDKAFKA_SASL_PASSWORD"] == {
        "secretKeyRef": {"name": "kafka-user", "key": "password"}}  # by reference only
    assert pod["terminationGracePeriodSeconds"] > 30  # SHUTDOWN_TIMEOUT_S
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "512Mi"},
                                      "limits": {"cpu": "1", "memory": "1Gi"}}
    trigger = objects["ScaledObject"]["spec"]["triggers"][0]
    assert trigger == {"type": "kafka", "metadata": {
        "bootstrapServers": "kafka.alerts:9092", "consumerGroup": "mlflow-preproc-fink",
        "topic": "fink-alert", "lagThreshold": "100", "offsetResetPolicy": "earliest"}}
    # never more replicas than partitions (6), whatever max_replicas says (20)
    assert objects["ScaledObject"]["spec"]["maxReplicaCount"] == 6
    assert objects["ScaledObject"]["spec"]["minReplicaCount"] == 2
    labels = objects["Deployment"]["metadata"]["labels"]
    assert labels["org.mlflow-preproc.deployment"] == "fink"  # the Docker backend's label
    assert objects["Deployment"]["metadata"]["annotations"][
        "org.mlflow-preproc.model-uri"] == registered
    # The alerting rules watch this deployment's scrape job (the ServiceMonitor's Service),
    # and the dashboard is where Grafana's sidecar looks for dashboards.
    rules = objects["PrometheusRule"]["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"PreprocDeadLetterBrake", "PreprocNoProgress"}
    namespace = objects["Deployment"]["metadata"]["namespace"]
    assert all(f'job="fink", namespace="{namespace}"' in r["expr"] for r in rules)
    dashboard = objects["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["mlflow-preproc.json"])["uid"] == "mlflow-preproc"


def test_secret_values_are_in_the_container_only_never_in_labels_or_annotations(registered):
    objects = render(registered, **CASES["kafka, autoscaled"], **{
        "env.LIBRDKAFKA_SASL_PASSWORD": "hunter2", "label.team": "alerts"})
    for obj in objects:
        meta = json.dumps([obj["metadata"], obj["spec"].get("template", {}).get("metadata")])
        assert "hunter2" not in meta, obj["kind"]
    deployment = objects[0]
    stored = json.loads(deployment["metadata"]["annotations"]["org.mlflow-preproc.config"])
    assert stored["env.LIBRDKAFKA_SASL_PASSWORD"] == "<redacted>"
    env = {e["name"]: e.get("value") for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LIBRDKAFKA_SASL_PASSWORD"] == "hunter2"
    assert deployment["metadata"]["labels"]["team"] == "alerts"


@pytest.mark.kafka
def test_the_partition_count_is_read_from_the_broker_when_it_answers(registered, broker):
    topic = unique("alerts")
    broker.create_topics(topic, partitions=3)
    objects = {o["kind"]: o for o in render(
        registered, mode="kafka", input_topic=topic,
        kafka_bootstrap_servers=broker.bootstrap_servers, max_replicas="10")}
    assert objects["ScaledObject"]["spec"]["maxReplicaCount"] == 3


def test_manifests_render_offline_with_a_default_cap_and_say_which_was_used(registered,
                                                                            capfd):
    # GitOps and CI render where the cluster's broker does not answer (#19, finding 6).
    offline = {"mode": "kafka", "input_topic": "t", "kafka_bootstrap_servers": "127.0.0.1:1"}
    objects = {o["kind"]: o for o in render(registered, **offline)}
    assert objects["ScaledObject"]["spec"]["maxReplicaCount"] == 10
    err = capfd.readouterr().err
    assert "at most 10 replicas (the default: the partitions of t could not be read" in err
    capped = {o["kind"]: o for o in render(registered, **offline, max_replicas="4")}
    assert capped["ScaledObject"]["spec"]["maxReplicaCount"] == 4
    assert "at most 4 replicas (-C max_replicas)" in capfd.readouterr().err
    render(registered, **CASES["kafka, autoscaled"])
    assert "at most 6 replicas (the 6 partitions of fink-alert)" in capfd.readouterr().err


def test_kafka_manifests_carry_no_docker_keys_and_no_rest_port(registered):
    deployment = render(registered, **CASES["kafka, autoscaled"])[0]
    stored = json.loads(deployment["metadata"]["annotations"]["org.mlflow-preproc.config"])
    assert {"health_timeout", "remove_image"}.isdisjoint(stored)
    assert stored["network_mode"] == "host"  # the image build's, which an update repeats
    assert stored["input_topic"] == "fink-alert"
    env = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "PORT" not in env and "METRICS_PORT" in env
    assert "org.mlflow-preproc.port" not in deployment["metadata"]["labels"]
    served = render(registered, **CASES["serve"])[0]
    assert {"name": "PORT", "value": "8080"} in \
        served["spec"]["template"]["spec"]["containers"][0]["env"]


def test_bad_options_are_one_line(registered):
    from mlflow_preproc.deploy.target import DeploymentError

    for options, message in (
            ({"mode": "serve", "mount./etc/x": "/home/me/x"},
             "on Kubernetes a mount comes from a Secret or ConfigMap"),
            ({"mode": "serve", "secret_env.X": "no-key"}, "name a Secret and its key"),
            ({"mode": "run"}, "mode=run reads stdin"),
            ({"mode": "kafka", "input_format": "xml", "input_topic": "t", "partitions": "2"},
             "INPUT_FORMAT='xml' is not one of")):
        with pytest.raises(DeploymentError, match=message):
            render(registered, **options)


def test_the_manifests_command_prints_and_writes_them(registered, tmp_path):
    args = [str(BIN / "mlflow-preproc"), "manifests", "-m", registered, "--name", "fink",
            "-C", "mode=kafka", *[a for k, v in KAFKA.items() for a in ("-C", f"{k}={v}")]]
    printed = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    import yaml

    assert [o["kind"] for o in yaml.safe_load_all(printed.stdout)] == [
        "Deployment", "ScaledObject", "PodDisruptionBudget"]
    written = subprocess.run([*args, "-o", str(tmp_path / "out")], capture_output=True,
                             text=True, timeout=120)
    assert written.returncode == 0, written.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "deployment-fink.yaml", "poddisruptionbudget-fink.yaml", "scaledobject-fink.yaml"]


# ---- the Deployment's container, run as it is on the real Docker engine -----------------------

@pytest.mark.slow
@pytest.mark.docker
@pytest.mark.kafka
def test_the_deployment_container_runs_on_docker_as_written(registered, broker, docker_client):
    from mlflow_preproc.deploy.target import PreprocDeploymentClient

    topic, out = unique("ztf"), unique("features")
    broker.create_topics(topic)
    # A pod has its own network; on this host's network the ports must be free ones.
    rest, metrics = free_port(), free_port()
    objects = {o["kind"]: o for o in render(
        registered, mode="both", input_topic=topic, output_topic=out, input_format="avro",
        skip_cutouts="true", kafka_bootstrap_servers=broker.bootstrap_servers,
        port=str(rest), metrics_port=str(metrics), autoscaling="false",
        **{"secret_env.LOG_FORMAT": "logging/format"})}
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    repository = container["image"].split(":")[0]
    PreprocDeploymentClient("preproc").build_image(registered, {"image": repository})
    secrets = {("logging", "format"): "json"}  # what the cluster's Secret would hold

    def value(e):
        if "value" in e:
            return e["value"]
        ref = e["valueFrom"]["secretKeyRef"]
        return secrets[(ref["name"], ref["key"])]

    env = {e["name"]: value(e) for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    run = docker_client.containers.run(container["image"], detach=True, network_mode="host",
                                       environment=env)
    try:
        produce(broker.bootstrap_servers, topic, [p.read_bytes() for p in
                                                  sorted(DATA.glob("*.avro"))])
        outputs = consume(broker.bootstrap_servers, out, 2, timeout=120)
        assert sorted(json.loads(m.value())["objectId"] for m in outputs) == sorted(
            _alert(p)["objectId"] for p in sorted(DATA.glob("*.avro"))), \
            run.logs().decode()[-3000:]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            url = f"http://127.0.0.1:{ports[get['port']]}{get['path']}"
            # As the kubelet does: ask every period until it answers (REST starts later).
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=10) as answer:
                        assert answer.status == 200, (probe, url)
                        break
                except OSError:
                    assert time.monotonic() < deadline, (probe, url, run.logs()[-2000:])
                    time.sleep(1)
        assert "found in sys.modules" not in run.logs().decode()
    finally:
        run.remove(force=True)


def _alert(path):
    import fastavro

    with open(path, "rb") as f:
        return next(fastavro.reader(f))


# ---- the backend's requests ----------------------------------------------------------------

class FakeKubernetesApiServer:
    """Answers the requests the backend sends, as an API server would, and records them.

    Server-side apply stores the object (a Deployment reports its replicas ready); GET reads
    it back or answers 404; DELETE removes it. Only the paths the backend uses exist.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.objects: dict[str, dict] = {}
        outer = self

        class Handler(JsonHandler):
            def _record(self):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                outer.requests.append({"method": self.command, "path": url.path,
                                       "query": parse_qs(url.query),
                                       "content_type": self.headers.get("Content-Type"),
                                       "body": body})
                return url, body

            def do_PATCH(self):  # noqa: N802
                url, body = self._record()
                stored = json.loads(json.dumps(body))
                stored["metadata"]["resourceVersion"] = str(len(outer.requests))
                if body["kind"] == "Deployment":
                    replicas = body["spec"]["replicas"]
                    stored["status"] = {"replicas": replicas, "readyReplicas": replicas}
                outer.objects[url.path] = stored
                self.answer(200, stored)

            def do_GET(self):  # noqa: N802
                url, _ = self._record()
                if url.path in outer.objects:
                    return self.answer(200, outer.objects[url.path])
                if url.path.endswith("/deployments"):
                    items = [o for p, o in outer.objects.items() if p.startswith(url.path)]
                    return self.answer(200, {"kind": "DeploymentList", "items": items})
                self.answer(404, {"kind": "Status", "message": "not found", "code": 404})

            def do_DELETE(self):  # noqa: N802
                url, _ = self._record()
                if outer.objects.pop(url.path, None) is None:
                    return self.answer(404, {"kind": "Status", "message": "not found"})
                self.answer(200, {"kind": "Status", "status": "Success"})

        self.server = serve_on_loopback(Handler)

    def kubeconfig(self, path) -> str:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {
                "server": f"http://127.0.0.1:{self.server.server_port}"}}],
            "users": [{"name": "me", "user": {"token": "t0ken"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}]}))
        return str(path)

    def sent(self, method: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method]


@pytest.mark.slow
@pytest.mark.docker
def test_the_kubernetes_backend_applies_reads_and_deletes_these_objects(
        registered, docker_client, tmp_path):
    api = FakeKubernetesApiServer()
    # The engine is named once, at create: update builds on it too, not on the default one.
    engine = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    env = {**os.environ, "KUBECONFIG": api.kubeconfig(tmp_path / "kubeconfig"),
           "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    secret = {"env.LIBRDKAFKA_SASL_PASSWORD": "hunter2"}
    keys = ["-C", "backend=kubernetes", "-C", "namespace=alerts", "-C", "mode=kafka",
            "-C", f"docker_host={engine}",
            *[a for k, v in {**KAFKA, **secret}.items() for a in ("-C", f"{k}={v}")]]

    def cli(*args):
        return subprocess.run([str(BIN / "mlflow"), "deployments", *args], env=env,
                              capture_output=True, text=True, timeout=600)

    created = cli("create", "-t", "preproc", "--name", "fink", "-m", registered, *keys)
    assert created.returncode == 0, created.stderr[-3000:]
    expected = render(registered, mode="kafka", namespace="alerts", docker_host=engine,
                      **KAFKA, **secret)
    applied = api.sent("PATCH")
    assert [r["body"] for r in applied] == expected  # exactly the rendered objects
    assert [r["path"] for r in applied] == [
        "/apis/apps/v1/namespaces/alerts/deployments/fink",
        "/apis/keda.sh/v1alpha1/namespaces/alerts/scaledobjects/fink",
        "/apis/policy/v1/namespaces/alerts/poddisruptionbudgets/fink"]
    for r in applied:
        assert r["content_type"] == "application/apply-patch+yaml"
        assert r["query"] == {"fieldManager": ["mlflow-preproc"], "force": ["true"]}

    got = cli("get", "-t", "preproc:/kubernetes/alerts", "--name", "fink")
    assert got.returncode == 0, got.stderr[-2000:]
    shown = dict(line.split(": ", 1) for line in got.stdout.splitlines() if ": " in line)
    assert (shown["status"], shown["ready_replicas"], shown["revision"]) == ("running", "1",
                                                                              "1")
    assert "hunter2" not in got.stdout and "<redacted>" in got.stdout
    listed = cli("list", "-t", "preproc:/kubernetes/alerts")
    assert listed.returncode == 0 and "fink" in listed.stdout, listed.stderr[-2000:]

    with mlflow.start_run():
        mlflow.preproc.log_model(features, name="p", registered_model_name="kube-prep",
                                 pip_requirements=[])
    api.requests.clear()
    updated = cli("update", "-t", "preproc", "--name", "fink", "-m", "models:/kube-prep/2",
                  "-C", "backend=kubernetes", "-C", "namespace=alerts")
    assert updated.returncode == 0, updated.stderr[-3000:]
    deployment = api.sent("PATCH")[0]["body"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["org.mlflow-preproc.revision"] == "2"  # a new pod template: a rolling update
    assert deployment["metadata"]["annotations"]["org.mlflow-preproc.model-uri"] == \
        "models:/kube-prep/2"
    env_of = {e["name"]: e.get("value") for e in
              deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env_of["OUTPUT_TOPIC"] == "kube-prep-1-preprocessed"  # kept by the update
    assert env_of["INPUT_TOPIC"] == "fink-alert"  # the stored settings, not given again
    assert env_of["LIBRDKAFKA_SASL_PASSWORD"] == "hunter2"  # not stored: read back

    api.requests.clear()
    theirs = "/api/v1/namespaces/alerts/configmaps/fink"  # same name, not made by the target
    api.objects[theirs] = {"kind": "ConfigMap", "metadata": {"name": "fink", "labels": {}}}
    deleted = cli("delete", "-t", "preproc", "--name", "fink", "-C", "backend=kubernetes",
                  "-C", "namespace=alerts")
    assert deleted.returncode == 0, deleted.stderr[-2000:]
    assert {r["path"] for r in api.sent("DELETE")} >= {
        "/apis/apps/v1/namespaces/alerts/deployments/fink",
        "/apis/keda.sh/v1alpha1/namespaces/alerts/scaledobjects/fink",
        "/apis/policy/v1/namespaces/alerts/poddisruptionbudgets/fink"}
    assert list(api.objects) == [theirs]
    for image in ("preprocessing-kube-prep-1:latest", "preprocessing-kube-prep-2:latest"):
        docker_client.images.remove(image, force=True)
