"""The loop's librdkafka clients: their settings, each with why, and their creation.

The user's own settings (``config.kafka``) come after the loop's tuning, which they may
change, and before what the loop's guarantees need, which they may not (manual commits,
delivery reports of failures only, the callbacks).
"""

from __future__ import annotations

from collections.abc import Callable

from confluent_kafka import Consumer, KafkaException, Producer

from mlflow_preproc.config import Config, ConfigError, client_config_error
from mlflow_preproc.streaming.client_logs import client_logger
from mlflow_preproc.streaming.transactions import transactional_settings


def make_client(config: Config, cls: type, conf: dict):
    """``cls(conf)``; a setting librdkafka refuses is a ConfigError naming where it was set."""
    try:
        return cls(conf)
    except KafkaException as exc:
        raise client_config_error(config, exc.args[0].str()) from None


def isolation(config: Config, exactly_once: bool) -> dict[str, str]:
    """Exactly once reads committed input only: an upstream transaction that aborts never
    reaches this stream, so a chain of exactly-once streams stays exactly once."""
    if not exactly_once:
        return {}
    if config.kafka.get("isolation.level", "read_committed") != "read_committed":
        where = config.kafka_sources.get("isolation.level", "isolation.level")
        raise ConfigError(f"{where} sets isolation.level="
                          f"{config.kafka['isolation.level']}, which "
                          "PROCESSING_GUARANTEE=exactly-once cannot keep (it would read "
                          "aborted records); remove it, or use at-least-once")
    return {"isolation.level": "read_committed"}


def new_consumer(config: Config, group_id: str, isolation: dict[str, str],
                 stats_cb: Callable, error_cb: Callable, on_commit: Callable) -> Consumer:
    """The group's consumer: manual commits, ``isolation`` (see :func:`isolation`)."""
    return make_client(config, Consumer, {
        # librdkafka stops fetching for fetch.queue.backoff.ms (default 1 s) whenever its
        # prefetch queue is full (64 MB: ~64k records of 1 KB); a loop that drains that in
        # under a second then waits on an idle fetcher. 10 ms: +45% on 1 KB records
        # (benchmarks/stream_throughput.py).
        "fetch.queue.backoff.ms": 10,
        **config.kafka,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": config["AUTO_OFFSET_RESET"],
        **isolation,
        "statistics.interval.ms": 1000 if config["METRICS_PORT"] else 0,
        "stats_cb": stats_cb,
        "error_cb": error_cb,
        "on_commit": on_commit,
        "logger": client_logger(),
    })


def new_producer(config: Config, group_id: str, exactly_once: bool,
                 error_cb: Callable) -> Producer:
    """An idempotent producer reporting failed deliveries only; transactional (its id
    derived from ``group_id``) with ``exactly_once``."""
    return make_client(config, Producer, {
        # Idempotence keeps retried sends from duplicating or reordering outputs.
        "enable.idempotence": True,
        "linger.ms": 5,
        **config.kafka,
        **(transactional_settings(group_id, config["COMMIT_INTERVAL_MS"],
                                  config.kafka) if exactly_once else {}),
        # Successes are known from flush(); see the docstring of streaming/loop.py.
        "delivery.report.only.error": True,
        "error_cb": error_cb,
        "logger": client_logger(),
    })
