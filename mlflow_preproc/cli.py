"""The mlflow-preproc command: run (files, stdin), stream (Kafka), bridge (Kafka to a model
server), manifests (Kubernetes YAML), builds serve (the build service), dlq inspect|replay
(a dead-letter topic), status (a stream's group), alert-rules and dashboard (Prometheus and Grafana) and broker (a local
broker to try a stream on), verify (a model's outputs on reference records, here).

Exit status: 0 success; 1 some records failed (run: see the rejects file; verify: outputs
differ); 2 a fatal error
(bad configuration, unknown model, unreachable broker), printed as one line naming the fix.
Each command's --help shows its flags and examples.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import textwrap

from mlflow_preproc import config as settings

EXIT_OK, EXIT_RECORDS_FAILED, EXIT_FATAL = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    shutdown = None
    if argv[:1] in (["stream"], ["bridge"]):
        # Before anything slow (imports, the model, the broker): SIGTERM from here on is a
        # clean stop, exit 0, never a kill mid-start (-15).
        from mlflow_preproc.streaming.shutdown import Shutdown

        shutdown = Shutdown().install()
    # MLflow draws a download bar on every model load, terminal or not: in a log it is noise,
    # and our own summary and stats lines say what happened. An explicit setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = _parser()
    args = parser.parse_args(argv)
    args.shutdown = shutdown
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 -- turned into one line below, or re-raised
        if shutdown is None and not _is_user_error(exc):
            raise
        # A long-running consumer says what went wrong in one line (its exit code tells the
        # orchestrator to restart it); the traceback is for whoever turns on DEBUG.
        logging.getLogger("mlflow_preproc").debug("fatal error", exc_info=True)
        print(f"mlflow-preproc {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FATAL


# allow_abbrev=False everywhere: --skip-cutout must be an error, not --skip-cutouts. The raw
# formatter for the epilogs: each command's --help ends with commands to copy (its
# _<COMMAND>_EXAMPLES, beside its builder), their lines kept as written.
_PLAIN = {"formatter_class": argparse.RawDescriptionHelpFormatter, "allow_abbrev": False}


def _wrap(text: str) -> str:
    """A description wrapped as the default formatter would (the raw one keeps lines as given)."""
    return textwrap.fill(text, 88)


class _Parser(argparse.ArgumentParser):
    """A parser whose commands refuse a flag they do not know themselves, with their own
    usage and the closest flag: argparse hands unknown flags up to the top parser, which
    printed the list of commands and no hint."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, unknown = super().parse_known_args(args, namespace)
        if unknown and not self._subparsers:  # a command, not the list of commands
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            close = [m for word in unknown if word.startswith("--")
                     for m in difflib.get_close_matches(word.split("=")[0], flags, n=1)]
            hint = f" (did you mean {' or '.join(dict.fromkeys(close))}?)" if close else ""
            self.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
        return parsed, unknown


def _parser() -> argparse.ArgumentParser:
    """The command and its subcommands, in the order --help lists them; each command's
    arguments are added by its builder, beside its handler below."""
    parser = _Parser(prog="mlflow-preproc", description=__doc__, **_PLAIN)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_stream, _add_bridge, _add_manifests, _add_builds, _add_dlq,
                _add_status, _add_alert_rules, _add_dashboard, _add_broker, _add_verify):
        add(sub)
    return parser


# ---- arguments that several commands take (as MLflow's cli_args) -------------------------

def _add_model_uri(parser: argparse.ArgumentParser) -> None:
    """-m/--model-uri, required: run, verify and manifests (stream's is its MODEL_URI setting)."""
    parser.add_argument("-m", "--model-uri", required=True, help="MLflow model URI")


def _add_json(parser: argparse.ArgumentParser) -> None:
    """--json: the commands that print a report (dlq inspect, status)."""
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")


# ---- files: run, verify -------------------------------------------------------------------

_RUN_EXAMPLES = """\
examples:
  mlflow-preproc run -m models:/fink-preproc/1 alerts/*.avro --skip-cutouts -o features.jsonl
  cat records.jsonl | mlflow-preproc run -m models:/fink-preproc/1 > out.jsonl
  mlflow-preproc run -m models:/fink-preproc/1 batch.json --output-format avro -o out.avro
  mlflow-preproc run --engine spark -m models:/fink-preproc/1 archive/ -o features
  mlflow-preproc run --engine spark -m models:/fink-preproc/1 kafka:fink-alert \
      -o kafka:fink-features --checkpoint-location ck/ --trigger '10 seconds'
"""


