"""Apache Kafka for the tests: single-node KRaft brokers and a three-broker cluster on loopback.

The broker is the one our users run: ``org.apache.kafka:kafka_2.13`` at the version pinned in
``scripts/kafka-broker.sh``, which fetches it with Maven into a cache folder once. Each broker
here is one JVM (``kafka.Kafka`` with a properties file, broker and controller in one process)
over a log directory in a temporary folder, stopped by its PID. The interface is the embedded
broker's (``bootstrap_servers``, ``process``, ``start``, ``stop``, ``create_topics``), so a
test runs on either; faults are made with :meth:`ApacheKafka.kill`, :meth:`~ApacheKafka.freeze`
(SIGSTOP: the process is there, nothing answers) and :meth:`~ApacheKafka.restart` (same port,
same log directory: what was written is still there).

Settings differ from a production broker only where a test would otherwise wait: internal
topics with the cluster's replication factor and few partitions, no initial rebalance delay,
short broker and consumer-protocol sessions, abandoned transactions aborted within a second or
two of their timeout, the JVM at C1 with a small heap (start-up on two shared cores).
"""

from __future__ import annotations

import atexit
import base64
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FETCH = ROOT / "scripts" / "kafka-broker.sh"

# Start-up over steady speed: C1 only (C2 compiling the broker costs seconds of CPU on two
# cores), the serial collector and a small heap (the tests' topics are small).
TEST_JVM_FLAGS = ("-Xms64m", "-Xmx512m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC",
                  "-Xshare:auto", "-XX:-UsePerfData", "-XX:+ExitOnOutOfMemoryError",
                  "-Djava.awt.headless=true")


# What Kafka's own start script (kafka-server-start.sh, kafka-run-class.sh) runs the broker
# with: for benchmarks, where the broker's steady speed counts, not its start-up.
KAFKA_START_JVM_FLAGS = ("-Xmx1G", "-Xms1G", "-server", "-XX:+UseG1GC",
                         "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
                         "-XX:+ExplicitGCInvokesConcurrent", "-Djava.awt.headless=true")


class KafkaUnavailable(RuntimeError):
    """Apache Kafka cannot be fetched or started here (no Java, no Maven): the message says
    what to install."""


