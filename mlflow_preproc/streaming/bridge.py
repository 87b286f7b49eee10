"""Model bridge: feed a preprocessed topic to a model server, produce its predictions.

    message in -> decode (JSON) -> POST {API_URL}{API_ENDPOINT} in batches -> prediction out

Named records go as ``dataframe_split`` (their keys are the columns), feature vectors as
``instances`` (``PAYLOAD_FORMAT`` picks another of MLflow's scoring formats, e.g. ``inputs``
for a tensor signature).

Each prediction is produced keyed like its input. What the server answers decides what
happens to the records (:func:`judge`):

- 400, 413, 422 judge the input: a refused batch is retried record by record, and the records
  the model refuses go to the dead-letter topic with the server's message;
- a server that is down, times out, or answers 408, 425, 429 or 5xx is waited for, with
  backoff (``Retry-After`` honoured), input paused and nothing committed;
- any other 4xx (401, 403, 404...) says the bridge is misconfigured: it stops (exit 2) with
  nothing committed, rather than dead-letter a whole topic.

Delivery, commits and shutdown are :class:`KafkaLoop`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

import requests
from confluent_kafka import Message

from mlflow_preproc.config import Config, ConfigError, sanitize_topic
from mlflow_preproc.runtime.dependencies import Misconfigured, Unavailable
from mlflow_preproc.runtime.formats import MessageDecoder
from mlflow_preproc.runtime.jsonable import dumps
from mlflow_preproc.runtime.model_input import payload, per_record
from mlflow_preproc.streaming.loop import KafkaLoop
from mlflow_preproc.streaming.shutdown import Shutdown

class ModelRejected(Exception):
    """The model server refused the input (HTTP 400/413/422); the message is the server's."""


class Answer(Enum):
    """What an HTTP status of the model server says."""

    PREDICTED = "predicted"
    REFUSED_INPUT = "refused the input"  # a verdict on the records: dead letters
    UNAVAILABLE = "unavailable"  # the server's state, not the records': wait and retry
    MISCONFIGURED = "misconfigured"  # wrong URL, endpoint or credentials: stop


_REFUSED_INPUT = {400, 413, 422}
_UNAVAILABLE = {408, 425, 429}


def judge(status: int) -> Answer:
    """Sort a model server's HTTP status: only answers about the input may dead-letter."""
    if status < 400:
        return Answer.PREDICTED
    if status in _REFUSED_INPUT:
        return Answer.REFUSED_INPUT
    if status in _UNAVAILABLE or status >= 500:
        return Answer.UNAVAILABLE
    return Answer.MISCONFIGURED


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
        # A server that is down or failing is waited for (input paused, the consumer polled
        # so the group keeps us); a shutdown meanwhile leaves the batch uncommitted.
        return self.when_available(self._post, dumps(payload(records, self.payload_format)),
                                   len(records))

    def _post(self, body: bytes, expected: int) -> list[Any]:
        try:
            resp = self.session.post(self.url, data=body, timeout=self.timeout,
                                     headers={"Content-Type": "application/json"})
        except requests.RequestException as exc:
            raise Unavailable("model server", f"{type(exc).__name__}: {exc}") from None
        answer = judge(resp.status_code)
        if answer is Answer.PREDICTED:
            return self._predictions(resp, expected)
        if answer is Answer.REFUSED_INPUT:
            raise ModelRejected(f"the model server refused the input with HTTP "
                                f"{resp.status_code}: {_message(resp)}")
        if answer is Answer.MISCONFIGURED:
            raise Misconfigured(_misconfigured(self.url, resp))
        raise Unavailable("model server", f"HTTP {resp.status_code}: {_message(resp)}",
                          _retry_after(resp))

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


def _misconfigured(url: str, resp: requests.Response) -> str:
    if resp.status_code in (401, 403):
        fix = "give the bridge credentials the server accepts, or check API_URL"
    else:
        fix = "check API_URL and API_ENDPOINT (MLflow's scoring server serves /invocations)"
    return (f"the model server at {url} answered HTTP {resp.status_code} "
            f"({_message(resp)[:200]}): the bridge is misconfigured, not the records; {fix}. "
            "Nothing was committed.")


def _retry_after(resp: requests.Response) -> float:
    """The seconds of a ``Retry-After: <seconds>`` header (0 without one)."""
    try:
        return max(0.0, float(resp.headers.get("Retry-After", 0)))
    except ValueError:
        return 0.0  # an HTTP date: keep our own backoff


def _message(resp: requests.Response) -> str:
    try:
        return str(resp.json().get("message", resp.text))[:1000]
    except ValueError:
        return resp.text[:1000]