def _add_run(sub: argparse._SubParsersAction) -> None:
    """run: files or stdin through a model into a file or stdout."""
    run = sub.add_parser("run", help="preprocess files or stdin", epilog=_RUN_EXAMPLES,
                         description=_wrap("Preprocess JSON, JSON Lines or Avro files (or "
                                           "stdin) with a preprocessing model; write JSON "
                                           "Lines, Avro or Parquet."), **_PLAIN)
    _add_model_uri(run)
    run.add_argument("inputs", nargs="*", metavar="FILE", help="input files; - or none: stdin")
    run.add_argument("--input-format", choices=("json", "jsonl", "avro", "parquet"),
                     help="default: from the file name, else from its first bytes")
    run.add_argument("--output-format", choices=("jsonl", "avro", "parquet"), default="jsonl",
                     help="avro: --engine local")
    run.add_argument("--output-schema", help="Avro schema for avro output or parquet columns "
                     "(default: the model's output_avro_schema)")
    run.add_argument("-o", "--output", help="output file (default: stdout)")
    run.add_argument("--rejects", help="where failed records go (default: OUTPUT.rejects.jsonl, "
                     "or rejects.jsonl when writing to stdout)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: when stderr is a terminal)")
    run.add_argument("--engine", choices=("local", "spark"), default="local",
                     help="spark: on Apache Spark (pip install '.[spark]' in the "
                     "mlflow-preproc clone); "
                     "FILE may be a folder or a glob, -o a folder of part files")
    run.add_argument("--master", help="Spark master (--engine spark; default local[*])")
    run.add_argument("--partition-by", default="", metavar="FIELD[,FIELD]",
                     help="write the output partitioned by these fields (--engine spark)")
    run.add_argument("--checkpoint-location", metavar="DIR",
                     help="--engine spark kafka:TOPIC: the query's offsets and state, kept "
                     "for the next run")
    run.add_argument("--trigger", default="available-now",
                     help="--engine spark kafka:TOPIC: available-now (what the topic holds, "
                     "then end) or a micro-batch interval ('10 seconds'), until SIGTERM")
    # --skip-cutouts, --drop-fields, --max-decoded-bytes: the settings table's, as on stream
    # (the env file of `docker run -i --env-file ... IMAGE < alerts` sets them too).
    settings.add_arguments(run, "run")
    run.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    import contextlib

    from mlflow_preproc.runtime import batch_run
    from mlflow_preproc.runtime.avro_schemas import load_avro_schema
    from mlflow_preproc.runtime.flavor import load_preprocessing
    from mlflow_preproc.runtime.output_files import (
        Terminated,
        refuse_inputs_as_outputs,
        replaced_when_done,
        terminate_by_exception,
    )

    env = settings.load("run", args)
    drop = env.drop_fields()
    rejects = args.rejects or (f"{args.output}.rejects.jsonl" if args.output else "rejects.jsonl")
    if args.engine == "spark" and args.inputs[:1] and args.inputs[0].startswith("kafka:"):
        from mlflow_preproc.spark import kafka

        if len(args.inputs) > 1:
            raise settings.ConfigError("a Kafka query reads one topic: pass kafka:TOPIC alone")
        batches = kafka.run(args.model_uri, args.inputs[0], args.output,
                            master=args.master or "local[*]",
                            checkpoint=args.checkpoint_location, rejects_path=args.rejects,
                            trigger=args.trigger, progress=args.progress)
        print(f"mlflow-preproc run: {batches} micro-batch(es)", file=sys.stderr)
        return EXIT_OK
    if args.engine == "spark":
        from mlflow_preproc.spark import files

        counts = files.run(args.model_uri, args.inputs, args.output,
                           master=args.master or "local[*]", input_format=args.input_format,
                           output_format=args.output_format, output_schema=args.output_schema,
                           rejects_path=rejects, fields_to_drop=drop,
                           partition_by=_split_list(args.partition_by), progress=args.progress,
                           parity_check=env["PARITY_CHECK"])
        print(f"mlflow-preproc run: {counts.summary()}", file=sys.stderr)
        return EXIT_RECORDS_FAILED if counts.failed else EXIT_OK
    for flag, value in (("--master", args.master), ("--partition-by", args.partition_by)):
        if value:
            raise settings.ConfigError(f"{flag} needs --engine spark")
    if args.output_format == "parquet" and not args.output:
        raise settings.ConfigError("--output-format parquet writes a file: pass -o OUT.parquet")

    if args.output:
        refuse_inputs_as_outputs(args.inputs, [("the output", args.output, "pass -o another "
                                                "path: the input would be gone before it is "
                                                "read")])
    # Written beside the target and renamed at the end: a run that fails or is stopped
    # leaves the previous output as it was. Opened first, so an output that cannot be
    # written is said before the model is downloaded.
    try:
        with terminate_by_exception(), (replaced_when_done(args.output) if args.output
                                        else contextlib.nullcontext(sys.stdout.buffer)) as out:
            loaded = load_preprocessing(args.model_uri)
            loaded.check_parity(args.model_uri, env["PARITY_CHECK"])
            schema = load_avro_schema(args.output_schema) if args.output_schema \
                else loaded.output_avro_schema
            counts = batch_run.run(loaded.preprocessor, args.inputs, out,
                                   input_format=args.input_format,
                                   output_format=args.output_format, output_schema=schema,
                                   rejects_path=rejects, fields_to_drop=drop,
                                   progress=args.progress,
                                   max_decoded_bytes=env["MAX_DECODED_BYTES"],
                                   avro_columns=env["AVRO_COLUMNS"])
    except Terminated as exc:
        return exc.exit_code
    print(f"mlflow-preproc run: {counts.summary()}", file=sys.stderr)
    return EXIT_RECORDS_FAILED if counts.failed else EXIT_OK


