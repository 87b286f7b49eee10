"""All user-facing settings of the stream, bridge and serving modes, in one table.

Each setting is read from a command-line flag, else from its environment variable(s), else its
default. Names from the legacy runner (``KAFKA_BOOTSTRAP_SERVERS``, ``INPUT_TOPIC``...) are the
primary ones; ``settings_table_markdown()`` renders the table docs/reference.md shows.

librdkafka settings pass through under one explicit prefix: ``LIBRDKAFKA_<NAME>`` sets
``<name>`` with ``_`` read as ``.`` (``LIBRDKAFKA_SASL_MECHANISM=PLAIN`` -> ``sasl.mechanism``),
and ``KAFKA_CONFIG_FILE`` names a properties file (``key=value`` lines). Other ``KAFKA_*``
variables are not librdkafka's: Kubernetes sets ``KAFKA_PORT=tcp://...`` for a Service named
``kafka``, and Docker links set more of them.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Kept here, not imported from runtime.formats: this module loads before anything heavy, so
# the stream and bridge commands catch SIGTERM from their first fraction of a second.
MESSAGE_FORMATS = ("json", "avro", "confluent-avro")
# How the bridge sends records to a model server: auto, or one of MLflow's scoring formats.
PAYLOAD_FORMATS = ("auto", "dataframe_split", "dataframe_records", "instances", "inputs")
ZTF_CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


# What one Avro container block (a Kafka message: all its blocks) may decode to. A compressed
# block of 30 kB can inflate to hundreds of MB; in a memory-limited container that would be
# an OOM kill at the same offset forever, so past this the record is refused instead.
MAX_DECODED_BYTES_DEFAULT = 64 * 1024 * 1024


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable and the fix."""


# The commands that talk to Kafka, and so read its connection settings.
_KAFKA_CLIENTS = ("stream", "bridge", "dlq", "replay")


@dataclass(frozen=True)
class Setting:
    env: str
    default: Any
    help: str
    kind: type = str
    choices: tuple[str, ...] | None = None
    modes: tuple[str, ...] = ("stream", "bridge")
    example: str = ""
    # Numbers only: a value outside [minimum, maximum] is refused at start-up. A negative
    # timeout once meant "block forever" to librdkafka, so every number has a range.
    minimum: float | None = None
    maximum: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")


