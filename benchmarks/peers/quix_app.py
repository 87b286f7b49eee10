"""(q) The benchmark's function as a default Quix Streams 3.x application.

Runs in the Quix virtualenv that ``stream_throughput.py --setup`` makes (it imports nothing of
mlflow-preproc). ``Application`` with ``sdf.apply(...)`` and ``to_topic``, JSON serde, every
other setting at Quix's default except those the benchmark needs: the broker, a fresh group,
``auto_offset_reset="earliest"`` (the input is written before the app starts) and the group
timeouts that make Tansu join in ~3 s. Stops on SIGTERM, as Quix apps do.
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
    args = p.parse_args()
    app = Application(broker_address=args.bootstrap, consumer_group=args.group,
                      auto_offset_reset="earliest", loglevel="WARNING",
                      consumer_extra_config=json.loads(args.consumer_config))
    source = app.topic(args.input_topic, value_deserializer="json")
    sink = app.topic(args.output_topic, value_serializer="json")
    sdf = app.dataframe(source)
    sdf = sdf.apply(add_field)
    sdf.to_topic(sink)
    app.run()


if __name__ == "__main__":
    main()
