"""Model bridge: feed a preprocessed topic to a model server, produce its predictions.

    message in -> decode (JSON) -> POST {API_URL}{API_ENDPOINT} in batches -> prediction out

Named records go as ``dataframe_split`` (their keys are the columns), feature vectors as
``instances`` (``PAYLOAD_FORMAT`` picks another of MLflow's scoring formats, e.g. ``inputs``
for a tensor signature).

Each prediction is produced keyed like its input. A model server that is down or answers 5xx
is retried with backoff (nothing is committed meanwhile); a batch refused with 4xx is retried
record by record, and the records the model refuses go to the dead-letter topic with the
server's message. Delivery, commits and shutdown are :class:`KafkaLoop`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import requests
from confluent_kafka import Message

from mlflow_preproc.config import Config, ConfigError, sanitize_topic
from mlflow_preproc.runtime.formats import MessageDecoder
from mlflow_preproc.runtime.jsonable import dumps
from mlflow_preproc.runtime.model_input import payload, per_record
from mlflow_preproc.streaming.loop import Abandon, KafkaLoop
from mlflow_preproc.streaming.shutdown import Shutdown

logger = logging.getLogger("mlflow_preproc")

_MAX_BACKOFF_S = 10.0


class ModelRejected(Exception):
    """The model server refused the input (HTTP 4xx); the message is the server's."""


class Bridge(KafkaLoop):
    """Calls an MLflow scoring server for every record of a topic, at least once."""

    command = "bridge"

    def __init__(self, config: Config, shutdown: Shutdown | None = None):
        output_topic = config.require("OUTPUT_TOPIC")
        # One group per output: two bridges feeding different models each see every record.
        group = config["CONSUMER_GROUP_ID"] or sanitize_topic(f"mlflow-preproc-bridge-"
                                                              f"{output_topic}")
        super().__init__(config, config.require("INPUT_TOPIC"), output_topic,
                         config["DLQ_TOPIC"], group, shutdown=shutdown)
        self.url = config.require("API_URL").rstrip("/") + config["API_ENDPOINT"]
        self.timeout = config["REQUEST_TIMEOUT_S"]
        self.payload_format = config["PAYLOAD_FORMAT"]
        self.decoder = MessageDecoder(config["INPUT_FORMAT"], any_json=True,
                                      max_decoded_bytes=config["MAX_DECODED_BYTES"])
        self.session = requests.Session()
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"API_URL={config['API_URL']!r} is not an http(s) URL; e.g. "
                              "API_URL=http://127.0.0.1:8080")

    @classmethod
    def from_config(cls, config: Config, shutdown: Shutdown | None = None) -> Bridge:
        return cls(config, shutdown)

    def handle_batch(self, messages: Sequence[Message]) -> None:
        records, owners = self.decode(messages, self.decoder)
        if not records:
            return
        # predict: the whole batch, or record by record when the model refuses the batch
        # (a shutdown while the server is down raises Abandon: the batch stays uncommitted)
        try:
            predictions: list[Any] = self._predict(records)
        except ModelRejected:
            predictions = []
            for record in records:
                try:
                    predictions.extend(self._predict([record]))
                except ModelRejected as exc:
                    predictions.append(exc)
        # produce
        for msg, prediction in zip(owners, predictions):
            if isinstance(prediction, ModelRejected):
                self.dead_letter(msg, "predict", prediction)
                continue
            self.produce(msg, [dumps(prediction)])

    def _predict(self, records: list[Any]) -> list[Any]:
        body = dumps(payload(records, self.payload_format))
        delay = 0.5
        while True:
            try:
                resp = self.session.post(self.url, data=body, timeout=self.timeout,
                                         headers={"Content-Type": "application/json"})
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    return self._predictions(resp, len(records))
                if resp.status_code < 500:
                    raise ModelRejected(f"the model server refused the input with HTTP "
                                        f"{resp.status_code}: {_message(resp)}")
                problem = f"HTTP {resp.status_code}: {_message(resp)}"
            if self.shutdown.requested:
                raise Abandon(problem)
            # The server is down or failing: keep the batch, wait (input paused, the consumer
            # polled so the group keeps us) and retry; the loop is healthy, its dependency is
            # not, so don't let /healthz restart us for it.
            logger.warning("model server unavailable; retrying", extra={
                "event": "model_unavailable", "url": self.url, "error": problem,
                "retry_in_s": delay})
            self.stats.alive()
            self.wait(delay)
            delay = min(delay * 2, _MAX_BACKOFF_S)

    @staticmethod
    def _predictions(resp: requests.Response, expected: int) -> list[Any]:
        try:
            predictions = resp.json()["predictions"]
        except (ValueError, KeyError, TypeError):
            raise ModelRejected(f"the model server's answer has no 'predictions' list: "
                                f"{resp.text[:300]}") from None
        try:
            return per_record(predictions, expected)
        except ValueError as exc:
            raise ModelRejected(f"{exc}; a bridge needs one per record") from None


def _message(resp: requests.Response) -> str:
    try:
        return str(resp.json().get("message", resp.text))[:1000]
    except ValueError:
        return resp.text[:1000]