SETTINGS: dict[str, Setting] = {s.env: s for s in (
    Setting("MODEL_URI", None, "MLflow URI of the preprocessing model (in an image, whose model "
            "is baked in, only its name in provenance headers and default topic and group "
            "names)", modes=("stream",), example="models:/fink-preproc/1"),
    Setting("PREDICTION_MODEL_URI", None, "A model run in the same process on the preprocessed "
            "features (any MLflow pyfunc, e.g. an sklearn classifier); the stream then produces "
            "its predictions ({KEEP_FIELDS..., prediction})", modes=("stream", "replay"),
            example="models:/fink-classifier/1"),
    Setting("KEEP_FIELDS", "", "With PREDICTION_MODEL_URI: comma-separated field paths of the "
            "input copied into each prediction record", modes=("stream", "replay"),
            example="objectId,candid"),
    Setting("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092", "Kafka bootstrap servers",
            example="broker-1:9092,broker-2:9092", modes=_KAFKA_CLIENTS),
    Setting("KAFKA_SECURITY_PROTOCOL", None, "librdkafka security.protocol",
            example="SASL_SSL", modes=_KAFKA_CLIENTS),
    Setting("KAFKA_CONFIG_FILE", None, "librdkafka properties file (key=value lines), e.g. "
            "for SASL/SSL settings", example="/etc/kafka/client.properties", modes=_KAFKA_CLIENTS),
    Setting("INPUT_TOPIC", None, "Topic to consume", example="fink-alert"),
    Setting("OUTPUT_TOPIC", None, "Topic to produce to; stream default "
            "{model_name}-{version}-{KAFKA_TOPIC_SUFFIX} for a registered model",
            modes=("stream", "bridge", "replay"), example="preprocessed"),
    Setting("KAFKA_TOPIC_SUFFIX", "preprocessed", "Suffix of the default output topic",
            modes=("stream", "replay"), example="cleaned"),
    Setting("DLQ_TOPIC", None, "Dead-letter topic for records that cannot be processed "
            "(default {INPUT_TOPIC}-dlq)", example="fink-alert-dlq"),
    Setting("CONSUMER_GROUP_ID", None, "Consumer group (default: stream mlflow-preproc-{model "
            "name}, bridge mlflow-preproc-bridge-{OUTPUT_TOPIC}, a deployment "
            "mlflow-preproc-{deployment name}); instances in one group share the partitions",
            example="preprocessing-group"),
    Setting("AUTO_OFFSET_RESET", "earliest", "Where a new group starts",
            choices=("earliest", "latest"), example="latest"),
    Setting("INPUT_FORMAT", "json", "Format of input message values", choices=MESSAGE_FORMATS,
            modes=("stream", "bridge", "replay"),
            example="avro"),
    Setting("OUTPUT_FORMAT", "json", "Format of output message values",
            choices=MESSAGE_FORMATS, modes=("stream", "bridge", "replay"), example="avro"),
    Setting("AVRO_SCHEMA_PATH", None, "Schema of schemaless Avro input (default: the schema "
            "stored with the model)", modes=("stream", "replay"), example="/app/schemas/alert.avsc"),
    Setting("OUTPUT_AVRO_SCHEMA_PATH", None, "Schema of Avro output (default: the output "
            "schema stored with the model)", modes=("stream", "replay"), example="out.avsc"),
    Setting("AVRO_SCHEMA_DIR", None, "Folder of <schema id>.avsc files for confluent-avro "
            "input", modes=("stream", "replay"), example="/app/schemas/by-id"),
    Setting("SCHEMA_REGISTRY_URL", None, "Confluent Schema Registry for confluent-avro",
            modes=("stream", "replay"), example="http://registry:8081"),
    Setting("SKIP_CUTOUTS", False, "Drop the ZTF image stamps (" + ", ".join(ZTF_CUTOUTS) +
            ") before preprocessing", kind=bool, modes=("stream", "run", "replay"), example="true"),
    Setting("DROP_FIELDS", "", "Comma-separated field paths dropped before preprocessing",
            modes=("stream", "run", "replay"), example="cutoutScience,candidate.pdiffimfilename"),
    Setting("PARITY_CHECK", "refuse", "What a runtime does when the model's reference records "
            "(log_model's reference_records) give other outputs here than when the model was "
            "logged: refuse to start, with the diff, or warn (log the diff) and serve. Read "
            "at every start: stream, run, dlq replay --through, mlflow models serve (and any "
            "pyfunc load), each Spark executor, the preproc target's image build",
            choices=("refuse", "warn"), modes=("stream", "run", "replay", "image"),
            example="warn"),
    Setting("MAX_DECODED_BYTES", MAX_DECODED_BYTES_DEFAULT, "Largest decoded size of an Avro "
            "container block in any codec (of a whole message in stream and bridge), and, "
            "divided by 8, the most values one Avro record may decode to; a block or record "
            "over it is a dead letter or a reject, never an out-of-memory kill or a hang. Keep "
            "it well under the memory limit", kind=int, modes=("stream", "bridge", "run", "replay"), example="268435456",
            minimum=1024, maximum=2**40),
    Setting("AVRO_COLUMNS", True, "Read the Avro container and Confluent-framed messages of a "
            "batch in one call with polars-avro, when installed (pip install '.[columnar]' in "
            "the mlflow-preproc clone): the same "
            "records, ~4x less CPU (run: Avro files too); false: fastavro, one message at a time",
            kind=bool, modes=("stream", "replay", "run"), example="false"),
    Setting("BATCH_SIZE", 500, "Records per batch (stream: per consume; bridge: per "
            "/invocations call)", kind=int, example="100", minimum=1, maximum=1_000_000),
    Setting("BATCH_TIMEOUT_MS", 1000, "Longest wait to fill a batch", kind=int, example="200",
            minimum=0, maximum=3_600_000),
    Setting("PROCESSING_GUARANTEE", "at-least-once", "at-least-once: outputs are delivered, "
            "then their input offsets committed; a crash or rebalance may produce some outputs "
            "twice. exactly-once: outputs, dead letters and input offsets of each commit "
            "interval are one Kafka transaction, committed together or not at all, and the "
            "input is read with isolation.level=read_committed (Apache Kafka 2.5+; readers of "
            "the outputs see each record once with read_committed, later by up to "
            "COMMIT_INTERVAL_MS)", choices=("at-least-once", "exactly-once"),
            example="exactly-once"),
    Setting("COMMIT_INTERVAL_MS", 1000, "Commit input offsets at most this often, once every "
            "output so far is acknowledged (0: after every batch); a crash reprocesses at most "
            "this much. Exactly-once: the length of a transaction, so also how long its "
            "outputs wait to be visible", kind=int, example="5000", minimum=0,
            maximum=3_600_000),
    Setting("AUTO_CREATE_TOPICS", True, "Create missing output and dead-letter topics "
            "(false: a missing topic is a fatal error)", kind=bool, example="false"),
    Setting("API_URL", None, "Model server base URL", modes=("bridge",),
            example="http://127.0.0.1:8080"),
    Setting("API_ENDPOINT", "/invocations", "Model server scoring path", modes=("bridge",),
            example="/invocations"),
    Setting("PAYLOAD_FORMAT", "auto", "How the bridge sends records to the model: auto (named "
            "records as dataframe_split, feature vectors as instances) or one of MLflow's "
            "scoring formats", choices=PAYLOAD_FORMATS, modes=("bridge",), example="inputs"),
    Setting("REQUEST_TIMEOUT_S", 30.0, "Timeout of one /invocations call", kind=float,
            modes=("bridge",), example="10", minimum=0.1, maximum=3600),
    Setting("RECORD_ATTEMPTS", 3, "Times the bridge asks the model server again for one record "
            "it fails alone (5xx, no answer in time, an answer with no prediction) while it "
            "answers other records, before the record goes to the dead-letter topic; a server "
            "failing every record is waited for instead", kind=int, modes=("bridge",),
            example="5", minimum=1, maximum=1000),
    Setting("DLQ_BRAKE_RATIO", 0.5, "Dead-letter brake: when more than this share of the last "
            "DLQ_BRAKE_WINDOW records went to the dead-letter topic, stop committing, pause and "
            "fail /healthz (1: never)", kind=float, example="0.9", minimum=0, maximum=1),
    Setting("DLQ_BRAKE_WINDOW", 200, "Records the dead-letter brake looks back over",
            kind=int, example="1000", minimum=10, maximum=10_000_000),
    Setting("METRICS_PORT", 0, "Port of the Prometheus /metrics and /healthz endpoint "
            "(0: off)", kind=int, example="9100", minimum=0, maximum=65535),
    Setting("METRICS_HOST", "0.0.0.0", "Interface of the metrics endpoint", example="127.0.0.1"),
    Setting("HEALTH_STALL_S", 120.0, "/healthz fails when the loop made no progress for this "
            "long", kind=float, example="60", minimum=1, maximum=86400),
    Setting("STATS_INTERVAL_S", 30.0, "Seconds between stats log lines", kind=float,
            example="10", minimum=0.1, maximum=86400),
    Setting("SHUTDOWN_TIMEOUT_S", 30.0, "On SIGTERM: longest wait for in-flight records to be "
            "delivered and committed", kind=float, example="10", minimum=0, maximum=3600),
    Setting("LOG_FORMAT", "auto", "Log lines as json or text; auto: text on a terminal, "
            "json otherwise (containers, files, log shippers)",
            choices=("auto", "json", "text"), example="text"),
    Setting("LOG_LEVEL", "INFO", "Log level", example="DEBUG"),
    Setting("MLFLOW_PREPROC_MODE", "serve", "What a serving image runs: serve (MLflow's scoring "
            "server), kafka (the consumer), both, run (stdin to stdout), bridge; the legacy "
            "KAFKA_ENABLED=true means both", choices=("serve", "kafka", "both", "run", "bridge"),
            modes=("image",), example="both"),
    Setting("KAFKA_CONSUMERS", 1, "Consumer processes per container in kafka/both mode (never "
            "multiplied by HTTP workers)", kind=int, modes=("image",), example="2",
            minimum=1, maximum=64),
    Setting("PORT", 8080, "Port of the scoring server in an image", kind=int, modes=("image",),
            example="5001", minimum=1, maximum=65535),
    Setting("HOST", "0.0.0.0", "Interface of the scoring server in an image", modes=("image",),
            example="127.0.0.1"),
    Setting("MLFLOW_MODELS_WORKERS", None, "Scoring server workers (MLflow's default: CPU "
            "count)", kind=int, modes=("image",), example="2", minimum=1, maximum=256),
)}