@functools.cache
def kafka_libs() -> Path:
    """The folder of the broker's jars, fetched by ``scripts/kafka-broker.sh`` if missing
    (instant once cached)."""
    done = subprocess.run(["bash", str(FETCH)], capture_output=True, text=True)
    if done.returncode != 0:
        raise KafkaUnavailable(f"cannot fetch Apache Kafka ({FETCH.name}): "
                               f"{done.stderr.strip()[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def kafka_version() -> str:
    """The pinned Apache Kafka version."""
    return subprocess.run(["bash", str(FETCH), "version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def java() -> str:
    home = os.environ.get("JAVA_HOME")
    found = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not found or not Path(found).exists():
        raise KafkaUnavailable("Apache Kafka needs Java 17+: apt-get install -y "
                               "openjdk-17-jre-headless (scripts/dev.sh test does)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_id() -> str:
    """A Kafka cluster or directory id: 16 random bytes, base64url without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def server_properties(node_id: int, port: int, controller_port: int, voters: str,
                      log_dir: Path, replicas: int = 1, sasl: tuple[int, dict] | None = None
                      ) -> str:
    """A broker-and-controller node for tests; ``replicas`` is the cluster's size.
    ``sasl``: (port, {user: password}) adds a SASL/PLAIN listener for those users and the
    standard authorizer (ACLs), the PLAINTEXT listener's anonymous clients super users (the
    tests' own admin, the controller)."""
    min_isr = 2 if replicas >= 3 else 1
    settings = {
        "process.roles": "broker,controller",
        "node.id": node_id,
        "controller.quorum.voters": voters,
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": log_dir,
        "num.partitions": 1,
        "default.replication.factor": replicas,
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": replicas,
        "offsets.topic.num.partitions": 3,
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": 3,
        "share.coordinator.state.topic.replication.factor": replicas,
        "share.coordinator.state.topic.min.isr": min_isr,
        # A group forms as soon as its first member joins (the default waits 3 s for more).
        "group.initial.rebalance.delay.ms": 0,
        # KIP-848 groups (group.protocol=consumer): the session is the broker's to set.
        "group.consumer.min.session.timeout.ms": 3000,
        "group.consumer.session.timeout.ms": 6000,
        "group.consumer.min.heartbeat.interval.ms": 500,
        "group.consumer.heartbeat.interval.ms": 1000,
        # An abandoned transaction is aborted soon after its transaction.timeout.ms (the
        # default looks every 10 s).
        "transaction.abort.timed.out.transaction.cleanup.interval.ms": 1000,
        # A killed broker is fenced, and its partitions' leadership moved, within ~3 s.
        "broker.heartbeat.interval.ms": 500,
        "broker.session.timeout.ms": 3000,
        "auto.create.topics.enable": "true",
        "num.network.threads": 2,
        "num.io.threads": 2,
        "background.threads": 2,
        "log.cleaner.enable": "false",
    }
    if sasl is not None:
        sasl_port, users = sasl
        jaas = " ".join(f'user_{user}="{password}"' for user, password in users.items())
        settings.update({
            "listeners": f"PLAINTEXT://127.0.0.1:{port},SASL_PLAINTEXT://127.0.0.1:{sasl_port},"
                         f"CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port},"
                                    f"SASL_PLAINTEXT://127.0.0.1:{sasl_port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:"
                                              "SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config":
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {jaas};",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS",
        })
    return "".join(f"{key}={value}\n" for key, value in settings.items())


class ApacheKafka:
    """One Apache Kafka node on ``127.0.0.1:<port>`` (KRaft, broker and controller in one
    JVM); alone, a single-node cluster. Use as a context manager, or :meth:`start` and
    :meth:`close`.

    >>> with ApacheKafka() as broker:
    ...     print(broker.bootstrap_servers)
    """

    def __init__(self, port: int | None = None, *, node_id: int = 1,
                 controller_port: int | None = None, voters: str | None = None,
                 replicas: int = 1, cluster_id: str | None = None,
                 workdir: Path | None = None, jvm_flags: tuple[str, ...] = TEST_JVM_FLAGS,
                 sasl_users: dict[str, str] | None = None):
        self.port = port or _free_port()
        # With sasl_users, a second listener where those users authenticate and ACLs apply
        self.sasl_users = sasl_users
        self.sasl_port = _free_port() if sasl_users else None
        self.sasl_bootstrap_servers = f"127.0.0.1:{self.sasl_port}" if sasl_users else None
        self.controller_port = controller_port or _free_port()
        self.node_id = node_id
        self.voters = voters or f"{node_id}@127.0.0.1:{self.controller_port}"
        self.replicas = replicas
        self.cluster_id = cluster_id or _random_id()
        self.jvm_flags = jvm_flags
        self.bootstrap_servers = f"127.0.0.1:{self.port}"
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="apache-kafka-"))
        self.log_dir = self.dir / "data"
        self.properties = self.dir / "server.properties"
        self.log_path = str(self.dir / "broker.log")
        self.process: subprocess.Popen | None = None
        self.started_in: float | None = None  # seconds from the JVM's start to ready
        self._archive: Path | None = None  # the class-data archive this node writes at exit

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 90, wait: bool = True) -> ApacheKafka:
        """Start the node (formatting its storage the first time) and, with ``wait``, wait
        until it answers metadata requests as a registered broker."""
        if not self.properties.exists():
            self.properties.write_text(server_properties(
                self.node_id, self.port, self.controller_port, self.voters, self.log_dir,
                self.replicas, (self.sasl_port, self.sasl_users) if self.sasl_users else None))
            _format(self.log_dir, self.cluster_id, self.node_id, self.properties)
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self._jvm(), "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
                 "-Dorg.slf4j.simpleLogger.showDateTime=true",
                 "-cp", f"{kafka_libs()}/*", "kafka.Kafka", str(self.properties)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_ready(timeout, brokers=1)
            self.started_in = time.monotonic() - started
        return self

    def _jvm(self) -> list[str]:
        """The JVM's command line: with the class-data archive of the broker's classes when
        there is one (~30% off start-up), or writing it at this node's clean exit when there
        is none (once per process, into the cache folder)."""
        archive = kafka_libs().parent / "broker.jsa"
        flags = [java(), *self.jvm_flags]
        if archive.exists():
            flags.append(f"-XX:SharedArchiveFile={archive}")
        elif not _ARCHIVING:
            _ARCHIVING.append(self)
            self._archive = archive
            flags.append(f"-XX:ArchiveClassesAtExit={archive}.{os.getpid()}")
        return flags

    def wait_ready(self, timeout: float = 90, brokers: int = 1) -> None:
        """Wait until this node answers metadata requests listing ``brokers`` brokers."""
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            self.raise_if_exited()
            if time.monotonic() > deadline:
                self.kill()
                raise KafkaUnavailable(f"Apache Kafka did not listen on {self.port} within "
                                       f"{timeout}s; see {self.log_path}")
            time.sleep(0.05)
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        while True:
            self.raise_if_exited()
            try:
                if len(admin.list_topics(timeout=2).brokers) >= brokers:
                    break
            except Exception:  # noqa: BLE001 -- not answering yet
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise KafkaUnavailable(f"Apache Kafka on {self.port} did not list {brokers} "
                                       f"broker(s) within {timeout}s; see {self.log_path}")
            time.sleep(0.1)
        if brokers == 1:
            _create_offsets_topic(self.bootstrap_servers, max(1.0, deadline - time.monotonic()))

    def raise_if_exited(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = Path(self.log_path).read_text(errors="replace")[-3000:]
            raise KafkaUnavailable(f"Apache Kafka exited with {self.process.returncode}; "
                                   f"{self.log_path} ends:\n{tail}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30) -> None:
        """A clean shutdown (SIGTERM: controlled shutdown, logs flushed), by PID; SIGKILL
        after ``timeout``."""
        if not self.running:
            return
        self.thaw()
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        if self._archive is not None:
            written = Path(f"{self._archive}.{os.getpid()}")
            if written.exists():
                os.replace(written, self._archive)
            self._archive = None

    def kill(self) -> None:
        """SIGKILL: the broker dies at once, as in a crash or a lost machine."""
        if self.running:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung broker)."""
        if self.running:
            os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.running:
            os.kill(self.process.pid, signal.SIGCONT)

    def restart(self, timeout: float = 90) -> ApacheKafka:
        """Stop (if running) and start again on the same port and log directory."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Kill the broker and remove its folder (the log is kept if it died by itself)."""
        died = self.process is not None and self.process.poll() is not None \
            and self.process.returncode not in (-signal.SIGKILL, -signal.SIGTERM, 0, 143)
        if self._archive is not None:  # the JVM writes the archive on a clean exit only
            self.stop()
        self.thaw()
        self.kill()
        if not died:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ApacheKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- topics ---------------------------------------------------------------------------

    def create_topics(self, *names: str, partitions: int = 1, config: dict | None = None
                      ) -> None:
        """Create topics (idempotent) with the cluster's replication factor and wait until
        every partition has a leader."""
        create_topics(self.bootstrap_servers, names, partitions, config)


def create_topics(bootstrap: str, names: tuple[str, ...], partitions: int = 1,
                  config: dict | None = None) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, partitions, config=config or {})
                                   for n in names])
    for future in futures.values():
        try:
            future.result(30)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    # Created means committed by the controller: the brokers learn it a moment later, and a
    # stream started now would find no such topic.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        topics = admin.list_topics(timeout=5).topics
        if all(n in topics and len(topics[n].partitions) == partitions and all(
                p.leader >= 0 for p in topics[n].partitions.values()) for n in names):
            return
        time.sleep(0.05)
    raise TimeoutError(f"topics {names} have no leaders after 30 s")


