"""(q) The benchmark's function as a default Quix Streams 3.x application.

Runs in the Quix virtualenv that ``stream_throughput.py --setup`` makes (it imports nothing of
mlflow-preproc). ``Application`` with ``sdf.apply(...)`` and ``to_topic``, JSON serde, every
other setting at Quix's default except those the benchmark needs: the broker, a fresh group,
``auto_offset_reset="earliest"`` (the input is written before the app starts) and the group
timeouts that make Tansu join in ~3 s. Stops on SIGTERM, as Quix apps do.
``--processing-guarantee exactly-once`` and ``--commit-interval`` are for
``benchmarks/exactly_once.py``.
"""

from __future__ import annotations

import argparse
import json

from quixstreams import Application


def add_field(record: dict) -> dict:
    """The same function as the stream's model (``stream_throughput.add_field``)."""
    record["candid_next"] = record["candid"] + 1
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--input-topic", required=True)
    p.add_argument("--output-topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--consumer-config", default="{}", help="JSON: extra consumer settings")
    p.add_argument("--processing-guarantee", default=None,
                   help="at-least-once or exactly-once (default: Quix's, at-least-once)")
    p.add_argument("--commit-interval", type=float, default=None,
                   help="seconds (default: Quix's, 5.0)")
    args = p.parse_args()
    optional = {"processing_guarantee": args.processing_guarantee,
                "commit_interval": args.commit_interval}
    app = Application(broker_address=args.bootstrap, consumer_group=args.group,
                      auto_offset_reset="earliest", loglevel="WARNING",
                      consumer_extra_config=json.loads(args.consumer_config),
                      **{k: v for k, v in optional.items() if v is not None})
    source = app.topic(args.input_topic, value_deserializer="json")
    sink = app.topic(args.output_topic, value_serializer="json")
    sdf = app.dataframe(source)
    sdf = sdf.apply(add_field)
    sdf.to_topic(sink)
    app.run()


if __name__ == "__main__":
    main()
