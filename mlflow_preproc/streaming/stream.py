"""Kafka consumer mode: consume INPUT_TOPIC, run the model's preprocessing, produce OUTPUT_TOPIC.

Each batch goes through the data path top to bottom:

    message in -> decode -> drop fields -> pre_processing [-> predict] -> encode -> message out

With a prediction model (``PREDICTION_MODEL_URI``, ``--prediction-model-uri``) the preprocessed
features of the batch go to the model in the same process, and what is produced is one record
per prediction: the ``KEEP_FIELDS`` of the input and the prediction.

A message that fails at any stage goes to the dead-letter topic with the stage and the error;
delivery, commits, rebalances and shutdown are :class:`~mlflow_preproc.streaming.loop.KafkaLoop`'s.
Run it with ``mlflow-preproc stream`` or, from Python, ``Stream.from_config(config).run()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from confluent_kafka import Consumer, Message, Producer

from mlflow_preproc.config import Config, ConfigError, sanitize_topic
from mlflow_preproc.runtime.flavor import LoadedPreprocessing, load_preprocessing
from mlflow_preproc.runtime.formats import EncodeError, MessageDecoder, MessageEncoder
from mlflow_preproc.runtime.input_fields import Tree
from mlflow_preproc.runtime.input_fields import merge as merge_fields
from mlflow_preproc.runtime.input_fields import parse as parse_fields
from mlflow_preproc.streaming.headers import (FAILED_RECORDS, MODEL, PREDICTION_MODEL,
                                              error_type_of)
from mlflow_preproc.streaming.loop import KafkaLoop
from mlflow_preproc.streaming.shutdown import Shutdown
from mlflow_preproc.runtime.model_identity import (
    ModelIdentity,
    local_identity,
    resolve_model,
)
from mlflow_preproc.runtime.prediction import PredictionError, Predictor
from mlflow_preproc.runtime.records import COLUMNAR_FORMATS, RecordError

logger = logging.getLogger("mlflow_preproc")


class Stream(KafkaLoop):
    """Preprocess a Kafka topic into another, at least once."""

    command = "stream"

    def __init__(self, config: Config, preprocessing: LoadedPreprocessing,
                 identity: ModelIdentity, output_topic: str, shutdown: Shutdown | None = None,
                 predictor: Predictor | None = None, consumer: Consumer | None = None,
                 producer: Producer | None = None):
        input_topic = config.require("INPUT_TOPIC")
        headers = [(MODEL, identity.provenance.encode())]
        if predictor is not None:
            headers.append((PREDICTION_MODEL, predictor.uri.encode()))
        super().__init__(config, input_topic, output_topic, config["DLQ_TOPIC"],
                         config["CONSUMER_GROUP_ID"] or default_group(identity),
                         extra_headers=headers, shutdown=shutdown, consumer=consumer,
                         producer=producer)
        self.preprocessor = preprocessing.preprocessor
        self.predictor = predictor
        self.fields_to_drop = config.drop_fields()
        schema = _schema(config["AVRO_SCHEMA_PATH"]) or preprocessing.avro_schema
        out_schema = _schema(config["OUTPUT_AVRO_SCHEMA_PATH"]) or preprocessing.output_avro_schema
        try:
            # Dropped top-level fields are skipped by the decoder, never decoded.
            self.decoder = MessageDecoder(config["INPUT_FORMAT"], schema,
                                          config["AVRO_SCHEMA_DIR"],
                                          config["SCHEMA_REGISTRY_URL"],
                                          skip=self.fields_to_drop,
                                          max_decoded_bytes=config["MAX_DECODED_BYTES"],
                                          fields=_decoded_fields(self.preprocessor.fields,
                                                                 predictor))
            # With polars-avro (the columnar extra), Avro messages are read a batch at once.
            self.columns = _column_reader(config, self.decoder, self.fields_to_drop)
            self.encoder = MessageEncoder(config["OUTPUT_FORMAT"], out_schema,
                                          config["SCHEMA_REGISTRY_URL"], topic=output_topic)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_config(cls, config: Config, shutdown: Shutdown | None = None,
                    model_path: str | None = None) -> Stream:
        """Load the model named by ``MODEL_URI`` (or the one at ``model_path``, in an image,
        ``MODEL_URI`` then only naming it) and resolve the output topic."""
        if model_path:
            identity = local_identity(model_path, config["MODEL_URI"])
        else:
            identity = resolve_model(config.require("MODEL_URI"))
        preprocessing = load_preprocessing(identity.download_uri)
        # Before the prediction model, the broker and the first record: a start whose
        # reference records give other outputs than logged is refused with the diff.
        preprocessing.check_parity(identity.uri, config["PARITY_CHECK"])
        predictor = None
        if config["PREDICTION_MODEL_URI"]:
            predictor = Predictor.load(config["PREDICTION_MODEL_URI"],
                                       config.comma_list("KEEP_FIELDS"))
        return cls(config, preprocessing, identity, default_output_topic(config, identity),
                   shutdown, predictor)

    def handle_batch(self, messages: Sequence[Message]) -> None:
        if self.columns is not None and self.predictor is None and \
                self.preprocessor.batch_format in COLUMNAR_FORMATS:
            # decode into columns, pre_processing over them: no record is built
            results, owners = self._process_columns(messages)
        else:
            # decode, drop fields
            records, owners = self.decode(messages, self.decoder, self.fields_to_drop,
                                          self.columns)

            # pre_processing: the whole batch at once; a failing record fails alone
            results = self.preprocessor.process_each(records)

            # predict, with a prediction model: every output of the batch at once
            if self.predictor is not None:
                results = self._predict(records, results)

        if self.columns is not None and self.columns.stuck and not self.stats.degraded:
            self.stats.degraded = self.columns.stuck
            logger.error("the column reader is stuck; decoding goes on without it", extra={
                "event": "column_reader_stuck", "error": self.columns.stuck})

        # encode and produce, message by message (an Avro container may hold many records)
        if not self.encoder.prepared:  # the output schema registered, the registry waited for
            self.when_available(self.encoder.prepare)
        encode, produce = self.encoder.encode, self.produce
        dropped = 0
        for msg, first, last in _spans(owners, messages):
            failures: list[tuple[int, str, BaseException]] = []
            for index in range(first, last):
                result = results[index]
                if isinstance(result, (RecordError, PredictionError)):
                    stage = "predict" if isinstance(result, PredictionError) else "preprocess"
                    failures.append((index - first, stage, result))
                elif not result:
                    dropped += 1
                else:
                    try:
                        values = [encode(out) for out in result]
                    except EncodeError as exc:
                        failures.append((index - first, "encode", exc))
                        continue
                    produce(msg, values)
            if failures:
                self._dead_letter_records(msg, last - first, failures)
        self.stats.counts["dropped"] += dropped

    def _process_columns(self, messages: Sequence[Message]) -> tuple[list, list[Message]]:
        """A columnar ``batch_format``: the results of the records of ``messages`` and the
        message of each. The containers the column reader takes are one table; the rest
        (damaged, compressed, of another format) are decoded as records, and judged, as ever."""
        table, rows = self.columns.table([msg.value() for msg in messages])
        results = self.preprocessor.process_columns(table) if table is not None else []
        owners = [messages[i] for i in rows]
        taken = set(rows)
        records, others = self.decode([m for i, m in enumerate(messages) if i not in taken],
                                      self.decoder, self.fields_to_drop)
        return results + self.preprocessor.process_each(records), owners + others

    def _dead_letter_records(self, msg: Message, count: int,
                             failures: list[tuple[int, str, BaseException]]) -> None:
        """One dead letter per input message, however many of its records failed: the
        whole message, the stage and error of its first failure, and, for a message of
        several records, the indexes in the message of those that failed."""
        index, stage, error = failures[0]
        reason = error.reason if isinstance(error, RecordError) else str(error)
        if count == 1:
            self.dead_letter(msg, stage, reason, error_type_of(error))
            return
        listed = "; ".join(
            f"record {i}: {e.reason if isinstance(e, RecordError) else e}"
            for i, _, e in failures[:5])
        self.dead_letter(
            msg, stage, f"{len(failures)} of the message's {count} records failed; {listed}",
            error_type_of(error),
            extra_headers=[(FAILED_RECORDS,
                            ",".join(str(i) for i, _, _ in failures).encode())])

    def _predict(self, records: list, results: list) -> list:
        features = [out for result in results if not isinstance(result, RecordError)
                    for out in result]
        predictions = iter(self.predictor.predict_each(features))
        predicted: list = []
        for record, result in zip(records, results):
            if isinstance(result, RecordError):
                predicted.append(result)
                continue
            mine = [next(predictions) for _ in result]
            failed = next((p for p in mine if isinstance(p, PredictionError)), None)
            predicted.append(failed or [self.predictor.output(record, features_, prediction)
                                        for features_, prediction in zip(result, mine)])
        return predicted


def _spans(owners: Sequence[Message], messages: Sequence[Message]
           ) -> Iterable[tuple[Message, int, int]]:
    """``(message, first, last)``: the records ``owners[first:last]`` came from ``message``
    (a message's records are consecutive). ``messages`` is the batch: when each of its
    messages has one record, in its order, the spans are had without a loop."""
    if len(owners) == len(messages) and owners == list(messages):
        # one record per message, the common case: no Python loop over owners (a list
        # comparison of the same objects is one C loop over identities)
        return zip(messages, range(len(owners)), range(1, len(owners) + 1))
    spans: list[tuple[Message, int, int]] = []
    first = 0
    for i in range(1, len(owners) + 1):
        if i == len(owners) or owners[i] is not owners[first]:
            spans.append((owners[first], first, i))
            first = i
    return spans


def default_group(identity: ModelIdentity) -> str:
    """The consumer group when ``CONSUMER_GROUP_ID`` is not set: one per model, so instances of
    one model share a topic's partitions and two different models each see every record."""
    if identity.name:
        return sanitize_topic(f"mlflow-preproc-{identity.name}")
    if identity.uri.startswith("models:/m-"):
        return sanitize_topic(f"mlflow-preproc-{identity.uri[len('models:/'):]}")
    return "mlflow-preproc-stream"


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


def _column_reader(config: Config, decoder: MessageDecoder, drop: Sequence[str]):
    """The :class:`~mlflow_preproc.runtime.avro_columns.ColumnReader` of an Avro stream
    (containers, or Confluent-framed records with the decoder's schemas by id) when
    polars-avro is installed, else None (the message decoder reads every message)."""
    if config["INPUT_FORMAT"] not in ("avro", "confluent-avro") or not config["AVRO_COLUMNS"]:
        return None
    from mlflow_preproc.runtime import avro_columns  # imports polars, when it is installed

    if not avro_columns.installed():
        return None
    by_id = decoder.writer_schema if config["INPUT_FORMAT"] == "confluent-avro" else None
    return avro_columns.ColumnReader(decoder.fields, drop, config["MAX_DECODED_BYTES"], by_id)


def _decoded_fields(fields: Tree | None, predictor: Predictor | None) -> Tree | None:
    """What the decoder reads: the model's input fields, and the KEEP_FIELDS a prediction
    carries (the function sees only the former)."""
    if fields is None or predictor is None or not predictor.keep_fields:
        return fields
    return merge_fields(fields, parse_fields(predictor.keep_fields))
