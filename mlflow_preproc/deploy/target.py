"""MLflow deployment target ``preproc``: preprocessing models as Docker containers.

    mlflow deployments create -t preproc --name fink -m models:/fink-preproc/1 -C mode=both \\
        -C input_topic=fink-alert -C kafka_bootstrap_servers=127.0.0.1:9092

builds the model's serving image with the Docker SDK and starts its container(s). Deployments
are Docker containers labelled ``org.mlflow-preproc.deployment=<name>``: ``list``/``get`` read
Docker itself, so nothing is kept in a local file that could drift from what runs.
Target URI: ``preproc``, or ``preproc:/<docker host>`` such as ``preproc:/unix:///run/docker.sock``.

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

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

import click
from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from mlflow_preproc import config as settings
from mlflow_preproc.deploy import options as opts
from mlflow_preproc.deploy.docker_backend import (
    DockerBackend,
    NotHealthy,
    free_ports,
    options_of,
    port_free,
    revision_of,
    spec_of,
)
from mlflow_preproc.deploy.image_build import (
    LABEL,
    BuildError,
    base_image,
    build_image,
    docker_reference,
    model_python_version,
    prepare_context,
)
from mlflow_preproc.deploy.spec import (
    ContainerSpec,
    Deployment,
    check_settings,
    container_spec,
    default_output_topic,
    with_stream_defaults,
)

FLAVOR = "preprocessing"


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
    """``mlflow deployments help -t preproc``: plain text, the docstring without its markup."""
    return f"{__doc__.strip().replace('``', '')}\n\n{opts.help_text()}"


def run_local(name: str, model_uri: str, flavor: str | None = None,
              config: dict | None = None) -> None:
    """``mlflow deployments run-local -t preproc``: build, run in the foreground; Ctrl-C or
    SIGTERM stops it and removes its container."""
    client = PreprocDeploymentClient("preproc")
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C
    try:
        deployment = client.create_deployment(name, model_uri, flavor, dict(config or {}))
        container = client._docker.containers.get(deployment["containers"][0]["name"])
        print(f"running {deployment['image']} as {container.name}; Ctrl-C stops it",
              file=sys.stderr)
        for chunk in container.logs(stream=True, follow=True):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if client._backend.containers(name):
            client.delete_deployment(name)


class PreprocDeploymentClient(BaseDeploymentClient):
    """Deploys preprocessing models as containers on a Docker engine."""

    def __init__(self, target_uri: str):
        super().__init__(target_uri)
        _, _, rest = target_uri.partition(":/")
        # preproc:/kubernetes[/namespace] reads Kubernetes (get and list take no -C keys)
        self._kube_namespace = None
        if rest == "kubernetes" or rest.startswith("kubernetes/"):
            self._kube_namespace = rest.partition("/")[2] or "default"
            rest = ""
        self._docker_host = rest or None
        self._client = None

    # ---- the deployment API ----------------------------------------------------------------

    def create_deployment(self, name: str, model_uri: str, flavor: str | None = None,
                          config: dict | None = None, endpoint: str | None = None) -> dict:
        if self._on_kubernetes(config):
            return self._kubernetes.create(name, model_uri, flavor, config or {})
        options = self._options(flavor, config, name)
        deployment = self._plan(name, model_uri, options)
        # What the options and the model decide is checked before the engine is asked anything:
        # a bad setting is reported as itself, also when no engine runs.
        specs, consumer_settings = self._check_settings(deployment)
        if self._backend.containers(name):
            raise DeploymentError(f"a deployment named {name} already exists; use mlflow "
                                  f"deployments update --name {name}, or delete it first")
        self._check_host(deployment, specs, consumer_settings)
        self._build(deployment)
        _step(2, f"starting {_count(deployment.replicas, 'container')} ({deployment.mode})")
        try:
            self._start(specs, deployment)
        except NotHealthy as exc:
            raise DeploymentError(f"{name} did not start, so nothing is left running: "
                                  f"{exc}") from None
        created = self.get_deployment(name)
        print(ready_line(created), file=sys.stderr)
        return created

    def update_deployment(self, name: str, model_uri: str | None = None,
                          flavor: str | None = None, config: dict | None = None,
                          endpoint: str | None = None) -> dict:
        if self._on_kubernetes(config):
            return self._kubernetes.update(name, model_uri, flavor, config or {})
        self._options(flavor, config, name)  # what is given, before the engine says what runs
        old = self._backend.current(name)
        if not old:
            raise self._not_found(name)
        # Secret values are not in the stored options: the running container has them.
        previous = opts.restore_secrets(options_of(old[0]), spec_of(old[0]).env)
        ignored = sorted(k for k in previous if k.startswith("secret_env."))
        if ignored:  # accepted (and never set) before Docker refused them: not kept
            print(f"dropping {', '.join(ignored)}: secret_env is for Kubernetes only and was "
                  "never set in these containers; use -C env.NAME=VALUE", file=sys.stderr)
            previous = {k: v for k, v in previous.items() if k not in ignored}
        options = self._options(flavor, {**previous, **(config or {})})
        model_uri = model_uri or old[0].labels[f"{LABEL}.model-uri"]
        deployment = self._plan(name, model_uri, options, revision_of(old[0]) + 1)
        specs, consumer_settings = self._check_settings(deployment)
        self._check_host(deployment, specs, consumer_settings, replacing=old)
        self._note_kept_topic(deployment, previous, config or {})
        self._build(deployment)
        if deployment.serving:
            # Host networking: the new container cannot bind the old one's port while it
            # runs. Prove the new image serves on a spare port before touching the old one.
            self._trial_serve(deployment)
        self._swap(old, deployment, specs)
        return self.get_deployment(name)

    def delete_deployment(self, name: str, config: dict | None = None,
                          endpoint: str | None = None) -> None:
        if self._on_kubernetes(config):
            return self._kubernetes.delete(name, config or {})
        options = self._options(None, config)  # remove_image=maybe: refused before the stop
        containers = self._backend.containers(name)  # every revision
        if not containers:
            raise self._not_found(name)
        image = self._backend.current(name)[0].labels.get(f"{LABEL}.image")
        self._backend.stop(containers, _stop_timeout(options_of(containers[0])))
        self._backend.remove(containers)
        if settings.parse_bool(options["remove_image"], "remove_image"):
            self._docker.images.remove(image)

    def list_deployments(self, endpoint: str | None = None) -> list[dict]:
        if self._kube_namespace is not None:
            return self._kubernetes.list()
        names = sorted({c.labels[f"{LABEL}.deployment"] for c in self._backend.containers()})
        return [listed(self.get_deployment(n)) for n in names]

    def get_deployment(self, name: str, endpoint: str | None = None) -> dict:
        if self._kube_namespace is not None:
            return self._kubernetes.get(name)
        containers = self._backend.current(name)
        if not containers:
            raise self._not_found(name)
        labels = containers[0].labels
        options = options_of(containers[0])
        statuses = [c.status for c in containers]
        mode = labels.get(f"{LABEL}.mode", "serve")
        port = labels.get(f"{LABEL}.port")
        return {
            "name": name,
            "flavor": FLAVOR,
            "backend": "docker",
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
            "config": opts.shown(options, "docker"),
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

    # ---- building ------------------------------------------------------------------------------

    def build_image(self, model_uri: str, config: dict | None = None, name: str | None = None,
                    echo=None) -> tuple[str, Any]:
        """Build the serving image of a preprocessing model without starting it.

        Returns the image reference and the model's :class:`ModelIdentity`. ``config`` takes
        the same keys as ``create`` (``image``, ``tag``, ``base_image``, ``no_cache``...).
        ``echo`` receives the build's output lines (default: only a failure's tail, printed).
        """
        deployment = self._plan(name or "model", model_uri, self._options(None, config))
        self._build(deployment, echo)
        return deployment.image, deployment.identity

    def _build(self, d: Deployment, echo=None) -> None:
        import mlflow

        _step(1, f"building {d.image}")
        started = time.monotonic()
        tail: deque[str] = deque(maxlen=25)
        workdir = Path(tempfile.mkdtemp(prefix="mlflow-preproc-model-"))
        (workdir / "model").mkdir()
        (workdir / "predict").mkdir()
        try:
            with _no_download_bars():
                model_dir = Path(mlflow.artifacts.download_artifacts(
                    d.identity.download_uri, dst_path=str(workdir / "model")))
                prediction_model = None
                if d.prediction_identity is not None:
                    prediction_model = (Path(mlflow.artifacts.download_artifacts(
                        d.prediction_identity.download_uri, dst_path=str(workdir / "predict"))),
                        _identity_json(d.prediction_identity))
            try:
                base = base_image(d.options, model_python_version(model_dir))
                context = prepare_context(model_dir, base, _identity_json(d.identity),
                                          prediction_model)
            except BuildError as exc:
                raise DeploymentError(str(exc)) from None
            try:
                build_image(self._docker, context, d.image, {f"{LABEL}.model-uri": d.identity.uri},
                            network_mode=d.options["network_mode"],
                            nocache=settings.parse_bool(d.options["no_cache"], "no_cache"),
                            echo=echo or tail.append)
            except BuildError as exc:
                raise DeploymentError(str(exc)) from None
            finally:
                shutil.rmtree(context, ignore_errors=True)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        _done(f"built {d.image} from {base}", started)

    # ---- planning and checking -------------------------------------------------------------

    def _options(self, flavor: str | None, config: dict | None,
                 name: str | None = None) -> dict[str, str]:
        """The resolved options (and ``name``, when given) checked; contacts nothing."""
        if flavor not in (None, FLAVOR, "python_function"):
            raise DeploymentError(f"flavor {flavor!r} is not supported by the preproc target; "
                                  f"omit --flavor or use {FLAVOR}")
        try:
            options = opts.resolve(config or {}, name)
        except (opts.OptionError, settings.ConfigError) as exc:
            raise DeploymentError(str(exc)) from None
        if "docker_host" in options:
            self._docker_host = options["docker_host"]
        return options

    def _plan(self, name: str, model_uri: str, options: dict[str, str],
              revision: int = 1) -> Deployment:
        from mlflow_preproc.runtime.model_identity import ModelNotFound, resolve_model

        try:
            identity = resolve_model(model_uri)
        except ModelNotFound as exc:
            raise DeploymentError(str(exc)) from None
        flavors = self._require_preprocessing(model_uri, identity.download_uri)
        try:  # the Dockerfile is written from it: refused now, before anything is touched
            base_image(options, flavors.get("python_function", {}).get("python_version"))
        except BuildError as exc:
            raise DeploymentError(str(exc)) from None
        options = with_stream_defaults(name, identity, options)
        prediction_identity = None
        if options.get("prediction_model_uri"):
            try:  # baked into the image with the preprocessing model (one hop)
                prediction_identity = resolve_model(options["prediction_model_uri"])
            except ModelNotFound as exc:
                raise DeploymentError(str(exc)) from None
        default_repo = (f"preprocessing-{identity.name}-{identity.version}"
                        if identity.name else f"preprocessing-{name}")
        image = f"{docker_reference(options.get('image') or default_repo)}:" \
                f"{options.get('tag') or 'latest'}"
        if options.get("registry"):
            image = f"{options['registry'].rstrip('/')}/{image}"
        return Deployment(name, model_uri, identity, image, options, revision,
                          prediction_identity)

    def _specs(self, d: Deployment) -> list[ContainerSpec]:
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

    def _check_settings(self, d: Deployment) -> tuple[list[ContainerSpec],
                                                      settings.Config | None]:
        """The containers of ``d``, their environment read by the settings table as they will
        read it; and the consumer's settings in a consuming mode. Contacts nothing."""
        specs = self._specs(d)
        try:
            return specs, [check_settings(spec) for spec in specs][0]
        except settings.ConfigError as exc:
            raise DeploymentError(str(exc)) from None

    def _check_host(self, d: Deployment, specs: list[ContainerSpec],
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
            _check_topics(consumer_settings, d.mode)

    def _note_kept_topic(self, d: Deployment, previous: dict, given: dict) -> None:
        if d.mode not in ("kafka", "both") or "output_topic" in given:
            return
        new_default = default_output_topic(d.identity, d.options)
        kept = d.options.get("output_topic")
        if previous.get("output_topic") and new_default and new_default != kept:
            print(f"keeping the output topic {kept} (the default for this version would be "
                  f"{new_default}; -C output_topic=... changes it)", file=sys.stderr)

    @staticmethod
    def _require_preprocessing(model_uri: str, download_uri: str) -> dict:
        """The model's flavors; raises unless it is a preprocessing model."""
        from mlflow.models import get_model_info

        with _no_download_bars():
            try:  # reads the MLmodel file only, for every kind of model URI
                flavors = get_model_info(download_uri).flavors
            except MlflowException as exc:
                raise DeploymentError(f"cannot download {model_uri}: "
                                      f"{exc.message.splitlines()[0]}") from None
        if FLAVOR not in flavors:
            raise DeploymentError(
                f"{model_uri} is not a preprocessing model (its flavors: "
                f"{', '.join(flavors) or 'none'}); the preproc target deploys models logged "
                "with mlflow.preproc.log_model; use mlflow models build-docker for others")
        return flavors

    # ---- starting, swapping ------------------------------------------------------------------

    def _start(self, specs: list[ContainerSpec], d: Deployment) -> None:
        """Start ``specs`` and wait until they are healthy; if they are not (or anything
        interrupts), remove what was started and raise."""
        started = []
        try:
            for spec in specs:
                started.append(self._backend.run(spec, d.options["network_mode"]))
            waited = time.monotonic()
            what = "REST answers" if d.serving else ""
            if d.consuming:
                what += (" and " if what else "") + \
                    f"every consumer joined group {d.options['consumer_group_id']}"
            _step(3, f"waiting until healthy ({what or 'running'})")
            self._backend.wait_healthy(list(zip(started, specs)),
                                       float(d.options["health_timeout"]))
        except BaseException:
            self._backend.remove(started)
            raise
        _done(f"{_count(len(started), 'container')} healthy", waited)

    def _swap(self, old: list, d: Deployment, specs: list[ContainerSpec]) -> None:
        previous = revision_of(old[0])
        print(f"stopping revision {previous} (its consumers commit first)", file=sys.stderr)
        timeout = _stop_timeout(options_of(old[0]))
        self._backend.stop(old, timeout)
        for container in old:
            container.rename(f"{container.name}-r{previous}")
        _step(2, f"starting revision {d.revision}: {_count(d.replicas, 'container')}")
        try:
            self._start(specs, d)
        except BaseException as exc:
            for container in old:
                container.rename(container.name.rsplit(f"-r{previous}", 1)[0])
                container.start()
            print(f"revision {d.revision} failed; starting revision {previous} again",
                  file=sys.stderr)
            self._backend.wait_healthy([(c, spec_of(c)) for c in old],
                                       float(options_of(old[0])["health_timeout"]))
            if isinstance(exc, NotHealthy):
                raise DeploymentError(
                    f"update of {d.name} to revision {d.revision} failed and was rolled back: "
                    f"revision {previous} ({old[0].labels.get(f'{LABEL}.image')}, same settings "
                    f"and consumer group) is running again. The new revision: {exc}") from None
            raise
        self._backend.remove(old)

    def _trial_serve(self, d: Deployment) -> None:
        port = free_ports(1)
        trial = Deployment(d.name, d.model_uri, d.identity, d.image,
                           {**d.options, "mode": "serve", "port": str(port)}, d.revision)
        spec = container_spec(trial, 0, port, None)
        spec = ContainerSpec(f"{d.name}-trial", spec.image, spec.env, {f"{LABEL}.trial": d.name},
                             port, [], spec.mounts)
        container = self._backend.run(spec, d.options["network_mode"])
        try:
            self._backend.wait_healthy([(container, spec)], float(d.options["health_timeout"]))
        except NotHealthy as exc:
            raise DeploymentError(f"the new revision of {d.name} does not serve, so the "
                                  f"running one was left untouched: {exc}") from None
        finally:
            container.remove(force=True)

    # ---- Kubernetes ----------------------------------------------------------------------------

    def manifests(self, name: str, model_uri: str, config: dict | None = None) -> list[dict]:
        """The Kubernetes objects ``create -C backend=kubernetes`` would apply."""
        return self._kubernetes.manifests(name, model_uri, config or {})

    @property
    def _kubernetes(self):
        from mlflow_preproc.deploy.kubernetes_target import KubernetesDeployments

        return KubernetesDeployments(self, self._kube_namespace)

    def _on_kubernetes(self, config: dict | None) -> bool:
        return self._kube_namespace is not None or (config or {}).get("backend") == "kubernetes"

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

    @property
    def _backend(self) -> DockerBackend:
        return DockerBackend(self._docker)

    @staticmethod
    def _not_found(name: str) -> DeploymentError:
        return DeploymentError(f"no deployment named {name}; mlflow deployments list -t "
                               "preproc shows the deployments")


def listed(deployment: dict) -> dict:
    """What ``list`` gives of a deployment ``get`` describes: ``mlflow deployments list``
    prints the whole list as one Python value, so each item is kept to a line."""
    return {"name": deployment["name"], "flavor": deployment["flavor"],
            "backend": deployment["backend"], "model": deployment["model_uri"],
            "revision": deployment["revision"], "status": deployment["status"]}


def _identity_json(identity) -> dict:
    return {"uri": identity.uri, "name": identity.name, "version": identity.version}


def _check_topics(cfg: settings.Config, mode: str) -> None:
    """The broker answers with this configuration and the input topic exists; the output
    and dead-letter topics exist or may be created."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    servers = cfg["KAFKA_BOOTSTRAP_SERVERS"]
    try:
        admin = AdminClient({**cfg.kafka, "logger": _quiet_logger()})
        topics = admin.list_topics(timeout=10).topics
    except KafkaException as exc:
        error = exc.args[0].str()
        if "configuration property" in error:
            raise DeploymentError(str(settings.client_config_error(cfg, error))) from None
        raise DeploymentError(f"cannot reach Kafka at {servers} ({error}); check "
                              "kafka_bootstrap_servers and that the broker is up (the "
                              "containers would fail the same way)") from None
    input_topic = cfg["INPUT_TOPIC"]
    if input_topic not in topics:
        raise DeploymentError(f"input topic {input_topic} does not exist on {servers}; create "
                              "it or fix -C input_topic=...")
    missing = [t for t in (cfg["OUTPUT_TOPIC"], cfg["DLQ_TOPIC"] or f"{input_topic}-dlq")
               if t and t not in topics]
    if missing and not cfg["AUTO_CREATE_TOPICS"]:
        raise DeploymentError(f"topic(s) {', '.join(missing)} do not exist on {servers} and "
                              "auto_create_topics is false; create them first")


def _quiet_logger():
    import logging

    quiet = logging.getLogger("mlflow_preproc.deploy.librdkafka")
    quiet.setLevel(logging.CRITICAL)  # the check reports its own one-line error
    return quiet


@contextlib.contextmanager
def _no_download_bars():
    # MLflow draws a progress bar per artifact download; one line per step is enough here.
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before


def _step(number: int, text: str) -> None:
    print(f"[{number}/3] {text}", file=sys.stderr, flush=True)


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


def _done(text: str, since: float) -> None:
    print(f"      {text} ({time.monotonic() - since:.1f} s)", file=sys.stderr, flush=True)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


_PAYLOAD_KEYS = ("inputs", "dataframe_records", "dataframe_split", "instances")


def _as_payload(inputs: Any) -> dict:
    """The scoring-protocol body for what ``predict`` was given: a payload of any of MLflow's
    forms, a list of records, one record, or what ``mlflow deployments predict -I`` makes of a
    file (``pandas.read_json``: a payload file becomes a one-column frame named after its key)."""
    import pandas as pd

    if isinstance(inputs, pd.DataFrame):
        if len(inputs.columns) == 1 and inputs.columns[0] in _PAYLOAD_KEYS:
            key = inputs.columns[0]
            # A list became rows 0..n-1; an object (dataframe_split, columnar inputs) became
            # an index of its keys.
            orient = "values" if isinstance(inputs.index, pd.RangeIndex) else "index"
            return {key: json.loads(inputs[key].to_json(orient=orient))}
        return {"inputs": json.loads(inputs.to_json(orient="records"))}
    if isinstance(inputs, dict) and set(_PAYLOAD_KEYS) & set(inputs):
        return inputs
    return {"inputs": inputs if isinstance(inputs, list) else [inputs]}


def _stop_timeout(options: dict) -> int:
    shutdown = options.get("shutdown_timeout_s") or \
        settings.SETTINGS["SHUTDOWN_TIMEOUT_S"].default
    return int(float(shutdown)) + 10
