"""Day-2 operations of the `preproc` target on a real Docker engine and Apache Kafka:
validate before touching, prove the new version in its mode, roll back, safe defaults, files.

Each test runs the real `mlflow deployments` CLI, which builds real images and starts real
containers; the containers consume the broker on the host (host networking, loopback only).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid

import mlflow
import pytest

from conftest import BIN, STREAM_GROUP_ENV, consume, free_port, post_json, produce, unique

pytestmark = [pytest.mark.docker, pytest.mark.kafka, pytest.mark.slow]

# A killed revision's partitions move to the next one within a short session, not 45 s.
FAST_GROUP = [arg for key, value in STREAM_GROUP_ENV.items()
              for arg in ("-C", f"env.{key}={value}")]


def v1(record):
    return {"id": record["id"], "version": 1}


def v2(record):
    return {"id": record["id"], "version": 2}


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mlflow"), *args], capture_output=True, text=True,
                          timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert lines, proc.stderr[-3000:]
    return lines[-1]


@pytest.fixture
def registered(tracking_uri):
    """models:/roll-prep/1 (v1) and models:/roll-prep/2 (v2)."""
    for fn in (v1, v2):
        with mlflow.start_run():
            mlflow.preproc.log_model(fn, name="p", registered_model_name="roll-prep")
    return "models:/roll-prep"


def kafka_create(name, model_uri, broker, topic, *extra):
    return cli("deployments", "create", "-t", "preproc", "--name", name, "-m", model_uri,
               "-C", "mode=kafka", "-C", f"kafka_bootstrap_servers={broker.bootstrap_servers}",
               "-C", f"input_topic={topic}", *FAST_GROUP, *extra)


def outputs_of(broker, topic, expected, timeout=90):
    return sorted((json.loads(m.value())["id"], json.loads(m.value())["version"])
                  for m in consume(broker.bootstrap_servers, topic, expected, timeout=timeout))


def containers_of(docker_client, name):
    return docker_client.containers.list(
        all=True, filters={"label": f"org.mlflow-preproc.deployment={name}"})


def test_an_update_with_a_bad_setting_is_refused_and_the_running_stream_is_untouched(
        broker, registered, deployments, docker_client):
    name, topic = deployments(), unique("raw")
    broker.create_topics(topic)
    out = unique("out")
    created = kafka_create(name, f"{registered}/1", broker, topic, "-C", f"output_topic={out}")
    assert created.returncode == 0, created.stderr[-3000:]
    before = {c.id for c in containers_of(docker_client, name)}

    update = cli("deployments", "update", "-t", "preproc", "--name", name,
                 "-C", "input_format=xml")
    assert update.returncode != 0
    assert error_line(update) == \
        "Error: INPUT_FORMAT='xml' is not one of json, avro, confluent-avro"
    assert "[1/3]" not in update.stderr  # refused before building anything
    running = containers_of(docker_client, name)
    assert {c.id for c in running} == before and {c.status for c in running} == {"running"}
    produce(broker.bootstrap_servers, topic, [json.dumps({"id": i}).encode() for i in range(3)])
    assert outputs_of(broker, out, 3) == [(0, 1), (1, 1), (2, 1)]


def test_a_create_against_an_unreachable_broker_is_refused_and_leaves_nothing(
        broker, registered, deployments, docker_client):
    name, topic = deployments(), unique("raw")
    broker.create_topics(topic)
    nobody = f"127.0.0.1:{free_port()}"
    create = cli("deployments", "create", "-t", "preproc", "--name", name,
                 "-m", f"{registered}/1", "-C", "mode=both", "-C", f"port={free_port()}",
                 "-C", f"kafka_bootstrap_servers={nobody}", "-C", f"input_topic={topic}")
    assert create.returncode != 0
    assert error_line(create).startswith(f"Error: cannot reach Kafka at {nobody}")
    assert containers_of(docker_client, name) == []
    # The name is free: the corrected command works.
    retry = kafka_create(name, f"{registered}/1", broker, topic)
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert "every consumer joined group mlflow-preproc-" + name in retry.stderr


def test_a_create_whose_containers_fail_removes_them_and_shows_their_last_lines(
        broker, tracking_uri, deployments, docker_client, tmp_path):
    code = tmp_path / "code" / "preprocessing.py"
    code.parent.mkdir()
    code.write_text("import os\n"
                    "if os.environ.get('PREPROC_FAIL_AT_START'):  # loading fails in there\n"
                    "    raise RuntimeError('cannot load the calibration table')\n"
                    "def pre_processing(record):\n"
                    "    return record\n")
    with mlflow.start_run():
        mlflow.preproc.log_model(str(code), name="p", registered_model_name="fails-at-start")
    name, topic = deployments(), unique("raw")
    broker.create_topics(topic)
    create = kafka_create(name, "models:/fails-at-start/1", broker, topic,
                          "-C", "env.PREPROC_FAIL_AT_START=1", "-C", "health_timeout=90")
    assert create.returncode != 0
    assert f"{name} did not start, so nothing is left running" in create.stderr
    assert "cannot load the calibration table" in create.stderr  # the container's own words
    assert containers_of(docker_client, name) == []


def test_two_deployments_on_one_topic_each_see_every_alert(broker, registered, deployments):
    topic = unique("alerts")
    broker.create_topics(topic, partitions=2)
    outs = []
    for _ in range(2):
        name, out = deployments(), unique("out")
        created = kafka_create(name, f"{registered}/1", broker, topic,
                               "-C", f"output_topic={out}")
        assert created.returncode == 0, created.stderr[-3000:]
        outs.append(out)
    produce(broker.bootstrap_servers, topic, [json.dumps({"id": i}).encode() for i in range(40)],
            keys=[str(i).encode() for i in range(40)])
    for out in outs:  # not half each: every deployment has a group of its own
        assert [i for i, _ in outputs_of(broker, out, 40)] == list(range(40))


def test_an_update_keeps_the_output_topic_and_says_so(broker, registered, deployments):
    name, topic = deployments(), unique("raw")
    broker.create_topics(topic)
    assert kafka_create(name, f"{registered}/1", broker, topic).returncode == 0
    produce(broker.bootstrap_servers, topic, [b'{"id": 1}'])
    assert outputs_of(broker, "roll-prep-1-preprocessed", 1) == [(1, 1)]

    update = cli("deployments", "update", "-t", "preproc", "--name", name,
                 "-m", f"{registered}/2")
    assert update.returncode == 0, update.stderr[-3000:]
    assert "keeping the output topic roll-prep-1-preprocessed (the default for this version " \
           "would be roll-prep-2-preprocessed" in update.stderr
    get = cli("deployments", "get", "-t", "preproc", "--name", name)
    shown = dict(line.split(": ", 1) for line in get.stdout.splitlines() if ": " in line)
    assert shown["output_topic"] == "roll-prep-1-preprocessed" and shown["revision"] == "2"
    produce(broker.bootstrap_servers, topic, [b'{"id": 2}'])
    assert outputs_of(broker, "roll-prep-1-preprocessed", 2) == [(1, 1), (2, 2)]


def test_a_stream_whose_only_kafka_settings_come_from_a_mounted_properties_file(
        broker, registered, deployments, tmp_path):
    name, topic, out = deployments(), unique("raw"), unique("out")
    broker.create_topics(topic)
    props = tmp_path / "client.properties"
    props.write_text(f"bootstrap.servers={broker.bootstrap_servers}\n"
                     + "".join(f"{k[len('LIBRDKAFKA_'):].lower().replace('_', '.')}={v}\n"
                               for k, v in STREAM_GROUP_ENV.items()))
    create = cli("deployments", "create", "-t", "preproc", "--name", name,
                 "-m", f"{registered}/1", "-C", "mode=kafka", "-C", f"input_topic={topic}",
                 "-C", f"output_topic={out}",
                 "-C", f"mount./etc/kafka/client.properties={props}",
                 "-C", "kafka_config_file=/etc/kafka/client.properties")
    assert create.returncode == 0, create.stderr[-3000:]
    produce(broker.bootstrap_servers, topic, [b'{"id": 7}'])
    assert outputs_of(broker, out, 1) == [(7, 1)]


def kill_revision(docker_client, name, revision, killed, timeout=300):
    """Kill ``name``'s containers of ``revision`` as they start (a revision never healthy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not killed:
        for c in docker_client.containers.list(filters={"label": [
                f"org.mlflow-preproc.deployment={name}",
                f"org.mlflow-preproc.revision={revision}"]}):
            c.kill()
            killed.append(c.name)
        time.sleep(0.2)


