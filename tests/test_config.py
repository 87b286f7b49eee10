"""The settings table: legacy names, pass-through, errors, and the copy of it in docs/reference.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlflow_preproc import config
from mlflow_preproc.config import ZTF_CUTOUTS

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


def test_legacy_variables_are_read():
    cfg = config.load("stream", environ={
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092", "INPUT_TOPIC": "fink-alert",
        "OUTPUT_TOPIC": "preprocessed", "INPUT_FORMAT": "avro", "OUTPUT_FORMAT": "json",
        "CONSUMER_GROUP_ID": "preprocessing-group", "AUTO_OFFSET_RESET": "latest",
        "SKIP_CUTOUTS": "true", "BATCH_SIZE": "10", "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
    })
    assert cfg["INPUT_TOPIC"] == "fink-alert" and cfg["BATCH_SIZE"] == 10
    assert cfg.kafka == {"bootstrap.servers": "kafka:9092", "security.protocol": "PLAINTEXT"}
    assert cfg.drop_fields() == list(ZTF_CUTOUTS)


def test_librdkafka_pass_through_and_properties_file(tmp_path):
    props = tmp_path / "client.properties"
    props.write_text("# comment\nsasl.mechanism=PLAIN\nbootstrap.servers=file:9092\n")
    cfg = config.load("stream", environ={"KAFKA_CONFIG_FILE": str(props),
                                         "LIBRDKAFKA_SASL_USERNAME": "alice",
                                         "KAFKA_ENABLED": "true"})
    assert cfg.kafka == {"sasl.mechanism": "PLAIN", "bootstrap.servers": "file:9092",
                         "sasl.username": "alice"}
    assert cfg.kafka_sources["sasl.mechanism"] == f"{props} line 2 (KAFKA_CONFIG_FILE)"
    assert cfg.kafka_sources["sasl.username"] == "LIBRDKAFKA_SASL_USERNAME"


def test_kubernetes_service_variables_are_not_librdkafka_settings():
    # Kubernetes sets these for a Service named `kafka` in the pod's namespace.
    cfg = config.load("stream", environ={
        "KAFKA_PORT": "tcp://10.0.0.7:9092", "KAFKA_SERVICE_HOST": "10.0.0.7",
        "KAFKA_SERVICE_PORT": "9092", "KAFKA_PORT_9092_TCP_PROTO": "tcp",
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"})
    assert cfg.kafka == {"bootstrap.servers": "kafka:9092"}


def test_the_config_file_flag_is_read(tmp_path):
    import argparse

    props = tmp_path / "client.properties"
    props.write_text("bootstrap.servers=from-file:9092\nclient.id=flagged\n")
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, "stream")
    cfg = config.load("stream", parser.parse_args(["--kafka-config-file", str(props)]),
                      environ={})
    assert cfg.kafka == {"bootstrap.servers": "from-file:9092", "client.id": "flagged"}
    assert cfg["KAFKA_BOOTSTRAP_SERVERS"] == "from-file:9092"


def test_a_property_librdkafka_refuses_names_the_variable_that_set_it():
    from confluent_kafka import KafkaException, Producer

    cfg = config.load("stream", environ={"LIBRDKAFKA_LINGER_MSS": "5"})
    with pytest.raises(KafkaException) as refused:  # librdkafka's own check, no broker needed
        Producer(cfg.kafka)
    error = config.client_config_error(cfg, refused.value.args[0].str())
    assert str(error).startswith("LIBRDKAFKA_LINGER_MSS sets the librdkafka property "
                                 "'linger.mss', which librdkafka refuses (No such "
                                 "configuration property")


@pytest.mark.parametrize("variable, prop", [
    ("LIBRDKAFKA_SESSION_TIMEOUT_MS", "session.timeout.ms"),
    ("LIBRDKAFKA_PARTITION_ASSIGNMENT_STRATEGY", "partition.assignment.strategy")])
def test_a_classic_group_setting_with_the_consumer_group_protocol_names_its_variable(
        variable, prop):
    # KIP-848 groups (group.protocol=consumer, Kafka 4's protocol) leave sessions and
    # assignment to the broker; librdkafka refuses the classic settings, naming them in
    # backquotes, not in double quotes like an unknown property.
    from confluent_kafka import Consumer, KafkaException

    cfg = config.load("stream", environ={"LIBRDKAFKA_GROUP_PROTOCOL": "consumer",
                                         variable: "6000" if "TIMEOUT" in variable else "range"})
    with pytest.raises(KafkaException) as refused:
        Consumer({**cfg.kafka, "group.id": "g"})
    error = config.client_config_error(cfg, refused.value.args[0].str())
    assert str(error).startswith(f"{variable} sets the librdkafka property {prop!r}, which "
                                 "librdkafka refuses"), error


def test_flags_override_environment():
    import argparse

    parser = argparse.ArgumentParser()
    config.add_arguments(parser, "stream")
    args = parser.parse_args(["--input-topic", "from-flag", "--kafka-bootstrap-servers", "f:1"])
    cfg = config.load("stream", args, environ={"INPUT_TOPIC": "from-env",
                                               "KAFKA_BOOTSTRAP_SERVERS": "e:1"})
    assert cfg["INPUT_TOPIC"] == "from-flag" and cfg.kafka["bootstrap.servers"] == "f:1"


@pytest.mark.parametrize("env, message", [
    ({"BATCH_SIZE": "many"}, "BATCH_SIZE='many' is not a valid int; e.g. BATCH_SIZE=100"),
    ({"SKIP_CUTOUTS": "maybe"}, "SKIP_CUTOUTS='maybe' is not a boolean; use true or false"),
    ({"AUTO_OFFSET_RESET": "middle"}, "AUTO_OFFSET_RESET='middle' is not one of earliest, latest"),
])
def test_invalid_values_name_the_variable(env, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(")):
        config.load("stream", environ=env)


def test_missing_required_setting_names_flag_variable_and_example():
    cfg = config.load("bridge", environ={})
    with pytest.raises(config.ConfigError, match=r"API_URL is not set; set it \(--api-url or "
                       r"the environment variable\), e.g. API_URL=http://127.0.0.1:8080"):
        cfg.require("API_URL")


def test_topic_names_are_sanitised():
    assert config.sanitize_topic("Fink Preproc/v1-2-cleaned") == "Fink-Preproc-v1-2-cleaned"


def test_the_reference_shows_the_current_settings_and_deployment_keys_tables():
    from mlflow_preproc.deploy.options import options_table_markdown

    assert config.settings_table_markdown() in REFERENCE.read_text()
    assert options_table_markdown() in REFERENCE.read_text()


@pytest.mark.parametrize("mode, env, message", [
    # -1 made consume() block forever, so SIGTERM was never acted on
    ("stream", {"BATCH_TIMEOUT_MS": "-1"}, "BATCH_TIMEOUT_MS=-1 is below its minimum 0"),
    # a negative timeout made the shutdown flush unbounded
    ("stream", {"SHUTDOWN_TIMEOUT_S": "-5"}, "SHUTDOWN_TIMEOUT_S=-5 is below its minimum 0"),
    ("stream", {"BATCH_SIZE": "0"}, "BATCH_SIZE=0 is below its minimum 1"),
    ("stream", {"COMMIT_INTERVAL_MS": "-1"}, "COMMIT_INTERVAL_MS=-1 is below its minimum 0"),
    ("stream", {"METRICS_PORT": "70000"}, "METRICS_PORT=70000 is above its maximum 65535"),
    ("stream", {"STATS_INTERVAL_S": "0"}, "STATS_INTERVAL_S=0 is below its minimum 0.1"),
    ("stream", {"HEALTH_STALL_S": "-1"}, "HEALTH_STALL_S=-1 is below its minimum 1"),
    ("bridge", {"REQUEST_TIMEOUT_S": "0"}, "REQUEST_TIMEOUT_S=0 is below its minimum 0.1"),
    ("image", {"KAFKA_CONSUMERS": "0"}, "KAFKA_CONSUMERS=0 is below its minimum 1"),
    ("image", {"PORT": "0"}, "PORT=0 is below its minimum 1"),
])
def test_numbers_out_of_range_name_the_variable_and_the_bound(mode, env, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(mode, environ=env)


def test_every_numeric_setting_has_a_range():
    unbounded = [s.env for s in config.SETTINGS.values()
                 if s.kind in (int, float) and s.minimum is None]
    assert unbounded == []


def test_the_processing_guarantee_is_one_setting_of_the_stream_bridge_target_and_manifests():
    # issue 35: PROCESSING_GUARANTEE from the table reaches every place a setting goes: the
    # flags of stream and bridge, the environment, the -C keys of the target (and so its
    # containers and Kubernetes manifests) and `mlflow deployments help -t preproc`.
    import argparse

    from mlflow_preproc.deploy import options

    for mode in ("stream", "bridge"):
        parser = argparse.ArgumentParser()
        config.add_arguments(parser, mode)
        assert config.load(mode, parser.parse_args([]), environ={})[
            "PROCESSING_GUARANTEE"] == "at-least-once"
        assert config.load(mode, parser.parse_args(
            ["--processing-guarantee", "exactly-once"]), environ={})[
            "PROCESSING_GUARANTEE"] == "exactly-once"
        assert config.load(mode, environ={"PROCESSING_GUARANTEE": "exactly-once"})[
            "PROCESSING_GUARANTEE"] == "exactly-once"
    with pytest.raises(config.ConfigError, match="PROCESSING_GUARANTEE='exactly_once' is not "
                                                 "one of at-least-once, exactly-once"):
        config.load("stream", environ={"PROCESSING_GUARANTEE": "exactly_once"})
    assert "processing_guarantee" in options.setting_keys()
    assert "-C processing_guarantee=exactly-once" in options.help_text()
