"""Dead letters through a model version: the stream's data path, without its consumer.

    mlflow-preproc dlq replay raw-dlq --through models:/fink-preproc/4 --to clean

After a fix, the dead letters of the broken version are worth their outputs, not another trip
through the input topic (which every other consumer of it would see again). A
:class:`Reprocessor` is a :class:`~mlflow_preproc.streaming.stream.Stream` of the given model
whose outputs and dead letters are collected instead of produced: each dead letter is decoded,
preprocessed (and predicted, with ``PREDICTION_MODEL_URI``) and encoded exactly as ``stream``
would, from the same settings, and :func:`~mlflow_preproc.streaming.dead_letters.replay` sends
the outputs in its own transaction. A dead letter that fails again stays where it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from confluent_kafka import Message

from mlflow_preproc import config as settings
from mlflow_preproc.runtime.dependencies import Misconfigured, Unavailable
from mlflow_preproc.streaming.dead_letters import DeadLetter, DeadLetterError
from mlflow_preproc.streaming.errors import FatalError
from mlflow_preproc.streaming.headers import Headers, error_type_of
from mlflow_preproc.streaming.stream import Stream


@dataclass
class Outcome:
    """What the model made of one dead letter: outputs (none: the function dropped it), or
    the stage and error it failed at again."""

    letter: DeadLetter
    outputs: list[tuple[bytes, Headers]] = field(default_factory=list)
    failure: tuple[str, str, str] | None = None  # stage, error type, reason


class Reprocessor(Stream):
    """A stream of one model over dead letters: outputs and failures are collected."""

    command = "replay"

    @classmethod
    def load(cls, config: settings.Config, model_uri: str, dlq_topic: str) -> Reprocessor:
        """The model at ``model_uri`` with ``config``'s (``replay`` mode) settings; the
        stream's other settings (batching, commits, metrics) do not apply and keep their
        defaults. Its input is ``dlq_topic``, which it only reads."""
        values = {**settings.load("stream", environ={}).values, **config.values,
                  "MODEL_URI": model_uri, "INPUT_TOPIC": dlq_topic}
        return cls.from_config(replace(config, values=values))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, consumer=_NOT_USED, producer=_NOT_USED)
        self._outcomes: dict[int, Outcome] = {}

    def run_through(self, letters: Sequence[DeadLetter]) -> list[Outcome]:
        """Each of ``letters`` through decode, pre_processing [, predict] and encode, as one
        batch. A dependency that does not answer (a schema registry) stops the replay:
        a dead letter is never judged by the environment."""
        messages = [_message(d) for d in letters]
        self._outcomes = {id(m): Outcome(d) for m, d in zip(messages, letters)}
        try:
            self.handle_batch(messages)
        except (Unavailable, Misconfigured) as exc:  # an encoder's registry
            raise _stopped(exc) from None
        return list(self._outcomes.values())

    # The stream's outputs and dead letters, collected.
    def produce(self, source: Message, values: Sequence[bytes]) -> None:
        headers = self.output_headers(source)
        self._outcomes[id(source)].outputs.extend((value, headers) for value in values)

    def dead_letter(self, source: Message, stage: str, error: BaseException | str,
                    error_type: str | None = None, extra_headers: Headers = ()) -> None:
        outcome = self._outcomes[id(source)]
        if outcome.failure is None:
            outcome.failure = (stage, error_type or error_type_of(error), str(error))

    def when_available(self, call: Callable, *args):
        try:
            return call(*args)
        except (Unavailable, Misconfigured) as exc:
            raise _stopped(exc) from None


class ReplayStopped(DeadLetterError, FatalError):
    """A dependency did not answer or refused: the replay stops (a :class:`FatalError`, so
    the stream's decode step lets it through rather than judging the record)."""


def _stopped(exc: Exception) -> ReplayStopped:
    return ReplayStopped(f"{exc}; the replay stopped, and what it had not sent is not "
                         "recorded as replayed: run it again once it answers")


def _message(d: DeadLetter) -> Message:
    """``d`` as the input message it was: the source's topic, partition and offset (its
    outputs' ``x-preproc-source``), key, value and own headers."""
    topic, partition, offset = d.source or ("", d.partition, d.offset)
    return Message(topic=topic, partition=partition, offset=offset, key=d.key, value=d.value,
                   headers=d.original_headers(), timestamp=(1, d.timestamp_ms))


class _NotUsed:
    """The consumer and producer a reprocessor has none of: any use is a bug."""

    def __getattr__(self, name: str):
        raise AssertionError(f"a Reprocessor has no Kafka client ({name})")


_NOT_USED = _NotUsed()