def test_a_failing_update_is_rolled_back_and_the_old_version_consumes_again_losing_nothing(
        broker, registered, deployments, docker_client):
    name, topic, out = deployments(), unique("raw"), unique("out")
    broker.create_topics(topic)
    created = kafka_create(name, f"{registered}/1", broker, topic, "-C", f"output_topic={out}")
    assert created.returncode == 0, created.stderr[-3000:]
    produce(broker.bootstrap_servers, topic, [json.dumps({"id": i}).encode() for i in range(10)])
    assert len(outputs_of(broker, out, 10)) == 10

    killed = []
    killer = threading.Thread(target=kill_revision, args=(docker_client, name, 2, killed),
                              daemon=True)
    killer.start()
    update = subprocess.Popen([str(BIN / "mlflow"), "deployments", "update", "-t", "preproc",
                               "--name", name, "-m", f"{registered}/2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Records arriving while the update runs and fails wait in the topic.
    produce(broker.bootstrap_servers, topic,
            [json.dumps({"id": i}).encode() for i in range(10, 20)])
    _, stderr = update.communicate(timeout=600)
    killer.join(5)
    assert killed, "the new revision never ran"
    assert update.returncode != 0
    assert f"update of {name} to revision 2 failed and was rolled back: revision 1" in stderr
    current = [c for c in containers_of(docker_client, name) if c.status == "running"]
    assert [c.labels["org.mlflow-preproc.revision"] for c in current] == ["1"]
    produce(broker.bootstrap_servers, topic,
            [json.dumps({"id": i}).encode() for i in range(20, 30)])
    got = outputs_of(broker, out, 30, timeout=120)
    assert sorted({i for i, _ in got}) == list(range(30))  # no record lost
    assert {v for i, v in got if i >= 20} == {1}  # the old version consumes again


def at_once(*args: str) -> list[subprocess.CompletedProcess]:
    """``mlflow deployments ARGS`` twice, started together."""
    start, done = threading.Barrier(2), [None, None]

    def run(i):
        start.wait()
        done[i] = cli("deployments", *args)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    return done


def test_racing_rollouts_and_a_rollback_keep_every_replica_of_a_name_like_a_revisions(
        registered, deployments, docker_client):
    # REST only: rollouts and rollbacks are the same in every mode.
    from mlflow_preproc.deploy.docker import rollout
    from mlflow_preproc.deploy.docker.containers import Containers, free_ports
    from mlflow_preproc.deploy.errors import DeploymentError

    name, port = deployments("-r1-2"), free_ports(2)

    def state():
        return sorted((c.name, c.labels["org.mlflow-preproc.revision"], c.status)
                      for c in containers_of(docker_client, name))

    def one_line_errors(procs):
        for proc in (p for p in procs if p.returncode != 0):
            assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
            assert error_line(proc).startswith((
                f"Error: another create or update of {name} is under way",
                f"Error: a deployment named {name} already exists")), proc.stderr[-3000:]

    # Two creates at once both found the name free, and the second to start a container died
    # on Docker's raw 409 (#33): one wins, the other says so.
    created = at_once("create", "-t", "preproc", "--name", name, "-m", f"{registered}/1",
                      "-C", f"port={port}", "-C", "replicas=2")
    assert sorted(p.returncode == 0 for p in created) == [False, True], \
        [p.stderr[-2000:] for p in created]
    one_line_errors(created)
    before = {c.name: c.id for c in containers_of(docker_client, name)}
    assert state() == [(f"{name}-0", "1", "running"), (f"{name}-1", "1", "running")]

    # The old containers are renamed <name>-<i>-r1 while the new revision starts; the
    # rollback rebuilt their names from docker-py's stale container.name, cut at the first
    # "-r1" (which belongs to this name): both became "<name>", the second rename failed with
    # Docker's raw 409 and half the replicas stayed down (#33, finding 1).
    killed = []
    killer = threading.Thread(target=kill_revision, args=(docker_client, name, 2, killed),
                              daemon=True)
    killer.start()
    update = cli("deployments", "update", "-t", "preproc", "--name", name,
                 "-m", f"{registered}/2")
    killer.join(5)
    assert killed, "the new revision never ran"
    assert f"update of {name} to revision 2 failed and was rolled back" in error_line(update)
    # The same containers, under their own names again, every one running and serving.
    assert {c.name: c.id for c in containers_of(docker_client, name)} == before
    assert {status for _, _, status in state()} == {"running"}
    for replica in (0, 1):
        assert post_json(f"http://127.0.0.1:{port + replica}/invocations",
                         {"inputs": [{"id": 3}]}) == (200, {"predictions": [{"id": 3,
                                                                             "version": 1}]})

    # Two updates at once raced for the trial container and the renames (#33).
    updated = at_once("update", "-t", "preproc", "--name", name, "-m", f"{registered}/2")
    wins = sum(p.returncode == 0 for p in updated)
    assert wins >= 1, [p.stderr[-2000:] for p in updated]
    one_line_errors(updated)
    revision = str(1 + wins)  # one revision runs, the winners'; nothing is left of another
    assert state() == [(f"{name}-0", revision, "running"), (f"{name}-1", revision, "running")]
    assert post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": [{"id": 4}]}) == (
        200, {"predictions": [{"id": 4, "version": 2}]})

    # Which of the two reaches the trial container first varies; the claim behind it does
    # not: of two updates that read the same revision, the second to set it aside stops.
    read_by_both = Containers(docker_client).current(name)
    names = [c.name for c in read_by_both]
    rollout.set_aside(read_by_both, names, name)
    try:
        with pytest.raises(DeploymentError, match=f"another create or update of {name} is "
                                                  "under way"):
            rollout.set_aside(read_by_both, names, name)
    finally:
        for container, original in zip(read_by_both, names):
            container.rename(original)
    assert state() == [(f"{name}-0", revision, "running"), (f"{name}-1", revision, "running")]


def v3_broken(record):
    return {"id": record["identifier"], "version": 3}  # a field renamed upstream: every record


def test_an_update_to_a_version_that_fails_every_record_trips_the_brake_and_is_rolled_back(
        broker, tracking_uri, deployments, docker_client):
    for fn in (v1, v3_broken):
        with mlflow.start_run():
            mlflow.preproc.log_model(fn, name="p", registered_model_name="brake-prep")
    name, topic, out = deployments(), unique("raw"), unique("out")
    broker.create_topics(topic)
    created = kafka_create(name, "models:/brake-prep/1", broker, topic, "-C",
                           f"output_topic={out}", "-C", "dlq_brake_window=100",
                           "-C", "batch_size=50")
    assert created.returncode == 0, created.stderr[-3000:]
    produce(broker.bootstrap_servers, topic, [json.dumps({"id": i}).encode() for i in range(10)])
    assert len(outputs_of(broker, out, 10)) == 10

    # The records for the new revision are written the moment revision 1 has stopped (it
    # would process them), seconds before revision 2 has loaded its model and joined: it
    # cannot be caught up before it has read them (its position at their partition's end).
    fed = []

    def feed_the_new_revision():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not fed:
            revision_1 = docker_client.containers.list(all=True, filters={"label": [
                f"org.mlflow-preproc.deployment={name}", "org.mlflow-preproc.revision=1"]})
            if revision_1 and all(c.status == "exited" for c in revision_1):
                produce(broker.bootstrap_servers, topic,
                        [json.dumps({"id": i}).encode() for i in range(10, 310)])
                fed.append(True)
            time.sleep(0.1)

    feeder = threading.Thread(target=feed_the_new_revision, daemon=True)
    feeder.start()
    update = cli("deployments", "update", "-t", "preproc", "--name", name,
                 "-m", "models:/brake-prep/2")
    feeder.join(5)
    assert fed, "the new revision never ran"
    assert update.returncode != 0
    assert f"update of {name} to revision 2 failed and was rolled back" in update.stderr
    assert "dead-letter brake engaged" in update.stderr, update.stderr[-3000:]
    current = [c for c in containers_of(docker_client, name) if c.status == "running"]
    assert [c.labels["org.mlflow-preproc.revision"] for c in current] == ["1"]
    got = outputs_of(broker, out, 310, timeout=120)
    assert sorted({i for i, _ in got}) == list(range(310))  # the old version did them all
    dead = consume(broker.bootstrap_servers, f"{topic}-dlq", 1000, timeout=3)
    assert 100 <= len(dead) <= 150  # one brake window (in whole batches), not the backlog


def test_run_local_removes_its_container_on_sigterm(registered, docker_client, tmp_path):
    # On the engine -C docker_host names, while the default one (DOCKER_HOST) is not there.
    engine = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    name = f"local{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen([str(BIN / "mlflow"), "deployments", "run-local", "-t", "preproc",
                             "--name", name, "-m", f"{registered}/1", "-C",
                             f"port={free_port()}", "-C", f"docker_host={engine}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/none.sock"})
    try:
        deadline = time.monotonic() + 300
        while not [c for c in containers_of(docker_client, name) if c.status == "running"]:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        err = proc.stderr.read()
        assert proc.returncode == 0 and "Error" not in err, err[-3000:]
        assert containers_of(docker_client, name) == []
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        for c in containers_of(docker_client, name):
            c.remove(force=True)
