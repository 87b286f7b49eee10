"""The build service's history: one SQLite table, safe across restarts.

A build is ``queued`` -> ``running`` -> ``succeeded`` | ``failed``. A service that stops while
a build runs marks it failed when it starts again (:meth:`BuildStore.recover`), so no build
is silently lost. ``event_key`` is unique: a webhook delivered twice builds once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

STATUSES = ("queued", "running", "succeeded", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS builds (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,            -- preprocessing | model
    model_uri TEXT NOT NULL,
    image TEXT,
    status TEXT NOT NULL,
    event_key TEXT UNIQUE,         -- webhook delivery identity, for deduplication
    config TEXT NOT NULL,          -- JSON: build/deploy options
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    log_tail TEXT,
    deployment TEXT
)
"""


@dataclass
class Build:
    """One image build, as stored and as the HTTP API shows it."""

    id: str
    kind: str
    model_uri: str
    status: str
    config: dict[str, Any] = field(default_factory=dict)
    image: str | None = None
    event_key: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    log_tail: str | None = None
    deployment: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["duration_s"] = (round(self.finished_at - self.started_at, 2)
                              if self.finished_at and self.started_at else None)
        return data


class BuildStore:
    """Thread-safe access to the builds table."""

    def __init__(self, path: str):
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)

    def recover(self) -> list[str]:
        """Mark builds that were running when the service stopped as failed."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM builds WHERE status = 'running'").fetchall()
            self._db.execute(
                "UPDATE builds SET status = 'failed', finished_at = ?, error = ? "
                "WHERE status = 'running'",
                (time.time(), "the build service stopped while this build ran; submit it again"))
        return [r["id"] for r in rows]

    def add(self, kind: str, model_uri: str, config: dict[str, Any] | None = None,
            event_key: str | None = None) -> tuple[Build, bool]:
        """Queue a build; returns ``(build, created)``, the existing build for a known event."""
        build = Build(id=uuid.uuid4().hex[:12], kind=kind, model_uri=model_uri, status="queued",
                      config=config or {}, event_key=event_key, created_at=time.time())
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO builds (id, kind, model_uri, status, event_key, config, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (build.id, kind, model_uri, "queued", event_key, json.dumps(build.config),
                     build.created_at))
                return build, True
            except sqlite3.IntegrityError:
                row = self._db.execute("SELECT * FROM builds WHERE event_key = ?",
                                       (event_key,)).fetchone()
                return _build(row), False

    def update(self, build_id: str, **fields: Any) -> None:
        if "config" in fields:
            fields["config"] = json.dumps(fields["config"])
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE builds SET {assignments} WHERE id = ?",
                             (*fields.values(), build_id))

    def get(self, build_id: str) -> Build | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM builds WHERE id = ?", (build_id,)).fetchone()
        return _build(row) if row else None

    def list(self, status: str | None = None, limit: int = 200) -> list[Build]:
        query, args = "SELECT * FROM builds", ()
        if status:
            query, args = query + " WHERE status = ?", (status,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at DESC LIMIT ?",
                                    (*args, limit)).fetchall()
        return [_build(r) for r in rows]

    def delete(self, build_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM builds WHERE id = ?",
                                    (build_id,)).rowcount > 0

    def close(self) -> None:
        self._db.close()


def _build(row: sqlite3.Row) -> Build:
    data = dict(row)
    data["config"] = json.loads(data["config"])
    return Build(**data)
