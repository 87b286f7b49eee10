"""ACLs on a real Apache Kafka broker (SASL/PLAIN users, the standard authorizer): a topic or
group the broker refuses this client is the configuration's fault, never the records'
(#32 finding 6: a missing write ACL on the output topic made 50 of 50 records dead letters
and committed them)."""

from __future__ import annotations

import json

import mlflow
import pytest

from conftest import _apache_kafka_or_skip, committed_offsets, consume, produce, stream_env
from conftest import unique
from verdict_cells import verdict

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

USER, PASSWORD = "stream", "stream-secret"


@pytest.fixture(scope="module")
def acl_broker():
    broker = _apache_kafka_or_skip().ApacheKafka(sasl_users={USER: PASSWORD})
    with broker:
        yield broker


def allow(broker, *grants: tuple[str, str, str]) -> None:
    """Grant the stream's user (resource type, name, operation) ACLs, by the admin."""
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    bindings = [AclBinding(getattr(ResourceType, kind), name, ResourcePatternType.LITERAL,
                           f"User:{USER}", "*", getattr(AclOperation, operation),
                           AclPermissionType.ALLOW) for kind, name, operation in grants]
    for future in admin.create_acls(bindings).values():
        future.result(30)


def same(record):
    return record


@pytest.fixture
def model(tracking_uri):
    with mlflow.start_run():
        return mlflow.preproc.log_model(same, name="s", pip_requirements=[]).model_uri


def as_the_user(broker) -> dict[str, str]:
    return {"KAFKA_BOOTSTRAP_SERVERS": broker.sasl_bootstrap_servers,
            "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "LIBRDKAFKA_SASL_MECHANISM": "PLAIN",
            "LIBRDKAFKA_SASL_USERNAME": USER, "LIBRDKAFKA_SASL_PASSWORD": PASSWORD}


@verdict("produce output", "auth/ACL refused")
def test_an_output_topic_without_a_write_acl_stops_the_stream_and_commits_nothing(
        acl_broker, streams, model):
    topic, out = unique("raw"), unique("out")
    acl_broker.create_topics(topic, out, f"{topic}-dlq")
    produce(acl_broker.bootstrap_servers, topic,
            [json.dumps({"id": i}).encode() for i in range(50)])
    env = {**stream_env(acl_broker.bootstrap_servers, model, topic, OUTPUT_TOPIC=out),
           **as_the_user(acl_broker)}
    allow(acl_broker, ("TOPIC", topic, "READ"), ("TOPIC", topic, "DESCRIBE"),
          ("GROUP", env["CONSUMER_GROUP_ID"], "READ"), ("TOPIC", out, "DESCRIBE"),
          ("TOPIC", f"{topic}-dlq", "WRITE"), ("TOPIC", f"{topic}-dlq", "DESCRIBE"))
    stream = streams(env)
    assert stream.proc.wait(120) == 2, stream.text()[-3000:]
    last = stream.text().strip().splitlines()[-1]
    assert f"cannot write to the output topic {out}" in last, last
    assert "TOPIC_AUTHORIZATION_FAILED" in last and "ACLs" in last and PASSWORD not in last
    assert consume(acl_broker.bootstrap_servers, f"{topic}-dlq", 1, timeout=2) == []
    assert committed_offsets(acl_broker.bootstrap_servers, env["CONSUMER_GROUP_ID"],
                             topic) == [-1001]


@verdict("commit", "auth/ACL refused")
def test_a_group_without_a_read_acl_stops_the_stream_naming_it(acl_broker, streams, model):
    topic, out = unique("raw"), unique("out")
    acl_broker.create_topics(topic, out, f"{topic}-dlq")
    produce(acl_broker.bootstrap_servers, topic, [json.dumps({"id": 1}).encode()])
    env = {**stream_env(acl_broker.bootstrap_servers, model, topic, OUTPUT_TOPIC=out),
           **as_the_user(acl_broker)}
    allow(acl_broker, ("TOPIC", topic, "READ"), ("TOPIC", topic, "DESCRIBE"),
          ("TOPIC", out, "WRITE"), ("TOPIC", out, "DESCRIBE"),
          ("TOPIC", f"{topic}-dlq", "WRITE"), ("TOPIC", f"{topic}-dlq", "DESCRIBE"))
    stream = streams(env)
    assert stream.proc.wait(120) == 2, stream.text()[-3000:]
    last = stream.text().strip().splitlines()[-1]
    assert f"refuses this client the consumer group {env['CONSUMER_GROUP_ID']}" in last, last
    assert consume(acl_broker.bootstrap_servers, out, 1, timeout=2) == []
