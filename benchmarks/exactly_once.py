"""What exactly-once costs: ``mlflow-preproc stream`` at-least-once against exactly-once at
commit intervals of 100 ms, 1 s and 5 s, and Quix Streams at-least-once and exactly-once, on
one Apache Kafka broker and the same records: one table, one run (issue #35).

Each row is measured twice, with the same process and settings:

- **rate**: the topic is filled first (1 KB JSON records, the (c) rows of
  ``stream_throughput.py``), then the process is started and its outputs watched with
  ``isolation.level=read_committed``; records/s = outputs after the first / (last output's
  arrival - first output's arrival), every output checked (:mod:`throughput_common`).
- **latency**: the process runs first (warmed up: a first output seen), then records are
  produced at a steady ``--latency-rate`` for ``--latency-seconds``; a record's latency is
  from just before its ``produce()`` to its output's arrival at a ``read_committed`` reader.
  Under exactly-once an output is visible only once its transaction commits, so latency
  grows with the commit interval: the price users pay for no duplicates.

Rows (every stream row runs the add-field model of ``stream_throughput.py`` (c), one
partition, ``BATCH_SIZE=500``):

(c)    stream, PROCESSING_GUARANTEE=at-least-once, COMMIT_INTERVAL_MS=1000 (the defaults)
(e100) stream, exactly-once, COMMIT_INTERVAL_MS=100
(e1s)  stream, exactly-once, COMMIT_INTERVAL_MS=1000
(e5s)  stream, exactly-once, COMMIT_INTERVAL_MS=5000
(q)    Quix Streams (its virtualenv: ``stream_throughput.py --setup``), at-least-once,
       ``commit_interval=1``
(qe)   Quix Streams, ``processing_guarantee="exactly-once"``, ``commit_interval=1``

Usage::

    python benchmarks/exactly_once.py               # 100,000 records, 3 rounds (~15 minutes)
    python benchmarks/exactly_once.py --quick       # 20,000 records, one round
    python benchmarks/exactly_once.py --only c,e1s
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stream_throughput as st  # noqa: E402 -- beside this script
import throughput_peers as peers  # noqa: E402
from throughput_common import (  # noqa: E402
    GROUP_SETTINGS, Result, create_topics, delete_topics, fresh_name, percentile,
    same_record, stop_process, watch_output)

# key -> (label, stream settings, or Quix's arguments)
STREAM_ROWS = {
    "c": ("(c) stream, at-least-once, 1 s", {}),
    "e100": ("(e100) stream, exactly-once, 100 ms",
             {"PROCESSING_GUARANTEE": "exactly-once", "COMMIT_INTERVAL_MS": "100"}),
    "e1s": ("(e1s) stream, exactly-once, 1 s",
            {"PROCESSING_GUARANTEE": "exactly-once", "COMMIT_INTERVAL_MS": "1000"}),
    "e5s": ("(e5s) stream, exactly-once, 5 s",
            {"PROCESSING_GUARANTEE": "exactly-once", "COMMIT_INTERVAL_MS": "5000"}),
}
QUIX_ROWS = {
    "q": ("at-least-once", ("--processing-guarantee", "at-least-once",
                            "--commit-interval", "1")),
    "qe": ("exactly-once", ("--processing-guarantee", "exactly-once",
                            "--commit-interval", "1")),
}
WARM_KEY = b"warm-"


def stream_env(bootstrap: str, tracking_uri: str, model_uri: str, input_topic: str,
               output_topic: str, settings: dict[str, str]) -> dict[str, str]:
    """The environment of a stream as ``stream_throughput.run_stream`` gives it."""
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MODEL_URI": model_uri,
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "INPUT_TOPIC": input_topic,
            "OUTPUT_TOPIC": output_topic, "CONSUMER_GROUP_ID": fresh_name("group"),
            **st.librdkafka_env(GROUP_SETTINGS), "LOG_FORMAT": "json",
            "BATCH_SIZE": str(st.CONSUME_BATCH), **settings}


def latency_run(start: Callable[[str, str, object], subprocess.Popen], bootstrap: str,
                values: list[bytes], work_dir: Path, rate: int, seconds: float) -> list[float]:
    """Start a process with ``start(input topic, output topic, log file)``, warm it up,
    feed it ``rate`` records/s for ``seconds``; each record's latency in ms, produce to a
    read_committed reader."""
    input_topic, output_topic = fresh_name("lat-in"), fresh_name("lat-out")
    topics = [input_topic, output_topic, f"{input_topic}-dlq"]
    create_topics(bootstrap, topics)
    log_path = work_dir / f"{fresh_name('latency')}.log"
    with open(log_path, "wb") as log:
        proc = start(input_topic, output_topic, log)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    try:
        # Warm up: a record a second until one output is visible (model loaded, group
        # joined, transactions initialised, a first commit done).
        warm = threading.Event()

        def warm_up():
            i = 0
            while not warm.is_set():
                producer.produce(input_topic, values[0], WARM_KEY + str(i).encode())
                producer.poll(0)
                i += 1
                warm.wait(1.0)

        threading.Thread(target=warm_up, daemon=True).start()
        try:
            watch_output(bootstrap, output_topic, 1, [proc], [], timeout=180)
        finally:
            warm.set()
        n = int(rate * seconds)
        sent: dict[bytes, float] = {}

        def feed():
            began = time.monotonic()
            for i in range(n):
                key = str(i).encode()
                sent[key] = time.monotonic()
                producer.produce(input_topic, values[i % len(values)], key)
                if i % 20 == 0:
                    producer.poll(0)
                    time.sleep(max(0.0, began + i / rate - time.monotonic()))
            producer.flush(30)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        w = watch_output(bootstrap, output_topic, n, [proc], [], timeout=seconds + 120,
                         ignore_key_prefix=WARM_KEY)
        feeder.join(30)
    except Exception as exc:
        raise RuntimeError(f"{exc}; log: {log_path}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        stop_process(proc)
        delete_topics(bootstrap, topics)
    first: dict[bytes, float] = {}
    for key, arrival in zip(w.keys, w.arrivals):
        first.setdefault(key, arrival)
    return [(first[key] - sent[key]) * 1000 for key in sent]


def build_rows(args: argparse.Namespace, inputs: st.Inputs, broker, tracking_uri: str,
               model_uri: str, work_dir: Path) -> list[st.Row]:
    """The rows the issue asks for, in table order."""
    bootstrap = broker.bootstrap_servers
    values, check = inputs.json_values, same_record(extra_field=True)

    def measured(throughput: Callable[[], Result], start) -> Callable[[], Result]:
        def run() -> Result:
            result = throughput()
            result.latencies_ms = latency_run(start, bootstrap, values, work_dir,
                                              args.latency_rate, args.latency_seconds)
            return result
        return run

    def stream_row(settings: dict[str, str]) -> Callable[[], Result]:
        throughput = lambda: st.run_stream(  # noqa: E731
            st.StreamRun(st.stream_command(), model_uri, values, settings), bootstrap,
            tracking_uri, work_dir, broker, check, inputs.json_records)

        def start(input_topic, output_topic, log):
            return subprocess.Popen(
                st.stream_command(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
                env=stream_env(bootstrap, tracking_uri, model_uri, input_topic, output_topic,
                               settings))
        return measured(throughput, start)

    def quix_row(app_args: tuple[str, ...]) -> Callable[[], Result]:
        throughput = lambda: peers.run_quix(inputs, bootstrap, broker, work_dir,  # noqa: E731
                                            app_args)

        def start(input_topic, output_topic, log):
            return peers.start_quix(bootstrap, input_topic, output_topic, log, app_args)
        return measured(throughput, start)

    quix_version = peers.installed_version("quix", "quixstreams")
    quix_missing = None if quix_version else \
        f"not run: no {peers.VENVS / 'quix'}; run stream_throughput.py --setup first"
    rows = [st.Row(key, label, stream_row(settings))
            for key, (label, settings) in STREAM_ROWS.items()]
    rows += [st.Row(key, f"({key}) Quix Streams {quix_version or '3.x'}, {guarantee}, 1 s",
                    quix_row(app_args), skipped=quix_missing)
             for key, (guarantee, app_args) in QUIX_ROWS.items()]
    return [r for r in rows if not args.only or r.key in args.only]


def print_table(results: list[st.RowResult], args: argparse.Namespace, wall_s: float) -> None:
    header = (f"{'row':<44} {'rate':>9} {'spread':>15} {'CPU':>5} {'broker':>6} "
              f"{'p50 ms':>7} {'p99 ms':>7}")
    print()
    print(header)
    print("-" * len(header))
    for rr in results:
        if rr.median is None:
            print(f"{rr.row.label:<44} {'--':>9}  {rr.error}")
            continue
        r = rr.median
        spread = f"{rr.low:,.0f}-{rr.high:,.0f}" if args.repeat > 1 else ""
        print(f"{rr.row.label:<44} {r.rate:>9,.0f} {spread:>15} {st._fmt(r.cpu, '.2f'):>5} "
              f"{st._fmt(r.broker_cpu, '.2f'):>6} "
              f"{percentile(r.latencies_ms, .5):>7.0f} {percentile(r.latencies_ms, .99):>7.0f}")
    print("-" * len(header))
    print(f"rate: {args.records:,} records in the topic before the start, median of "
          f"{args.repeat} run(s) in rounds; latency: produce -> visible to a read_committed "
          f"reader, {args.latency_rate:,} records/s for {args.latency_seconds:.0f} s, of the "
          "median run")
    for rr in results:
        if rr.median is not None and rr.median.notes:
            print(f"  {rr.row.label.split(' ')[0]} " + "; ".join(rr.median.notes))
    by_key = {rr.row.key: rr.median for rr in results if rr.median is not None}
    c, e1s, q, qe = (by_key.get(k) for k in ("c", "e1s", "q", "qe"))
    if c and e1s:
        ratio = e1s.rate / c.rate
        print(f"e1s/c records/s = {ratio:.2f}  (goal >= 0.90: "
              f"{'met' if ratio >= 0.9 else 'NOT met'})")
    if c and e1s and q and qe:
        ours, theirs = e1s.rate / qe.rate, c.rate / q.rate
        print(f"e1s/qe records/s = {ours:.2f}, c/q = {theirs:.2f}  (goal e1s/qe >= c/q: "
              f"{'met' if ours >= theirs else 'NOT met'})")
    print(st.machine_info(["apache-kafka"]))
    print(f"total wall time: {wall_s:.0f} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000,
                   help="JSON records of the rate runs (default 100000)")
    p.add_argument("--latency-rate", type=int, default=2_000,
                   help="records/s of the latency runs (default 2000)")
    p.add_argument("--latency-seconds", type=float, default=15.0,
                   help="length of the latency runs (default 15)")
    p.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="20000 records, latency 10 s, one round")
    p.add_argument("--only", type=lambda s: set(s.split(",")), default=None,
                   help="comma-separated row keys: " + ",".join([*STREAM_ROWS, *QUIX_ROWS]))
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the temporary folder with the processes' logs")
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.latency_seconds, args.repeat = 20_000, 10.0, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    inputs = st.make_inputs(st.parse_args(["--records", str(args.records), "--alerts", "1"]))
    work_dir = Path(tempfile.mkdtemp(prefix="exactly-once-"))
    with st.start_broker("apache-kafka") as broker:
        tracking_uri, models = st.log_models(work_dir)
        rows = build_rows(args, inputs, broker, tracking_uri, models["add_field"], work_dir)
        results = st.run_rows(rows, args.repeat)
    print_table(results, args, time.monotonic() - started)
    return st.finish(results, work_dir, args.keep_logs)


if __name__ == "__main__":
    sys.exit(main())