class KafkaCluster:
    """Three Apache Kafka nodes on loopback (each a broker and a KRaft voter): topics get
    three replicas, ``min.insync.replicas=2``, so one node can die without losing a write
    acknowledged with ``acks=all`` (librdkafka's default)."""

    def __init__(self, size: int = 3):
        self.workdir = Path(tempfile.mkdtemp(prefix="apache-kafka-cluster-"))
        controller_ports = [_free_port() for _ in range(size)]
        voters = ",".join(f"{i + 1}@127.0.0.1:{p}" for i, p in enumerate(controller_ports))
        cluster_id = _random_id()
        self.nodes = [ApacheKafka(node_id=i + 1, controller_port=controller_ports[i],
                                  voters=voters, replicas=size, cluster_id=cluster_id,
                                  workdir=self.workdir / f"node{i + 1}")
                      for i in range(size)]
        for node in self.nodes:
            node.dir.mkdir(parents=True)
        self.bootstrap_servers = ",".join(n.bootstrap_servers for n in self.nodes)
        self.started_in: float | None = None

    def start(self, timeout: float = 120) -> KafkaCluster:
        started = time.monotonic()
        for node in self.nodes:  # the voters find each other: start all, then wait
            node.start(wait=False)
        for node in self.nodes:
            node.wait_ready(timeout, brokers=len(self.nodes))
        _create_offsets_topic(self.bootstrap_servers, timeout)
        self.started_in = time.monotonic() - started
        return self

    def create_topics(self, *names: str, partitions: int = 1, config: dict | None = None
                      ) -> None:
        create_topics(self.bootstrap_servers, names, partitions, config)

    def leader_of(self, topic: str, partition: int = 0) -> ApacheKafka:
        """The node that leads ``topic``'s ``partition`` now."""
        from confluent_kafka.admin import AdminClient

        live = ",".join(n.bootstrap_servers for n in self.nodes if n.running)
        admin = AdminClient({"bootstrap.servers": live, "log_level": 0})
        deadline = time.monotonic() + 30
        while True:
            found = admin.list_topics(topic, timeout=10).topics[topic].partitions.get(partition)
            if found is not None and found.leader >= 0:
                return next(n for n in self.nodes if n.node_id == found.leader)
            assert time.monotonic() < deadline, f"{topic}/{partition} has no leader"
            time.sleep(0.1)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- storage ----------------------------------------------------------------------------