LIBRDKAFKA_PREFIX = "LIBRDKAFKA_"

# Set by the preproc target in every container it starts, never by users: which deployment and
# revision a stream is. The stream exports them (``mlflow_preproc_revision``), which is how the
# PreprocRolloutRolledBack alert sees a newer revision replaced by an older one.
DEPLOYMENT_ENV = "MLFLOW_PREPROC_DEPLOYMENT"
REVISION_ENV = "MLFLOW_PREPROC_REVISION"


@dataclass
class Config:
    """Resolved settings for one command, keyed by environment variable name.

    ``kafka`` is the librdkafka configuration; ``kafka_sources`` says where each of its
    properties came from, so an error from librdkafka can name the variable to fix.
    """

    values: dict[str, Any]
    kafka: dict[str, str] = field(default_factory=dict)
    kafka_sources: dict[str, str] = field(default_factory=dict)
    deployment: str = ""  # DEPLOYMENT_ENV and REVISION_ENV: set by the target, not a setting
    revision: int = 0

    def __getitem__(self, env: str) -> Any:
        return self.values[env]

    def require(self, env: str) -> Any:
        value = self.values.get(env)
        if value in (None, ""):
            s = SETTINGS[env]
            raise ConfigError(f"{env} is not set; set it ({s.flag} or the environment "
                              f"variable), e.g. {env}={s.example}")
        return value

    def comma_list(self, env: str) -> list[str]:
        """A comma-separated setting as a list."""
        return [p.strip() for p in (self.values.get(env) or "").split(",") if p.strip()]

    def drop_fields(self) -> list[str]:
        paths = self.comma_list("DROP_FIELDS")
        return paths + (list(ZTF_CUTOUTS) if self.values["SKIP_CUTOUTS"] else [])