def _split_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


_VERIFY_EXAMPLES = """\
examples:
  mlflow-preproc verify -m models:/fink-preproc/2
  mlflow-preproc verify -m models:/fink-preproc/2 --reference night-reference.jsonl
  mlflow-preproc verify -m models:/fink-preproc@candidate --reference alerts.avro \\
      --against models:/fink-preproc@champion
"""


def _add_verify(sub: argparse._SubParsersAction) -> None:
    """verify: a model's outputs on reference records, or against another model."""
    verify = sub.add_parser(
        "verify", help="check a model's outputs on reference records, here",
        epilog=_VERIFY_EXAMPLES, description=_wrap(
            "Run the model's reference records (log_model's reference_records, by default "
            "its input example) in this environment and compare the outputs with those "
            "logged; or, with --against, with another model's outputs on the same records "
            "(the CI gate before promoting a version). Prints every record that differs; "
            "exit 0 when none does, 1 when one does."), **_PLAIN)
    _add_model_uri(verify)
    verify.add_argument("--reference", metavar="FILE", help="check these records instead: a "
                        "reference file (the reference.jsonl of a model's artifacts: records "
                        "with their expected outputs), or records (JSON, JSON Lines, Avro) "
                        "with --against")
    verify.add_argument("--against", metavar="MODEL_URI", help="the expected outputs are this "
                        "model's on the same records, e.g. models:/fink-preproc@champion")
    verify.set_defaults(handler=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from mlflow_preproc.runtime.verify import verify

    report = verify(args.model_uri, args.reference, args.against)
    print(report.text())
    return EXIT_OK if report.ok else EXIT_RECORDS_FAILED


# ---- Kafka streams: stream, bridge, and a broker to try them on ---------------------------

_STREAM_EXAMPLES = """\
examples:
  mlflow-preproc stream -m models:/fink-preproc/1 --input-topic fink-alert \\
      --input-format avro --skip-cutouts
  INPUT_TOPIC=fink-alert KAFKA_BOOTSTRAP_SERVERS=broker:9092 \\
      mlflow-preproc stream -m models:/fink-preproc/1
  mlflow-preproc stream -m models:/fink-features/1 --input-topic fink-alert \\
      --prediction-model-uri models:/fink-classifier/1 --keep-fields objectId,candid
"""


def _add_stream(sub: argparse._SubParsersAction) -> None:
    """stream: every setting of the stream mode as a flag."""
    stream = sub.add_parser(
        "stream", help="preprocess a Kafka topic into another", epilog=_STREAM_EXAMPLES,
        usage="%(prog)s [-h] -m MODEL_URI --input-topic TOPIC [--output-topic TOPIC]\n"
              "       [--prediction-model-uri URI] [SETTINGS...]",
        description=_wrap("Consume INPUT_TOPIC in a consumer group, run the model's "
                          "preprocessing, produce to OUTPUT_TOPIC (at least once). Every "
                          "setting is a flag or its environment variable."), **_PLAIN)
    # The serving image's own: the model baked into it (MODEL_URI then only names it).
    stream.add_argument("--model-path", help=argparse.SUPPRESS)
    settings.add_arguments(stream, "stream", short={"MODEL_URI": "-m"})
    stream.set_defaults(handler=_cmd_stream)


def _cmd_stream(args: argparse.Namespace) -> int:
    from mlflow_preproc.streaming.stream import Stream

    config = settings.load("stream", args)
    _configure_logging(config)
    if not args.shutdown.requested:
        Stream.from_config(config, args.shutdown, args.model_path).run()
    return EXIT_OK


_BRIDGE_EXAMPLES = """\
examples:
  mlflow-preproc bridge --input-topic fink-preproc-1-preprocessed \\
      --output-topic fink-predictions --api-url http://127.0.0.1:5002
"""


def _add_bridge(sub: argparse._SubParsersAction) -> None:
    """bridge: every setting of the bridge mode as a flag."""
    bridge = sub.add_parser(
        "bridge", help="feed a topic to a model server's /invocations", epilog=_BRIDGE_EXAMPLES,
        usage="%(prog)s [-h] --input-topic TOPIC --output-topic TOPIC --api-url URL\n"
              "       [SETTINGS...]",
        description=_wrap("Consume INPUT_TOPIC, call API_URL + API_ENDPOINT in batches, "
                          "produce each prediction to OUTPUT_TOPIC. Every setting is a flag "
                          "or its environment variable."), **_PLAIN)
    settings.add_arguments(bridge, "bridge")
    bridge.set_defaults(handler=_cmd_bridge)


def _cmd_bridge(args: argparse.Namespace) -> int:
    from mlflow_preproc.streaming.bridge import Bridge

    config = settings.load("bridge", args)
    _configure_logging(config)
    if not args.shutdown.requested:
        Bridge.from_config(config, args.shutdown).run()
    return EXIT_OK


def _configure_logging(config: settings.Config) -> None:
    from mlflow_preproc.streaming.metrics import configure_logging

    configure_logging(config["LOG_FORMAT"], config["LOG_LEVEL"])
    logging.getLogger("mlflow").setLevel(logging.WARNING)


_BROKER_EXAMPLES = """\
examples:
  mlflow-preproc broker --topic raw --topic clean
  mlflow-preproc stream -m models:/my-preproc/1 --input-topic raw --output-topic clean
"""


def _add_broker(sub: argparse._SubParsersAction) -> None:
    """broker: a local broker for trying stream and bridge."""
    broker = sub.add_parser(
        "broker", help="a local Kafka-protocol broker to try a stream on",
        epilog=_BROKER_EXAMPLES,
        description=_wrap("Run a memory-only Kafka-protocol broker (Tansu) on 127.0.0.1 in the "
                          "foreground, until Ctrl-C. For trying stream and bridge: data is "
                          "lost when it stops. Needs pip install '.[broker]' in the "
                          "mlflow-preproc clone."),
        **_PLAIN)
    broker.add_argument("--port", type=int, default=9092,
                        help="port on 127.0.0.1 (default 9092: the KAFKA_BOOTSTRAP_SERVERS "
                        "default)")
    broker.add_argument("--topic", action="append", default=[], metavar="NAME[:PARTITIONS]",
                        help="create this topic at start (repeatable; default 1 partition)")
    broker.set_defaults(handler=_cmd_broker)


def _cmd_broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from mlflow_preproc.streaming.embedded_broker import EmbeddedBroker

    topics = [_topic_spec(spec) for spec in args.topic]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedBroker(args.port) as broker:
        for name, partitions in topics:
            broker.create_topics(name, partitions=partitions)
        print(f"mlflow-preproc broker: listening on {broker.bootstrap_servers} (memory only; "
              "Ctrl-C stops it)", file=sys.stderr)
        if topics:
            print("mlflow-preproc broker: topics " + ", ".join(
                f"{name} ({partitions} partition{'s' * (partitions > 1)})"
                for name, partitions in topics), file=sys.stderr)
        # The address on stdout, alone: `export KAFKA_BOOTSTRAP_SERVERS=$(... | head -1)`.
        print(broker.bootstrap_servers, flush=True)
        while not stop.wait(0.5):
            broker.raise_if_exited()
    print("mlflow-preproc broker: stopped", file=sys.stderr)
    return EXIT_OK


def _topic_spec(spec: str) -> tuple[str, int]:
    name, _, partitions = spec.partition(":")
    if not name or (partitions and not (partitions.isdigit() and int(partitions) > 0)):
        raise settings.ConfigError(f"--topic {spec!r} is not NAME or NAME:PARTITIONS; "
                                   "e.g. --topic raw:4")
    return name, int(partitions or 1)


# ---- dead letters and groups: dlq inspect|replay, status ----------------------------------

_DLQ_EXAMPLES = """\
examples:
  mlflow-preproc dlq inspect raw-dlq
  mlflow-preproc dlq inspect raw-dlq --since 2026-12-03T09:00:00Z --json
  mlflow-preproc dlq replay raw-dlq --stage preprocess --dry-run
  mlflow-preproc dlq replay raw-dlq --error-type KeyError --offsets 0:100-250 --to raw-retry
  mlflow-preproc dlq replay raw-dlq --through models:/fink-preproc/4 --output-topic clean
"""


def _add_dlq(sub: argparse._SubParsersAction) -> None:
    """dlq: the command group of a dead-letter topic (inspect, replay), read without a group."""
    dlq = sub.add_parser("dlq", help="inspect and replay a dead-letter topic",
                         epilog=_DLQ_EXAMPLES, description=_wrap(
                             "Read a stream's dead-letter topic without joining a group or "
                             "committing: sum it up by stage and error type (inspect), or send "
                             "chosen dead letters back to the topic they came from, or "
                             "through a fixed model version to its output (replay). "
                             "A replay is recorded in TOPIC-replayed in the same Kafka "
                             "transaction, so a dead letter is replayed once unless --force."),
                         **_PLAIN)
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    _add_dlq_inspect(dlq_commands)
    _add_dlq_replay(dlq_commands)


def _add_dead_letter_topic(command: argparse.ArgumentParser, mode: str) -> None:
    """What dlq inspect and replay both take first: the topic, --since, the settings of mode."""
    command.add_argument("topic", metavar="TOPIC", help="the dead-letter topic")
    command.add_argument("--since", type=_time_ms, metavar="TIME", help="dead letters "
                         "from this time (ISO 8601, e.g. 2026-12-03T09:00:00Z)")
    settings.add_arguments(command, mode)


def _add_dlq_inspect(dlq_commands: argparse._SubParsersAction) -> None:
    """dlq inspect: counts and the first dead letters of each stage and error type."""
    inspect = dlq_commands.add_parser("inspect", help="counts by stage and error type, and the "
                                      "first dead letters of each", epilog=_DLQ_EXAMPLES,
                                      **_PLAIN)
    _add_dead_letter_topic(inspect, "dlq")
    inspect.add_argument("--examples", type=int, default=3, metavar="N",
                         help="dead letters shown per stage and error type (default 3)")
    _add_json(inspect)
    inspect.set_defaults(handler=_cmd_dlq_inspect)


def _cmd_dlq_inspect(args: argparse.Namespace) -> int:
    import json

    from mlflow_preproc.streaming import dead_letters

    summary = dead_letters.inspect(_kafka(settings.load("dlq", args)), args.topic, args.since,
                                   args.examples)
    print(json.dumps(summary.as_json(), indent=2) if args.json else summary.as_text())
    return EXIT_OK


def _add_dlq_replay(dlq_commands: argparse._SubParsersAction) -> None:
    """dlq replay: chosen dead letters back to their topic, or through a model version."""
    replay = dlq_commands.add_parser("replay", help="send dead letters back to their source "
                                     "topic (or --to), or through a model version to its "
                                     "output", epilog=_DLQ_EXAMPLES, **_PLAIN)
    _add_dead_letter_topic(replay, "replay")
    replay.add_argument("--to", metavar="TOPIC", help="send them here instead of the topic "
                        "each came from (its x-preproc-source header)")
    replay.add_argument("--through", metavar="MODEL_URI", help="run them through this model "
                        "version and send its outputs to OUTPUT_TOPIC (--output-topic; "
                        "default {model}-{version}-preprocessed), decoded and encoded with the "
                        "stream's settings below; those that fail again stay dead letters")
    replay.add_argument("--stage", action="append", default=[], metavar="STAGE",
                        help="only this stage: decode, preprocess, encode, produce, predict "
                        "(repeatable)")
    replay.add_argument("--error-type", action="append", default=[], metavar="TYPE",
                        help="only this error type, e.g. KeyError (repeatable)")
    replay.add_argument("--offsets", action="append", default=[], type=_offset_range,
                        metavar="PARTITION:FROM-TO", help="only these dead-letter offsets "
                        "(repeatable), e.g. 0:100-250")
    replay.add_argument("--until", type=_time_ms, metavar="TIME",
                        help="dead letters up to this time (ISO 8601)")
    replay.add_argument("--force", action="store_true",
                        help="replay dead letters that were replayed before, again")
    replay.add_argument("--dry-run", action="store_true", help="say what would be replayed")
    replay.set_defaults(handler=_cmd_dlq_replay)


def _cmd_dlq_replay(args: argparse.Namespace) -> int:
    from mlflow_preproc.streaming import dead_letters

    config = settings.load("replay", args)
    offsets: dict[int, list[tuple[int, int]]] = {}
    for partition, span in args.offsets:
        offsets.setdefault(partition, []).append(span)
    select = dead_letters.Selection(set(args.stage), set(args.error_type), offsets,
                                    args.since, args.until)
    through = None
    if args.through:
        from mlflow_preproc.streaming.reprocess import Reprocessor

        through = Reprocessor.load(config, args.through, args.topic)
    report = dead_letters.replay(_kafka(config), args.topic, select, args.to, args.force,
                                 args.dry_run, through)
    print(f"mlflow-preproc dlq replay: {report.as_text(args.dry_run)}", file=sys.stderr)
    return EXIT_OK


def _time_ms(text: str) -> int:
    from datetime import datetime, timezone

    try:  # Python 3.10's fromisoformat does not read a trailing Z
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" and text
                                        else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time; e.g. "
                                         "2026-12-03T09:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def _offset_range(text: str) -> tuple[int, tuple[int, int]]:
    partition, _, span = text.partition(":")
    first, _, last = span.partition("-")
    if not (partition.isdigit() and first.isdigit() and last.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not PARTITION:FROM-TO; e.g. 0:100-250")
    return int(partition), (int(first), int(last))


_STATUS_EXAMPLES = """\
examples:
  mlflow-preproc status --group fink-stream --topic fink-alert
  mlflow-preproc status --group fink-stream --topic fink-alert \\
      --metrics http://stream-0:9100 --metrics http://stream-1:9100 --json
"""


def _add_status(sub: argparse._SubParsersAction) -> None:
    """status: a stream's group from the broker and its instances' metrics."""
    status = sub.add_parser("status", help="a stream's consumer group: members, lag, rates, "
                            "dead letters", epilog=_STATUS_EXAMPLES, description=_wrap(
                                "Read a stream's consumer group from the broker (state, members, "
                                "committed and end offsets of each partition of --topic) and "
                                "each instance's metrics endpoint (partitions, lag, records in/"
                                "out/failed and their rates, dead letters by stage and error "
                                "type, the brake). Commits nothing and joins no group."), **_PLAIN)
    status.add_argument("--group", required=True, help="the stream's CONSUMER_GROUP_ID")
    status.add_argument("--topic", help="its INPUT_TOPIC: committed offset and lag per partition")
    status.add_argument("--metrics", action="append", default=[], metavar="URL",
                        help="an instance's metrics endpoint, e.g. http://stream-0:9100 "
                        "(repeatable)")
    status.add_argument("--interval", type=float, default=2.0, metavar="S",
                        help="seconds between the two scrapes rates are taken from (default 2)")
    _add_json(status)
    settings.add_arguments(status, "dlq")
    status.set_defaults(handler=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from mlflow_preproc.streaming.status import status

    found = status(_kafka(settings.load("dlq", args)), args.group, args.topic,
                   tuple(args.metrics), args.interval)
    print(json.dumps(found.as_json(), indent=2) if args.json else found.as_text())
    return EXIT_OK


def _kafka(config: settings.Config) -> dict:
    """The Kafka clients' configuration of a command that reads and exits: librdkafka's own
    lines go through our logger, one of a kind per 30 s, as the stream's do (unlimited, a
    broker that is down was 194 lines in 14 s before the one line that says so)."""
    from mlflow_preproc.streaming.client_logs import client_logger

    return {**config.kafka, "logger": client_logger()}


# ---- monitoring: alert-rules, dashboard ---------------------------------------------------

def _add_alert_rules(sub: argparse._SubParsersAction) -> None:
    """alert-rules: Prometheus rules for the streams' metrics."""
    rules = sub.add_parser("alert-rules", help="Prometheus alerting rules for the streams",
                           description=_wrap(
                               "Print Prometheus alerting rules (a rule_files YAML) for "
                               "preprocessing streams and bridges: lag growing, no progress "
                               "with partitions assigned, dead-letter ratio, the dead-letter "
                               "brake, an instance down."),
                           epilog="examples:\n  mlflow-preproc alert-rules > preproc-rules.yml"
                                  "\n  promtool check rules preproc-rules.yml\n", **_PLAIN)
    rules.add_argument("--lag-threshold", type=int, default=1000, metavar="N",
                       help="lag (records) above which a growing lag alerts (default 1000)")
    rules.add_argument("--dead-letter-ratio", type=float, default=0.05, metavar="R",
                       help="share of dead-lettered records that alerts (default 0.05)")
    rules.set_defaults(handler=_cmd_alert_rules)


def _cmd_alert_rules(args: argparse.Namespace) -> int:
    from mlflow_preproc.monitoring.alert_rules import rules_yaml

    sys.stdout.write(rules_yaml(args.lag_threshold, args.dead_letter_ratio))
    return EXIT_OK


def _add_dashboard(sub: argparse._SubParsersAction) -> None:
    """dashboard: a Grafana dashboard of the streams' metrics."""
    board = sub.add_parser("dashboard", help="a Grafana dashboard for the streams",
                           description=_wrap(
                               "Print a Grafana dashboard (JSON, to import) of the streams' "
                               "metrics, per job and instance. Needs the monitoring "
                               "extra: pip install '.[monitoring]' in the mlflow-preproc clone."),
                           epilog="examples:\n  mlflow-preproc dashboard > preproc.json\n",
                           **_PLAIN)
    board.set_defaults(handler=_cmd_dashboard)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    try:
        from mlflow_preproc.monitoring.dashboard import dashboard_json

        print(dashboard_json())
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("grafana_foundation_sdk"):
            raise settings.ConfigError("the dashboard is built with grafana-foundation-sdk: "
                                       "pip install '.[monitoring]' in the "
                                       "mlflow-preproc clone") from None
        raise
    return EXIT_OK


# ---- deployments and builds: manifests, builds serve --------------------------------------

_MANIFESTS_EXAMPLES = """\
examples:
  mlflow-preproc manifests -m models:/fink-preproc/1 --name fink -C mode=kafka \\
      -C input_topic=fink-alert -C kafka_bootstrap_servers=kafka.alerts:9092 > fink.yaml
  mlflow-preproc manifests -m models:/fink-preproc/1 --name fink -C namespace=alerts \\
      -o manifests/
"""


def _add_manifests(sub: argparse._SubParsersAction) -> None:
    """manifests: the Kubernetes objects of a deployment, printed or written."""
    manifests = sub.add_parser(
        "manifests", help="Kubernetes YAML for a deployment", epilog=_MANIFESTS_EXAMPLES,
        description=_wrap("Print (or write to a folder) the Kubernetes objects of a "
                          "preprocessing deployment: the same -C keys and checks as mlflow "
                          "deployments create -t preproc -C backend=kubernetes, which applies "
                          "them."), **_PLAIN)
    _add_model_uri(manifests)
    manifests.add_argument("--name", required=True, help="deployment name")
    manifests.add_argument("-C", "--config", action="append", default=[], metavar="KEY=VALUE",
                           help="a preproc target key (mlflow deployments help -t preproc)")
    manifests.add_argument("-o", "--output", help="folder: one YAML file per object")
    manifests.set_defaults(handler=_cmd_manifests)


def _cmd_manifests(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mlflow_preproc.deploy.kubernetes.manifests import to_yaml
    from mlflow_preproc.deploy.target import PreprocDeploymentClient

    objects = PreprocDeploymentClient("preproc").manifests(args.name, args.model_uri,
                                                           _pairs(args.config))
    if not args.output:
        sys.stdout.write(to_yaml(objects))
        return EXIT_OK
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    for obj in objects:
        path = folder / f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_text(to_yaml([obj]))
        print(path, file=sys.stderr)
    return EXIT_OK


def _pairs(pairs: list[str]) -> dict[str, str]:
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise settings.ConfigError(f"-C {pair!r} is not key=value; e.g. -C mode=serve")
        config[key] = value
    return config


_SERVE_EXAMPLES = """\
examples:
  export MLFLOW_PREPROC_WEBHOOK_SECRET=... MLFLOW_PREPROC_API_TOKEN=...
  mlflow-preproc builds serve --host 0.0.0.0 --port 8765 --db builds.db
  mlflow-preproc builds serve --db builds.db -C mode=serve -C port=5001
"""


def _add_builds(sub: argparse._SubParsersAction) -> None:
    """builds: the build service's command group (serve)."""
    builds = sub.add_parser("builds", help="the build service (MLflow webhooks -> images)",
                            **_PLAIN)
    builds_sub = builds.add_subparsers(dest="builds_command", required=True)
    _add_builds_serve(builds_sub)


def _add_builds_serve(builds_sub: argparse._SubParsersAction) -> None:
    """builds serve: the build service in the foreground."""
    serve = builds_sub.add_parser(
        "serve", help="run the build service", epilog=_SERVE_EXAMPLES,
        description=_wrap("Receive MLflow model-registry webhooks and build requests; build "
                          "images on the local Docker engine. Webhook deliveries are verified "
                          "with the secret in MLFLOW_PREPROC_WEBHOOK_SECRET. Every other "
                          "endpoint but /health needs 'Authorization: Bearer "
                          "<MLFLOW_PREPROC_API_TOKEN>'; without that variable a random token "
                          "is made at start and logged once, on the line saying where the "
                          "service listens."), **_PLAIN)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--db", default="mlflow-preproc-builds.db",
                       help="SQLite file holding the build history")
    serve.add_argument("--max-builds", type=int, default=1, help="builds run at once")
    serve.add_argument("--allow-unsigned", action="store_true",
                       help="accept webhook deliveries without a signature: local "
                       "development only, so refused with a --host beyond loopback, with -C "
                       "and with MLFLOW_PREPROC_WEBHOOK_SECRET set")
    serve.add_argument("-C", "--deploy-config", action="append", default=[], metavar="KEY=VALUE",
                       help="after each successful preprocessing build, create or update its "
                       "deployment with these preproc target keys (name=... names it)")
    serve.set_defaults(handler=_cmd_builds_serve)


def _cmd_builds_serve(args: argparse.Namespace) -> int:
    from mlflow_preproc.builds.service import serve
    from mlflow_preproc.streaming.metrics import configure_logging

    configure_logging("text", "INFO")
    deploy = _pairs(args.deploy_config)
    serve(args.host, args.port, args.db, args.allow_unsigned, args.max_builds, deploy or None)
    return EXIT_OK


# ---- errors: which are the user's ---------------------------------------------------------

# The errors that are the user's to fix (printed as one line), by module: looked up only in
# the modules already imported, since an error class whose module was never imported cannot
# have been raised. Importing them all imported MLflow (seconds) to print status's line.
_USER_ERRORS = (
    ("mlflow.exceptions", "MlflowException"),
    ("mlflow_preproc.runtime.avro_schemas", "SchemaError"),
    ("mlflow_preproc.runtime.dependencies", "Misconfigured"),
    ("mlflow_preproc.streaming.embedded_broker", "BrokerError"),
    ("mlflow_preproc.streaming.errors", "FatalError"),
    ("mlflow_preproc.runtime.model_identity", "ModelNotFound"),
    ("mlflow_preproc.streaming.dead_letters", "DeadLetterError"),
    ("mlflow_preproc.streaming.status", "StatusError"),
)


def _is_user_error(exc: Exception) -> bool:
    kinds = [settings.ConfigError, FileNotFoundError, ValueError]
    kinds += [getattr(sys.modules[module], name) for module, name in _USER_ERRORS
              if module in sys.modules]
    return isinstance(exc, tuple(kinds))


def _one_line(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    if not _is_user_error(exc):  # a bug or an unforeseen condition: say what it was
        text = f"{type(exc).__name__}: {text} (set LOG_LEVEL=DEBUG for the traceback)"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
