"""Append-only, hash-chained access audit log in SQLite: who looked at what, when. It never stores chart content."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

ACTIONS = (
    "view-chart",
    "summary",
    "handoff-view",
    "handoff-export",
    "audit-run",
    "audit-view",
    "access-denied",
    "access-log-view",
    "integrity-alert",  # written by the log itself when evidence of tampering would otherwise be lost
)
GENESIS = "0" * 64
_FIELDS = ("seq", "at", "user", "subject", "role", "action", "target", "detail")
_SELECT_ROWS = (
    "SELECT seq, at, user, subject, role, action, target, detail, prev, hash FROM access_log ORDER BY seq"
)
TRIGGERS = ("access_log_no_update", "access_log_no_delete", "access_log_no_replace")

_TABLE = """
CREATE TABLE IF NOT EXISTS access_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    prev TEXT NOT NULL DEFAULT '',
    hash TEXT NOT NULL DEFAULT ''
);
"""
# REPLACE deletes the old row without firing DELETE triggers (recursive_triggers is off), so an insert that
# names an existing or earlier seq is refused as well.
_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS access_log_no_update BEFORE UPDATE ON access_log
BEGIN SELECT RAISE(ABORT, 'access_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS access_log_no_delete BEFORE DELETE ON access_log
BEGIN SELECT RAISE(ABORT, 'access_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS access_log_no_replace BEFORE INSERT ON access_log
WHEN NEW.seq IS NOT NULL AND NEW.seq <= (SELECT COALESCE(MAX(seq), 0) FROM access_log)
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
    subject: str = ""  # "<iss> <sub>" of the signed-in identity ("" for the local demo)


@dataclass(frozen=True, slots=True)
class ChainStatus:
    """The result of checking the log: ok only when every row links to the one before and nothing is missing."""

    ok: bool
    rows: int
    problems: tuple[str, ...] = ()
    first_bad_seq: int | None = None

    @property
    def text(self) -> str:
        if self.ok:
            return f"hash chain intact ({self.rows} rows)"
        return "ACCESS LOG INTEGRITY BROKEN: " + "; ".join(self.problems)


def row_hash(prev: str, row: dict[str, object], key: bytes | None = None) -> str:
    """SHA-256 (HMAC-SHA-256 with a key) over the previous row's hash and this row's fields, canonical JSON."""
    payload = json.dumps([prev] + [row[f] for f in _FIELDS], ensure_ascii=False, separators=(",", ":"))
    if key:
        return hmac.new(key, payload.encode("utf-8"), hashlib.sha256).hexdigest()
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class AccessLog:
    """Every row carries `hash` = H(previous row's hash + its own fields); the head (last seq and hash) is also
    kept in `<log>.head` beside it, so a deleted, truncated or replaced log file is noticed on the next open."""

    def __init__(
        self, path: Path | str, *, clock=lambda: datetime.now(UTC), key: bytes | str | None = None
    ) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._key = key.encode("utf-8") if isinstance(key, str) else key
        self._lock = threading.Lock()
        existed = self.path.exists()
        head = self._read_head()
        triggers_before = self._triggers() if existed else set(TRIGGERS)
        with self._connect() as db:
            db.executescript(_TABLE)
            if self._migrate(db):  # a log from before the chain had no replace trigger to remove
                triggers_before |= {"access_log_no_replace"}
        # Checked before the triggers are (re)created: afterwards a dropped trigger would leave no trace.
        self.status = self.verify(triggers_seen=triggers_before)
        lost = []
        if existed and triggers_before != set(TRIGGERS):
            lost.append(
                f"append-only triggers were removed ({', '.join(sorted(set(TRIGGERS) - triggers_before))})"
            )
        if existed:
            lost += [p for p in self.status.problems if p.startswith("the head file")]
        elif head is not None:
            lost.append(
                f"the log file was missing (it had rows up to seq {head[0]}); a new, empty one was started"
            )
        with self._connect() as db:
            db.executescript(_TRIGGERS)
        if lost:
            for problem in lost:
                self._append("nva", "system", "integrity-alert", "access-log", problem, "")
            self.status = self.verify()
        last = self._last()
        if self.status.ok and last is not None and self._read_head() != last:
            self._write_head(*last)  # repair the crash window (the chain itself was verified)
        if not self.status.ok:
            log.error("access log %s: %s", self.path, self.status.text)

    # --- storage ---------------------------------------------------------------------------------------
    def _connect(self, *, create: bool = True) -> sqlite3.Connection:
        if create:
            return sqlite3.connect(self.path, timeout=10)
        return sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=10)

    def _triggers(self) -> set[str]:
        try:
            with self._connect(create=False) as db:
                rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()
        except sqlite3.Error:
            return set()
        return {r[0] for r in rows} & set(TRIGGERS)

    def _migrate(self, db: sqlite3.Connection) -> bool:
        """A log from before the chain gains the columns and is sealed once (its past cannot be proven)."""
        cols = {r[1] for r in db.execute("PRAGMA table_info(access_log)")}
        legacy = "hash" not in cols
        for col in ("subject", "prev", "hash"):
            if col not in cols:
                db.execute(f"ALTER TABLE access_log ADD COLUMN {col} TEXT NOT NULL DEFAULT ''")
        unsealed = db.execute("SELECT COUNT(*) FROM access_log").fetchone()[0] if legacy else 0
        if unsealed:  # only a table that never had the columns: blanked hashes are tampering, not legacy
            db.execute("DROP TRIGGER IF EXISTS access_log_no_update")
            prev = GENESIS
            for row in self._rows(db):
                digest = row_hash(prev, row, self._key)
                db.execute(
                    "UPDATE access_log SET prev = ?, hash = ? WHERE seq = ?", (prev, digest, row["seq"])
                )
                prev = digest
            log.warning("access log %s: %d rows from before the hash chain were sealed", self.path, unsealed)
            head = self._head_row(db)
            if head:
                self._write_head(*head)
        return legacy

    @staticmethod
    def _rows(db: sqlite3.Connection) -> list[dict[str, object]]:
        cur = db.execute(_SELECT_ROWS)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur]

    @staticmethod
    def _head_row(db: sqlite3.Connection) -> tuple[int, str] | None:
        row = db.execute("SELECT seq, hash FROM access_log ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def _last(self) -> tuple[int, str] | None:
        with self._connect(create=False) as db:
            return self._head_row(db)

    def _read_head(self) -> tuple[int, str] | None:
        try:
            data = json.loads(self.head_path.read_text(encoding="utf-8"))
            return int(data["seq"]), str(data["hash"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return (-1, "unreadable")

    def _write_head(self, seq: int, digest: str) -> None:
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        tmp.write_text(json.dumps({"seq": seq, "hash": digest}), encoding="utf-8")
        os.replace(tmp, self.head_path)

    def _append(self, user: str, role: str, action: str, target: str, detail: str, subject: str) -> None:
        with self._lock:
            db = self._connect(create=False)
            try:
                db.execute("BEGIN IMMEDIATE")  # one writer at a time across processes: the chain stays linear
                last = self._head_row(db)
                used = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'access_log'").fetchone()
                seq = max(last[0] if last else 0, int(used[0]) if used else 0) + 1
                row = {
                    "seq": seq,
                    "at": self._clock().isoformat(),
                    "user": user,
                    "subject": subject,
                    "role": role,
                    "action": action,
                    "target": target,
                    "detail": detail[:200],
                }
                prev = last[1] if last else GENESIS
                digest = row_hash(prev, row, self._key)
                db.execute(
                    "INSERT INTO access_log (seq, at, user, subject, role, action, target, detail, prev, hash) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (*(row[f] for f in _FIELDS), prev, digest),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            finally:
                db.close()
            self._write_head(seq, digest)

    # --- public -----------------------------------------------------------------------------------------
    def record(
        self, *, user: str, role: str, action: str, target: str, detail: str = "", subject: str = ""
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown access action {action!r}; one of {', '.join(ACTIONS)}")
        try:
            self._append(user, role, action, target, detail, subject)
        except (sqlite3.Error, OSError) as exc:
            raise AccessLogError(f"cannot write the access log at {self.path}: {exc}") from exc

    def verify(self, *, triggers_seen: set[str] | None = None) -> ChainStatus:
        """Check every link, the head file and the triggers; never raises (an unreadable log is a problem too).

        `triggers_seen`: the triggers as found before opening recreated them (used on open); default: read now.
        """
        if not self.path.exists():
            return ChainStatus(False, 0, (f"the log file {self.path} is missing",))
        problems: list[str] = []
        first_bad: int | None = None
        try:
            with self._connect(create=False) as db:
                rows = self._rows(db)
        except sqlite3.Error as exc:
            return ChainStatus(False, 0, (f"the log cannot be read ({exc})",))
        prev = GENESIS
        for row in rows:
            seq = int(row["seq"])  # type: ignore[call-overload]
            if row["prev"] != prev:
                problems.append(
                    f"row {seq} does not follow the row before it (a row was removed or inserted)"
                )
            elif row_hash(prev, row, self._key) != row["hash"]:
                problems.append(f"row {seq} was changed after it was written")
            else:
                prev = str(row["hash"])
                if row["action"] == "integrity-alert":
                    problems.append(f"alert at {row['at']}: {row['detail']}")
                    first_bad = seq if first_bad is None else first_bad
                continue
            first_bad = seq if first_bad is None else first_bad
            prev = str(row["hash"])
        head = self._read_head()
        last = (int(rows[-1]["seq"]), str(rows[-1]["hash"])) if rows else None  # type: ignore[call-overload]
        if head is None and last is not None:
            problems.append(f"the head file {self.head_path.name} is missing")
        elif head is not None and head != last:
            if last is None or head[0] > last[0]:
                problems.append(
                    f"the head file says rows up to seq {head[0]}; rows after {last[0] if last else 0} are gone"
                )
            elif head[0] == last[0]:
                problems.append(f"the head file does not match row {head[0]} (the last row was replaced)")
            elif not (last[0] - head[0] == 1 and self._hash_of(rows, head[0]) == head[1]):
                # one row ahead of the head is the crash window between COMMIT and the head write; more is not
                problems.append(
                    f"the head file {self.head_path.name} is behind the log (seq {head[0]} of {last[0]})"
                )
        triggers = self._triggers() if triggers_seen is None else triggers_seen
        if triggers != set(TRIGGERS):
            problems.append(
                f"append-only triggers are missing ({', '.join(sorted(set(TRIGGERS) - triggers))})"
            )
        return ChainStatus(not problems, len(rows), tuple(problems), first_bad)

    @staticmethod
    def _hash_of(rows: list[dict[str, object]], seq: int) -> str | None:
        return next((str(r["hash"]) for r in rows if r["seq"] == seq), None)

    def events(
        self,
        *,
        limit: int = 500,
        user: str | None = None,
        target: str | None = None,
        actions: tuple[str, ...] | list[str] = (),
        since: str | None = None,
    ) -> list[AccessEvent]:
        query = "SELECT seq, at, user, role, action, target, detail, subject FROM access_log"
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
        with self._connect(create=False) as db:
            return [AccessEvent(*row) for row in db.execute(query, args)]
