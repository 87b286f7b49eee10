"""Kafka consumer mode: consume INPUT_TOPIC, run the model's preprocessing, produce OUTPUT_TOPIC.

Each batch goes through the data path top to bottom:

    message in -> decode -> drop fields -> pre_processing -> encode -> message out

A message that fails at any stage goes to the dead-letter topic with the stage and the error;
delivery, commits, rebalances and shutdown are :class:`~mlflow_preproc.streaming.loop.KafkaLoop`'s.
Run it with ``mlflow-preproc stream`` or, from Python, ``Stream.from_config(config).run()``.
"""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import Message

from mlflow_preproc.config import Config, ConfigError, sanitize_topic
from mlflow_preproc.runtime.flavor import LoadedPreprocessing, load_preprocessing
from mlflow_preproc.runtime.formats import EncodeError, MessageDecoder, MessageEncoder
from mlflow_preproc.streaming.loop import KafkaLoop
from mlflow_preproc.runtime.model_identity import ModelIdentity, resolve_model
from mlflow_preproc.runtime.records import RecordError


class Stream(KafkaLoop):
    """Preprocess a Kafka topic into another, at least once."""

    command = "stream"

    def __init__(self, config: Config, preprocessing: LoadedPreprocessing,
                 identity: ModelIdentity, output_topic: str):
        input_topic = config.require("INPUT_TOPIC")
        super().__init__(config, input_topic, output_topic, config["DLQ_TOPIC"],
                         config["CONSUMER_GROUP_ID"], extra_headers=identity.headers())
        self.preprocessor = preprocessing.preprocessor
        self.fields_to_drop = config.drop_fields()
        schema = _schema(config["AVRO_SCHEMA_PATH"]) or preprocessing.avro_schema
        out_schema = _schema(config["OUTPUT_AVRO_SCHEMA_PATH"]) or preprocessing.output_avro_schema
        try:
            # Dropped top-level fields are skipped by the decoder, never decoded.
            self.decoder = MessageDecoder(config["INPUT_FORMAT"], schema,
                                          config["AVRO_SCHEMA_DIR"],
                                          config["SCHEMA_REGISTRY_URL"],
                                          skip=self.fields_to_drop)
            self.encoder = MessageEncoder(config["OUTPUT_FORMAT"], out_schema,
                                          config["SCHEMA_REGISTRY_URL"], topic=output_topic)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_config(cls, config: Config) -> Stream:
        """Load the model named by ``MODEL_URI`` and resolve the output topic."""
        model_uri = config.require("MODEL_URI")
        identity = resolve_model(model_uri)
        preprocessing = load_preprocessing(identity.download_uri)
        return cls(config, preprocessing, identity, default_output_topic(config, identity))

    def handle_batch(self, messages: Sequence[Message]) -> None:
        # decode, drop fields
        records, owners = self.decode(messages, self.decoder, self.fields_to_drop)

        # pre_processing: the whole batch at once; a failing record fails alone
        results = self.preprocessor.process_each(records)

        # encode and produce
        encode = self.encoder.encode
        dropped = 0
        for msg, result in zip(owners, results):
            if isinstance(result, RecordError):
                self.dead_letter(msg, "preprocess", result)
                continue
            if not result:
                dropped += 1
                continue
            try:
                values = [encode(out) for out in result]
            except EncodeError as exc:
                self.dead_letter(msg, "encode", exc)
                continue
            self.produce(msg, values)
        self.stats.counts["dropped"] += dropped


def default_output_topic(config: Config, identity: ModelIdentity) -> str:
    """``OUTPUT_TOPIC``, else ``{model_name}-{version}-{KAFKA_TOPIC_SUFFIX}`` (legacy naming)."""
    if config["OUTPUT_TOPIC"]:
        return config["OUTPUT_TOPIC"]
    if identity.name is None:
        raise ConfigError(f"OUTPUT_TOPIC is not set and {identity.uri} is not a registered "
                          "model version, so no default topic name can be made; set "
                          "OUTPUT_TOPIC or use a models:/<name>/<version> URI")
    return sanitize_topic(f"{identity.name}-{identity.version}-{config['KAFKA_TOPIC_SUFFIX']}")


def _schema(path: str | None) -> dict | None:
    if not path:
        return None
    from mlflow_preproc.runtime.avro_schemas import SchemaError, load_avro_schema

    try:
        return load_avro_schema(path)
    except SchemaError as exc:
        raise ConfigError(str(exc)) from None

