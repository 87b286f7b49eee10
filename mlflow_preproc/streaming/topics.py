"""The broker and the topics at start-up: wait for the broker, check the topics by the one
rule (the input topic must exist; the output and dead-letter topics may be created), create
topics.

The rule is :func:`missing_outputs`, for the loop here and for a deployment's checks
(``deploy/broker_checks.py``) before anything is built; :func:`create_topics` is the one
way the package creates topics (the loop, the replay log, the embedded broker).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from mlflow_preproc.config import Config
from mlflow_preproc.streaming import clients
from mlflow_preproc.streaming.client_logs import client_logger
from mlflow_preproc.streaming.errors import FatalError
from mlflow_preproc.streaming.no_broker import cannot_reach, local_broker_command
from mlflow_preproc.streaming.shutdown import Shutdown

logger = logging.getLogger("mlflow_preproc")

STARTUP_WAIT_S = 60.0


class InputTopicMissing(LookupError):
    """The input topic does not exist: nothing creates it (its partitions are the user's)."""


class OutputsMissing(LookupError):
    """Output or dead-letter topics do not exist and may not be created."""

    def __init__(self, topics: list[str]):
        super().__init__(", ".join(topics))
        self.topics = topics


def missing_outputs(existing: Collection[str], input_topic: str,
                    outputs: Iterable[str | None], auto_create: bool) -> list[str]:
    """The rule: ``input_topic`` must exist (else :class:`InputTopicMissing`); the
    ``outputs`` (output and dead-letter topics; None for one not named) may be missing when
    ``auto_create`` (AUTO_CREATE_TOPICS), else :class:`OutputsMissing`. Returns the missing
    ones, to create."""
    if input_topic not in existing:
        raise InputTopicMissing(input_topic)
    missing = [t for t in outputs if t and t not in existing]
    if missing and not auto_create:
        raise OutputsMissing(missing)
    return missing


def input_missing(input_topic: str, servers: str) -> FatalError:
    """What stops the loop when its input topic does not exist."""
    return FatalError(f"input topic {input_topic} does not exist on {servers}; create it or "
                      "fix INPUT_TOPIC")


def create_topics(admin: AdminClient, names: Iterable[str], partitions: int = 1,
                  replication_factor: int = -1, timeout: float = 30.0
                  ) -> dict[str, Exception | None]:
    """Create ``names`` (``replication_factor`` -1: the broker's default); one created
    meanwhile (TOPIC_ALREADY_EXISTS) counts as created. Returns, by name in order, None or
    the exception that kept it from being created."""
    outcome: dict[str, Exception | None] = {}
    for topic, future in admin.create_topics(
            [NewTopic(t, partitions, replication_factor) for t in names]).items():
        try:
            future.result(timeout)
            outcome[topic] = None
        except Exception as exc:  # noqa: BLE001 -- each caller says what it means for it
            exists = isinstance(exc, KafkaException) and \
                exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS
            outcome[topic] = None if exists else exc
    return outcome


def check_topics(config: Config, consumer, shutdown: Shutdown, input_topic: str,
                 outputs: list[str]) -> bool:
    """Wait for the broker, apply :func:`missing_outputs`, create what is missing with the
    input topic's partition count; False if stopped while waiting."""
    metadata = wait_for_metadata(config, consumer, shutdown)
    if metadata is None:
        return False
    try:
        missing = missing_outputs(metadata.topics, input_topic, outputs,
                                  config["AUTO_CREATE_TOPICS"])
    except InputTopicMissing:
        raise input_missing(input_topic, config["KAFKA_BOOTSTRAP_SERVERS"]) from None
    except OutputsMissing as exc:
        raise FatalError(f"topic(s) {', '.join(exc.topics)} do not exist and "
                         "AUTO_CREATE_TOPICS is false; create them or set "
                         "AUTO_CREATE_TOPICS=true") from None
    if not missing:
        return True
    partitions = len(metadata.topics[input_topic].partitions)
    admin = clients.make_client(config, AdminClient, {**config.kafka, "logger": client_logger()})
    # No replication factor: the broker's default.replication.factor decides, as it does
    # for topics the broker creates itself.
    for topic, error in create_topics(admin, missing, partitions).items():
        if error is None:
            logger.info("created topic", extra={"event": "create_topic", "topic": topic,
                                                "partitions": partitions})
        elif isinstance(error, KafkaException):
            raise FatalError(f"cannot create topic {topic}: {error.args[0].str()}; "
                             "create it yourself") from None
        else:
            raise error
    return True


def wait_for_metadata(config: Config, consumer, shutdown: Shutdown):
    """The cluster's metadata, waiting up to :data:`STARTUP_WAIT_S` for the broker to
    answer (FatalError then); None if stopped meanwhile."""
    deadline = time.monotonic() + STARTUP_WAIT_S
    delay = 0.5
    while not shutdown.requested:
        try:
            return consumer.list_topics(timeout=1)
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise FatalError(cannot_reach(config["KAFKA_BOOTSTRAP_SERVERS"],
                                              exc.args[0].str())) from None
            left = max(0.0, deadline - time.monotonic())
            servers = config["KAFKA_BOOTSTRAP_SERVERS"]
            local = local_broker_command(servers)  # a newcomer may not have started one
            also = f" (to try things on this machine, {local} runs one there)" \
                if local else ""
            logger.warning(
                f"waiting for Kafka at {servers}{also}; giving up in {left:.0f} s",
                extra={"event": "waiting_for_kafka", "error": exc.args[0].str(),
                       "gives_up_in_s": round(left)})
            shutdown.sleep(delay)
            delay = min(delay * 2, 5.0)
    return None
