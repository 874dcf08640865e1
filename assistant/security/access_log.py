"""Append-only access audit log in SQLite: who looked at what, when. It never stores chart content."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ACTIONS = (
    "view-chart",
    "summary",
    "handoff-view",
    "handoff-export",
    "audit-run",
    "audit-view",
    "access-denied",
    "access-log-view",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS access_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER IF NOT EXISTS access_log_no_update BEFORE UPDATE ON access_log
BEGIN SELECT RAISE(ABORT, 'access_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS access_log_no_delete BEFORE DELETE ON access_log
BEGIN SELECT RAISE(ABORT, 'access_log is append-only'); END;
"""


class AccessLogError(RuntimeError):
    """The access log could not be written; the action it guards must not go ahead silently."""


@dataclass(frozen=True, slots=True)
class AccessEvent:
    seq: int
    at: str
    user: str
    role: str
    action: str
    target: str  # Patient/<id>, Location/<id> or an audit run id: references only, never content
    detail: str


class AccessLog:
    def __init__(self, path: Path | str, *, clock=lambda: datetime.now(UTC)) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def record(self, *, user: str, role: str, action: str, target: str, detail: str = "") -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown access action {action!r}; one of {', '.join(ACTIONS)}")
        try:
            with self._lock, self._connect() as db:
                db.execute(
                    "INSERT INTO access_log (at, user, role, action, target, detail) VALUES (?,?,?,?,?,?)",
                    (self._clock().isoformat(), user, role, action, target, detail[:200]),
                )
        except sqlite3.Error as exc:
            raise AccessLogError(f"cannot write the access log at {self.path}: {exc}") from exc

    def events(
        self,
        *,
        limit: int = 500,
        user: str | None = None,
        target: str | None = None,
        actions: tuple[str, ...] | list[str] = (),
        since: str | None = None,
    ) -> list[AccessEvent]:
        query = "SELECT seq, at, user, role, action, target, detail FROM access_log"
        where, args = [], []
        if actions:
            where.append(f"action IN ({','.join('?' * len(actions))})")
            args.extend(actions)
        if since:
            where.append("at >= ?")
            args.append(since)
        if user:
            where.append("user = ?")
            args.append(user)
        if target:
            where.append("target = ?")
            args.append(target)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        with self._connect() as db:
            return [AccessEvent(*row) for row in db.execute(query, args)]
