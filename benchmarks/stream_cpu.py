"""CPU per record of the stream's own work on 1 KB JSON records, in one process, no broker.

``stream_throughput.py`` measures the stream end to end, where the broker, the watcher and
the stream share two cores and a row moves by 10-30% between runs. This measures only the
Python side of one batch, in this process, with ``time.process_time()``, so that a change
of a few per cent in the stream's bookkeeping shows: the records of ``stream_throughput.py``
row (c) (a ZTF candidate flattened to ~1 KB of JSON, identity plus one field), 500 per
batch, a real confluent-kafka ``Producer`` whose queue is emptied between batches (it points
at a closed loopback port: nothing is sent, every ``produce`` call does its real work).

Rows:

(j)  bare      ``orjson.loads``, the function, ``orjson.dumps``, ``produce(topic, value, key)``
               per record: (a') of ``stream_throughput.py`` without Kafka's consume and poll.
(j') headers   (j) plus the stream's two provenance headers and a delivery callback object
               per input message (delivery reports carry no headers: the callback is what
               names the input of a failed output).
(s)  stream    ``Stream.handle_batch`` (decode -> pre_processing -> encode -> produce, each
               message's verdict) and ``Checkpoint.mark_handled``: what the stream runs per
               batch.

    python benchmarks/stream_cpu.py                 # 50,000 records, best of 7
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
from confluent_kafka import Message, Producer

from mlflow_preproc import config
from mlflow_preproc.runtime.flavor import LoadedPreprocessing
from mlflow_preproc.runtime.model_identity import ModelIdentity
from mlflow_preproc.runtime.records import Preprocessor
from mlflow_preproc.streaming.stream import Stream
from throughput_common import add_field, make_json_records

ALERT = Path(__file__).resolve().parents[1] / "tests" / "data"
BATCH = 500
TOPIC = "in-topic"


class _OnError:
    """(j')'s delivery callback: one object per input message, as the stream's."""

    __slots__ = ("source", "headers")

    def __init__(self, source: Message, headers: list) -> None:
        self.source, self.headers = source, headers

    def __call__(self, err, msg) -> None:
        pass


def make_stream(producer: Producer) -> Stream:
    """A Stream of the add-field function around ``producer``; its consumer is never used."""
    cfg = config.load("stream", environ={"INPUT_TOPIC": TOPIC, "OUTPUT_TOPIC": "out",
                                         "MODEL_URI": "models:/bench-add-field/1"})
    preprocessing = LoadedPreprocessing(Preprocessor(add_field, None, None), "", None, None)
    identity = ModelIdentity("models:/bench-add-field/1", "models:/bench-add-field/1",
                             "bench-add-field", "1")
    stream = Stream(cfg, preprocessing, identity, "out", consumer=object(), producer=producer)
    stream._owned = {(TOPIC, 0)}
    return stream


def rows(stream: Stream, producer: Producer) -> dict[str, Callable[[Sequence[Message]], None]]:
    produce, model_header = producer.produce, stream.extra_headers[0]

    def bare(batch: Sequence[Message]) -> None:
        for msg in batch:
            record = add_field(orjson.loads(msg.value()))
            produce("out", orjson.dumps(record), msg.key())

    def headers(batch: Sequence[Message]) -> None:
        for msg in batch:
            record = add_field(orjson.loads(msg.value()))
            hs = [("x-preproc-source",
                   f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()), model_header]
            produce("out", orjson.dumps(record), msg.key(), headers=hs,
                    on_delivery=_OnError(msg, hs))

    def handle(batch: Sequence[Message]) -> None:
        stream.handle_batch(batch)
        stream.checkpoint.mark_handled(batch, stream._owned)

    return {"(j) bare: loads, function, dumps, produce": bare,
            "(j') (j) + the stream's headers and callbacks": headers,
            "(s) Stream.handle_batch + mark_handled": handle}


def cpu_per_record(run: Callable, messages: list[Message], stream: Stream,
                   producer: Producer) -> float:
    """µs of process CPU per record of ``run`` over ``messages``, batch by batch; the
    producer's queue is emptied between batches, outside the timing."""
    spent = 0.0
    for i in range(0, len(messages), BATCH):
        batch = messages[i:i + BATCH]
        started = time.process_time()
        run(batch)
        spent += time.process_time() - started
        producer.purge()
        producer.poll(0)  # the purged deliveries' reports, to the stream's callbacks
        stream._redeliveries.clear()
    return spent / len(messages) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    alert = sorted(ALERT.glob("*.avro"))[0].read_bytes()
    messages = [Message(topic=TOPIC, partition=0, offset=i, key=str(i).encode(), value=v)
                for i, v in enumerate(make_json_records(args.records, alert))]
    # a closed port on loopback: nothing is sent, and librdkafka's complaints are silenced
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "log_level": 0,
                         "linger.ms": 5, "enable.idempotence": True})
    stream = make_stream(producer)
    gc.collect()
    gc.freeze()  # as the stream does before its loop
    runs: dict[str, list[float]] = {name: [] for name in rows(stream, producer)}
    for _ in range(args.repeat):  # in rounds, so that drifting load weighs on every row
        for name, run in rows(stream, producer).items():
            runs[name].append(cpu_per_record(run, messages, stream, producer))
    print(f"\nCPU per record, {args.records:,} records of ~1 KB JSON, {BATCH} a batch "
          f"({platform.machine()}, Python {platform.python_version()}); best and median of "
          f"{args.repeat}\n")
    print("| row | µs / record, best | median | x (j) |")
    print("|---|---:|---:|---:|")
    base = min(next(iter(runs.values())))
    for name, values in runs.items():
        print(f"| {name} | {min(values):.2f} | {statistics.median(values):.2f} | "
              f"{min(values) / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
