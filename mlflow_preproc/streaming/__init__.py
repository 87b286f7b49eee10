"""Kafka streaming: the consume -> process -> produce -> commit loop and its two users.

``loop`` (the at-least-once machinery), ``stream`` (preprocess a topic into another),
``bridge`` (feed a topic to a model server), ``metrics`` (logs, /metrics, /healthz) and
``embedded_broker`` (a loopback broker for demos and tests).
"""