def add_arguments(parser: argparse.ArgumentParser, mode: str,
                  short: Mapping[str, str] | None = None) -> None:
    """Add a ``--flag`` for every setting of ``mode``; unset flags fall back to the env.

    A boolean setting is a flag (``--skip-cutouts``, ``--no-skip-cutouts``), the same in
    every command. ``short`` gives some settings a short flag too (``{"MODEL_URI": "-m"}``).
    """
    group = parser.add_argument_group("settings (flag, or environment variable)")
    for s in SETTINGS.values():
        if mode not in s.modes:
            continue
        flags = [short[s.env]] if short and s.env in short else []
        flags.append(s.flag)
        if s.kind is bool:
            # default None, not False: an absent flag leaves the environment variable in force
            group.add_argument(*flags, dest=s.env, default=None,
                               action=argparse.BooleanOptionalAction,
                               help=f"{s.help} [{s.env}, default {str(s.default).lower()}]")
            continue
        group.add_argument(*flags, dest=s.env, default=None, metavar=s.env,
                           choices=s.choices if s.kind is str else None,
                           help=f"{s.help} [{s.env}, default {s.default!r}]")


def load(mode: str, args: argparse.Namespace | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    """Resolve every setting of ``mode`` from flags, environment and defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in SETTINGS.values():
        if mode not in s.modes:
            continue
        raw = getattr(args, s.env, None) if args is not None else None
        if raw is None:
            raw = environ.get(s.env)
        values[s.env] = s.default if raw in (None, "") else _convert(s, raw)
    kafka, sources = kafka_settings(values.get("KAFKA_CONFIG_FILE"), environ)
    revision = environ.get(REVISION_ENV, "")
    config = Config(values, kafka, sources, environ.get(DEPLOYMENT_ENV, ""),
                    int(revision) if revision.isdigit() else 0)
    if "KAFKA_BOOTSTRAP_SERVERS" not in values:  # the image's own settings name no broker
        return config
    # A flag or variable wins over the properties file, which wins over the default.
    flag_or_env = getattr(args, "KAFKA_BOOTSTRAP_SERVERS", None) or \
        environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if flag_or_env or "bootstrap.servers" not in kafka:
        kafka["bootstrap.servers"] = values["KAFKA_BOOTSTRAP_SERVERS"]
        sources["bootstrap.servers"] = "KAFKA_BOOTSTRAP_SERVERS"
    values["KAFKA_BOOTSTRAP_SERVERS"] = kafka["bootstrap.servers"]
    if values["KAFKA_SECURITY_PROTOCOL"]:
        kafka["security.protocol"] = values["KAFKA_SECURITY_PROTOCOL"]
        sources["security.protocol"] = "KAFKA_SECURITY_PROTOCOL"
    return config


def parse_value(env: str, raw: str) -> Any:
    """``raw`` as setting ``env`` reads it (``"5"`` -> 5); raises :class:`ConfigError` naming
    the variable for a value it refuses, as :func:`load` would."""
    return _convert(SETTINGS[env], raw)


def _convert(s: Setting, raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    try:
        if s.kind is bool:
            return parse_bool(raw, s.env)
        value = s.kind(raw)
    except ConfigError:
        raise
    except ValueError:
        raise ConfigError(f"{s.env}={raw!r} is not a valid {s.kind.__name__}; e.g. "
                          f"{s.env}={s.example}") from None
    if s.choices and value not in s.choices:
        raise ConfigError(f"{s.env}={raw!r} is not one of {', '.join(s.choices)}")
    if s.minimum is not None and value < s.minimum:
        raise ConfigError(f"{s.env}={raw} is below its minimum {s.minimum:g}; e.g. "
                          f"{s.env}={s.example}")
    if s.maximum is not None and value > s.maximum:
        raise ConfigError(f"{s.env}={raw} is above its maximum {s.maximum:g}; e.g. "
                          f"{s.env}={s.example}")
    return value


def parse_bool(raw: str, name: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use true or false")


def kafka_settings(config_file: str | None, environ: Mapping[str, str]
                   ) -> tuple[dict[str, str], dict[str, str]]:
    """librdkafka settings: the properties file, then ``LIBRDKAFKA_*`` variables.

    Returns the configuration and, per property, the variable or file line that set it.
    """
    conf: dict[str, str] = {}
    sources: dict[str, str] = {}
    if config_file:
        for key, (value, line) in _read_properties(config_file).items():
            conf[key] = value
            sources[key] = f"{config_file} line {line} (KAFKA_CONFIG_FILE)"
    for name, value in environ.items():
        if name.startswith(LIBRDKAFKA_PREFIX) and len(name) > len(LIBRDKAFKA_PREFIX):
            key = name[len(LIBRDKAFKA_PREFIX):].lower().replace("_", ".")
            conf[key] = value
            sources[key] = name
    return conf, sources


def client_config_error(config: Config, message: str) -> ConfigError:
    """A librdkafka refusal of a property (``No such configuration property: "port"``,
    ``Invalid value ... for configuration property "linger.ms"``, ```session.timeout.ms` is not
    supported for `group.protocol=consumer` ...``) as a ConfigError naming the variable or
    file line that set it."""
    # Unknown properties and bad values are named in double quotes; the classic group
    # settings that group.protocol=consumer (KIP-848) refuses, in backquotes.
    match = re.search(r'property:? "([^"]+)"|`([a-z0-9.]+)`', message)
    prop = (match.group(1) or match.group(2)) if match else None
    where = config.kafka_sources.get(prop) if prop else None
    if where is None:
        return ConfigError(f"librdkafka refused the Kafka client configuration: {message}; "
                           "check LIBRDKAFKA_* variables and KAFKA_CONFIG_FILE")
    return ConfigError(f"{where} sets the librdkafka property {prop!r}, which librdkafka "
                       f"refuses ({message}); fix or remove it (librdkafka's properties: "
                       "https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md)")


def _read_properties(path: str) -> dict[str, tuple[str, int]]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as exc:
        raise ConfigError(f"KAFKA_CONFIG_FILE={path}: {exc.strerror}; point it at a "
                          "readable key=value file") from None
    conf = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"{path} line {n} is not key=value: {line!r}")
        conf[key.strip()] = (value.strip(), n)
    return conf


def sanitize_topic(name: str) -> str:
    """A valid Kafka topic name (``[a-zA-Z0-9._-]``, at most 249 characters)."""
    return re.sub(r"[^a-zA-Z0-9._-]+", "-", name).strip("-")[:249]


def settings_table_markdown() -> str:
    """The settings table of docs/reference.md."""
    rows = ["| variable | flag | default | modes | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS.values():
        default = "" if s.default in (None, "") else f"`{s.default}`"
        choices = f" ({' / '.join(s.choices)})" if s.choices else ""
        rows.append(f"| `{s.env}` | `{s.flag}` | {default} | {', '.join(s.modes)} | "
                    f"{s.help}{choices} |")
    return "\n".join(rows)