_ARCHIVING: list[ApacheKafka] = []  # the node writing the class-data archive, if any
_TEMPLATE: list[Path] = []  # a formatted log directory to copy, once made


def _format(log_dir: Path, cluster_id: str, node_id: int, properties: Path) -> None:
    """Format ``log_dir`` for a node, as ``kafka-storage format`` does. The tool's JVM costs
    1.5-3 s on two cores, so it runs once per process; each node then gets a copy with its
    own ids in meta.properties (the bootstrap checkpoint holds only the feature levels)."""
    if not _TEMPLATE:
        template = Path(tempfile.mkdtemp(prefix="apache-kafka-format-")) / "data"
        config = properties.read_text().replace(f"log.dirs={log_dir}\n",
                                                f"log.dirs={template}\n")
        (template.parent / "format.properties").write_text(config)
        done = subprocess.run(
            [java(), "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-XX:-UsePerfData",
             "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn", "-cp", f"{kafka_libs()}/*",
             # --cluster-id=: an id may start with "-", which the tool's parser would read
             # as an option of its own (a usage error, one process in 64)
             "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
             f"--config={template.parent / 'format.properties'}"],
            capture_output=True, text=True)
        if done.returncode != 0:
            raise KafkaUnavailable(f"kafka-storage format failed: {done.stdout}{done.stderr}")
        _TEMPLATE.append(template)
        atexit.register(shutil.rmtree, template.parent, True)
    shutil.copytree(_TEMPLATE[0], log_dir)
    meta = log_dir / "meta.properties"
    lines = [line for line in meta.read_text().splitlines()
             if not line.startswith(("node.id=", "directory.id=", "cluster.id="))]
    meta.write_text("\n".join([*lines, f"node.id={node_id}", f"directory.id={_random_id()}",
                               f"cluster.id={cluster_id}"]) + "\n")


def _create_offsets_topic(bootstrap: str, timeout: float) -> None:
    # The first group coordinator lookup creates __consumer_offsets (~3 s here): done at
    # start-up, so that a test's first group join is as fast as every other.
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "log_level": 0,
                         "group.id": "warm-up", "enable.auto.commit": False})
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                consumer.committed([TopicPartition("warm-up", 0)], timeout=5)
                return
            except KafkaException:  # NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        consumer.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False
