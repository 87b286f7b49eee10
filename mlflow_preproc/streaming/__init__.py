"""Kafka streaming: the consume -> process -> produce -> commit loop and its two users.

``loop`` (the at-least-once machinery: the cycle and what crosses concerns), ``stream``
(preprocess a topic into another), ``bridge`` (feed a topic to a model server), ``metrics``
(logs, /metrics, /healthz) and ``embedded_broker`` (a loopback broker for demos and tests).
Beside the loop, one concern each, none of which imports it: ``errors`` (what stops a loop),
``assignment`` (owned and paused partitions), ``output`` (the producer, its replacement and
error latch), ``delivery`` (what a delivery report means), ``headers`` (the ``x-preproc-*``
contract), ``message_size`` (limits and truncation), ``clients`` (librdkafka settings),
``topics`` (the broker and topics at start-up), ``checkpoint`` and ``transactions``.
"""
