"""A preprocessing model over Kafka rows in Spark: the stream's data path inside the tasks.

    Kafka row (key, value, topic, partition, offset, headers)
        -> decode -> drop fields -> pre_processing -> encode
        -> output row (OUTPUT_TOPIC, the input's key, value, headers with the provenance)
         | dead-letter row (DLQ_TOPIC, the input's bytes, headers with the stage and reason)

Each task hands its rows, a batch at a time, to the stream's own
:meth:`~mlflow_preproc.streaming.stream.Stream.handle_batch`, with a producer that collects
rows instead of sending them: outputs and dead letters are those of ``mlflow-preproc stream``
byte for byte, headers and reasons included, with the same settings (``INPUT_FORMAT``,
``SCHEMA_REGISTRY_URL``, ``DROP_FIELDS``, ``SKIP_CUTOUTS``, ``OUTPUT_FORMAT``, ...). The rows
go to Spark's Kafka sink as they are (a ``topic`` column per row), or to Parquet.

The dependency rule holds: a schema registry that does not answer fails the task (Spark
retries it, then the micro-batch; a restarted query starts again from its checkpoint), never
a dead letter; a registry that refuses this client stops the query with its one line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mlflow_preproc.config import Config
from mlflow_preproc.runtime.model_identity import ModelIdentity
from mlflow_preproc.spark.model_files import ShippedModel

# The columns Spark's Kafka source gives (headers with includeHeaders=true) and its sink takes.
KAFKA_COLUMNS = ("key", "value", "topic", "partition", "offset")
KIND = "kind"  # "output" or "dead_letter": which sink a row goes to when they differ
OUTPUT, DEAD_LETTER = "output", "dead_letter"


def rows_schema() -> Any:
    """The Spark schema of the tasks' rows: what Spark's Kafka sink takes, plus ``kind``."""
    from pyspark.sql.types import ArrayType, BinaryType, StringType, StructField, StructType

    header = StructType([StructField("key", StringType(), False),
                         StructField("value", BinaryType(), True)])
    return StructType([StructField(KIND, StringType(), False),
                       StructField("topic", StringType(), False),
                       StructField("key", BinaryType(), True),
                       StructField("value", BinaryType(), True),
                       StructField("headers", ArrayType(header, False), True)])


def is_kafka_rows(df: Any) -> bool:
    """Whether ``df`` has the columns of Spark's Kafka source."""
    return set(KAFKA_COLUMNS) <= set(df.columns)


@dataclass
class KafkaRowsJob:
    """The function given to ``mapInArrow`` over Kafka rows; pickled with its settings."""

    model: ShippedModel
    config: Config  # the stream's settings, resolved on the driver
    identity: ModelIdentity
    output_topic: str

    def __call__(self, batches: Iterable[Any]) -> Iterator[Any]:
        import pyarrow as pa
        from pyspark.sql.pandas.types import to_arrow_schema

        collected = _Collected()
        stream = _task_stream(self, collected)
        schema = to_arrow_schema(rows_schema())
        for batch in batches:
            messages = [_RowMessage(*row) for row in _rows(batch)]
            if not messages:
                continue
            stream.handle_batch(messages)
            yield pa.RecordBatch.from_pylist(collected.take(stream.dlq_topic), schema=schema)


def _rows(batch: Any) -> Iterator[tuple]:
    """(key, value, topic, partition, offset, headers) of each row of an Arrow batch."""
    names = batch.schema.names
    columns = [batch.column(c).to_pylist() for c in KAFKA_COLUMNS]
    headers = batch.column("headers").to_pylist() if "headers" in names \
        else [None] * batch.num_rows
    return zip(*columns, headers)


class _RowMessage:
    """A Kafka row with the accessors of a ``confluent_kafka.Message``, which is all the
    stream's data path reads."""

    __slots__ = ("_key", "_value", "_topic", "_partition", "_offset", "_headers")

    def __init__(self, key: bytes | None, value: bytes | None, topic: str, partition: int,
                 offset: int, headers: list[dict] | None):
        self._key, self._value, self._topic = key, value, topic
        self._partition, self._offset = partition, offset
        self._headers = [(h["key"], h["value"]) for h in headers] if headers else None

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers


class _Collected:
    """What the stream produced for the batch in hand, as rows of :func:`rows_schema`: the
    ``producer`` of a task's stream (``produce`` is the only call its data path makes)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: Sequence[tuple[str, bytes]] | None = None, on_delivery: Any = None
                ) -> None:
        self.rows.append({"topic": topic, "key": key, "value": value,
                          "headers": [{"key": k, "value": v} for k, v in headers or ()]})

    def take(self, dlq_topic: str) -> list[dict]:
        rows, self.rows = self.rows, []
        for row in rows:
            row[KIND] = DEAD_LETTER if row["topic"] == dlq_topic else OUTPUT
        return rows

    def __len__(self) -> int:
        return 0  # nothing is ever in flight: rows are handed to Spark


class _NoConsumer:
    """A task reads no Kafka itself: Spark's source does."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"a Spark task's stream has no consumer ({name})")


_streams: dict[str, Any] = {}


def _task_stream(job: KafkaRowsJob, collected: _Collected) -> Any:
    """The stream of a task: made once per Python worker and query (Spark reuses workers
    between tasks), its producer swapped for this task's."""
    from mlflow_preproc.streaming.errors import FatalError
    from mlflow_preproc.streaming.stream import Stream
    from mlflow_preproc.runtime.dependencies import Misconfigured

    class TaskStream(Stream):
        command = "spark"

        def when_available(self, call, *args):
            # A dependency that does not answer fails the task: Spark retries it, and a
            # query that gives up starts this micro-batch again from its checkpoint.
            try:
                return call(*args)
            except Misconfigured as exc:
                raise FatalError(str(exc)) from None

    key = repr((job.model, job.output_topic, job.identity,
                sorted(job.config.values.items(), key=str)))
    stream = _streams.get(key)
    if stream is None:
        stream = TaskStream(job.config, job.model.load(), job.identity, job.output_topic,
                            consumer=_NoConsumer(), producer=collected)
        _streams[key] = stream
    stream.output.producer = collected
    return stream
