"""What a deployment's broker says before anything is built: it answers, the topics exist.

Both backends ask it: Docker checks the topics its containers will use; Kubernetes reads the
input topic's partition count for the autoscaler's cap when the broker is reachable from here.
"""

from __future__ import annotations

import logging

from mlflow_preproc import config as settings
from mlflow_preproc.deploy.errors import DeploymentError


def check_topics(cfg: settings.Config) -> None:
    """The broker answers with this configuration and the input topic exists; the output
    and dead-letter topics exist or may be created."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from mlflow_preproc.streaming.topics import InputTopicMissing, OutputsMissing, missing_outputs

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
    try:
        missing_outputs(topics, input_topic,
                        [cfg["OUTPUT_TOPIC"], cfg["DLQ_TOPIC"] or f"{input_topic}-dlq"],
                        cfg["AUTO_CREATE_TOPICS"])
    except InputTopicMissing:
        raise DeploymentError(f"input topic {input_topic} does not exist on {servers}; create "
                              "it or fix -C input_topic=...") from None
    except OutputsMissing as exc:
        raise DeploymentError(f"topic(s) {', '.join(exc.topics)} do not exist on {servers} "
                              "and auto_create_topics is false; create them first") from None


def partitions_if_reachable(cfg: settings.Config) -> int | None:
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


def _quiet_logger() -> logging.Logger:
    quiet = logging.getLogger("mlflow_preproc.deploy.librdkafka")
    quiet.setLevel(logging.CRITICAL)  # the checks report their own one-line error
    return quiet
