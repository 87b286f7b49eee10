"""What every command says when no Kafka broker answers: where it looked, librdkafka's reason,
the setting to fix and, when the address is this machine's, the local broker to try things on
(``mlflow-preproc broker``): a newcomer who has not started one learns that it exists."""

from __future__ import annotations

DEFAULT_PORT = 9092  # mlflow-preproc broker's, and KAFKA_BOOTSTRAP_SERVERS's default
_LOOPBACK = ("127.", "localhost", "[::1]")


def cannot_reach(servers: str, reason: str) -> str:
    """The one line saying that no broker at ``servers`` answers, and what to do."""
    text = (f"cannot reach Kafka at {servers} ({reason}); check KAFKA_BOOTSTRAP_SERVERS "
            "(--kafka-bootstrap-servers) and that the broker is up")
    local = local_broker_command(servers)
    if local:
        text += f"; to try things on this machine, {local} runs one there"
    return text


def local_broker_command(servers: str) -> str | None:
    """``mlflow-preproc broker`` (with ``--port``) serving ``servers``, when they are all
    on this machine; None otherwise."""
    addresses = [s.strip() for s in servers.split(",") if s.strip()]
    if not addresses or not all(a.startswith(_LOOPBACK) for a in addresses):
        return None
    port = addresses[0].rpartition(":")[2]
    if not port.isdigit() or int(port) == DEFAULT_PORT:
        return "mlflow-preproc broker"
    return f"mlflow-preproc broker --port {port}"
