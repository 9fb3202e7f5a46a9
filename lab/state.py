"""Durable state of a running lab, in one SQLite file: `<state dir>/state.db`.

Keeps what a restart must not lose: custom hostnames, DNS records and overrides set
through the admin, zones added at run time, settings (the model, the validation mode) and
the event log. stdlib sqlite3 in WAL
mode: readers never block the writer, and a commit is an append to the WAL (fsync only
at checkpoints with synchronous=NORMAL), cheap enough for batched event writes.

Every write is one transaction, so a failure leaves nothing half-written. Every SQLite
error leaves this module as `StateError` with one line naming the file (or, for a
duplicate live hostname, `HostnameError`), so no user ever sees a traceback.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from lab.events import Event, Events
from lab.topology import Hostnames, Limits
from lab.hostnames import Hostname, HostnameError
from lab.hostnorm import HostError, normalize

log = logging.getLogger(__name__)

DB_NAME = "state.db"
LOCK_NAME = "state.lock"
SCHEMA_VERSION = 4
# PRAGMA application_id marks the file as ours ("SNIL"), so a foreign SQLite file is refused.
APPLICATION_ID = 0x534E494C

SCHEMA = """
CREATE TABLE hostnames (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, zone TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'active', 'moved', 'deleted')),
    txt_token TEXT NOT NULL, http_token TEXT NOT NULL, reason TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, ownership TEXT);
-- At most one live registration per name, even if two API calls race past create().
CREATE UNIQUE INDEX hostnames_live_name ON hostnames (name) WHERE status != 'deleted';
CREATE TABLE records (
    name TEXT NOT NULL, type TEXT NOT NULL, value TEXT NOT NULL, ttl INTEGER NOT NULL,
    PRIMARY KEY (name, type, value));
-- id has no declared type: it round-trips as given (str or int).
CREATE TABLE overrides (
    id PRIMARY KEY NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL, value TEXT NOT NULL,
    client TEXT, expires REAL, ttl INTEGER NOT NULL);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, trace TEXT, data TEXT NOT NULL);
"""
# Schema 2: the verifier's bookkeeping (failed lookups with backoff, negative answers in a row).
MIGRATE_2 = """
ALTER TABLE hostnames ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hostnames ADD COLUMN last_error TEXT;
ALTER TABLE hostnames ADD COLUMN next_check REAL;
ALTER TABLE hostnames ADD COLUMN negatives INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hostnames ADD COLUMN negative_since REAL
"""
_HOSTNAME_COLUMNS_2 = ("id, name, zone, status, txt_token, http_token, reason, created, updated, ownership, "
                      "failures, last_error, next_check, negatives, negative_since")
# Schema 3: status `blocked` (SQLite changes a CHECK only by copying the table), the lab's
# record of a forged proof, and zones added at run time.
MIGRATE_3 = f"""
CREATE TABLE hostnames_3 (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, zone TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'active', 'moved', 'deleted', 'blocked')),
    txt_token TEXT NOT NULL, http_token TEXT NOT NULL, reason TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, ownership TEXT,
    failures INTEGER NOT NULL DEFAULT 0, last_error TEXT, next_check REAL,
    negatives INTEGER NOT NULL DEFAULT 0, negative_since REAL, poisoned_by TEXT);
INSERT INTO hostnames_3 ({_HOSTNAME_COLUMNS_2}) SELECT {_HOSTNAME_COLUMNS_2} FROM hostnames;
DROP TABLE hostnames;
ALTER TABLE hostnames_3 RENAME TO hostnames;
CREATE UNIQUE INDEX hostnames_live_name ON hostnames (name) WHERE status != 'deleted';
CREATE TABLE zones (name TEXT PRIMARY KEY, data TEXT NOT NULL)
"""
# Schema 4: many hostnames. Every read and write of one hostname is by an index (its id, its
# name, its status, when it is due), never a scan; `checks` is the verifier's schedule step.
MIGRATE_4 = """
ALTER TABLE hostnames ADD COLUMN checks INTEGER NOT NULL DEFAULT 0;
CREATE INDEX hostnames_name ON hostnames (name);
CREATE INDEX hostnames_status ON hostnames (status);
CREATE INDEX hostnames_zone ON hostnames (zone);
CREATE INDEX hostnames_due ON hostnames (coalesce(next_check, 0)) WHERE status IN ('pending', 'active', 'moved')
"""
TABLES = ("hostnames", "records", "overrides", "settings", "events", "zones")
HOSTNAME_FIELDS = ("id", "name", "zone", "status", "txt_token", "http_token", "reason", "created", "updated",
                   "ownership", "failures", "last_error", "next_check", "negatives", "negative_since", "poisoned_by",
                   "checks")
# The hostnames the verifier checks, and when (no next_check: at once), as hostnames_due has them.
VERIFIED, DUE = "status IN ('pending', 'active', 'moved')", "coalesce(next_check, 0)"
OVERRIDE_FIELDS = ("id", "name", "type", "value", "client", "expires", "ttl")
OVERRIDE_TTL = 60
# checkpoint_apart(): commits checkpoint only past this many WAL pages (64 MB), the checkpointer's backstop.
CHECKPOINT_BACKSTOP_PAGES = 16384
ENCODE_SLICE = 200  # events encoded per loop step by the event sink
PRUNE_EVERY = 20  # event-sink flushes between prunings (sooner when a budget's eighth was written)


class StateError(RuntimeError):
    """The state database cannot be used: `str()` is the one line shown to the user."""


class State:
    """One connection, guarded by a lock: the event sink writes from a worker thread."""

    def __init__(self, directory: str | Path = ".lab", *, exclusive: bool = False, timeout: float = 5.0) -> None:
        """`exclusive`: hold an advisory lock on the directory while open (for `sni-lab up`
        and `reset`, so two labs never share state). `timeout`: how long to wait for another
        process' write lock before StateError."""
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self._lock = threading.RLock()
        self._lockfile: int | None = None
        # Called at the start of every write transaction; raising there is a failed write (the
        # seam for tests of a full or read-only disk where no such disk can be made).
        self.before_write: Any = None
        self._written_with_hostname: set[int] = set()  # event ids save_hostname stored, until the sink offers them
        # Stored event data in bytes, kept as this (the only writing) connection adds and prunes, so a
        # pruning reads only the rows it removes; None: unknown, summed once at the next pruning.
        self._event_bytes: int | None = None
        self._event_bytes_tx = 0  # what the open transaction adds (or, None, makes unknown), counted at COMMIT
        self._db: sqlite3.Connection | None = None
        self._checkpoint_lock = threading.Lock()
        self._checkpointer: sqlite3.Connection | None = None  # checkpoint()'s own connection
        try:
            # 0700: tokens and the event log are nobody else's business (umask can only narrow it).
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if exclusive:
                self._lockfile = _lock(self.directory / LOCK_NAME, self.directory)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            if os.stat(self.path).st_mode & 0o077:
                os.chmod(self.path, 0o600)  # WAL and shm files copy the db file's mode
        except OSError as e:
            self.close()
            raise StateError(f"{self.path}: cannot open: {e.strerror}") from None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per call.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=timeout)
            self._db.row_factory = sqlite3.Row
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with self._errors():
                        self._open()
                    break
                except StateError as e:
                    # Switching a new file to WAL needs a moment alone with it; the busy handler
                    # does not cover that, so several processes creating one database retry.
                    if "is locked" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        db = self._db
        # One statement, one snapshot: three separate reads could straddle another process's
        # creation of the schema and see its tables but not yet its application_id.
        app_id, version, tables = db.execute(
            "SELECT (SELECT application_id FROM pragma_application_id), (SELECT user_version FROM pragma_user_version),"
            " (SELECT count(*) FROM sqlite_master)").fetchone()
        has_tables = tables > 0
        if app_id != APPLICATION_ID and (app_id or version or has_tables):
            raise StateError(f"{self.path}: not an sni-lab state database")
        if version > SCHEMA_VERSION:
            raise StateError(f"{self.path}: written by a newer sni-lab (schema {version}, this one knows "
                             f"{SCHEMA_VERSION})")
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise StateError(f"{self.path}: cannot switch to WAL mode (network file system?)")
        db.execute("PRAGMA synchronous=NORMAL")
        # After a checkpoint the WAL is cut back to this, so a burst of events does not leave it large.
        db.execute("PRAGMA journal_size_limit=4194304")
        if version < SCHEMA_VERSION:
            with self._tx() as c:
                # Re-read under the write lock: another process may have migrated it meanwhile.
                # Statement by statement: executescript() would COMMIT on its own, mid-transaction.
                version = c.execute("PRAGMA user_version").fetchone()[0]
                steps = [(1, SCHEMA), (2, MIGRATE_2), (3, MIGRATE_3), (4, MIGRATE_4)]
                for _, script in (step for step in steps if step[0] > version):
                    for stmt in filter(str.strip, script.split(";")):
                        c.execute(stmt)
                if version == 0:
                    c.execute(f"PRAGMA application_id={APPLICATION_ID}")
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def checkpoint_apart(self) -> None:
        """From now on the WAL is copied into the database by `checkpoint()`, which a caller runs off
        its event loop, not by whichever commit passes SQLite's threshold: that commit would
        copy and fsync some 4 MB while the loop waits (5-25 ms, the slowest of a burst of adds).
        A backstop threshold stays, so a checkpointer that stops leaves no unbounded WAL."""
        with self._lock, self._errors():
            self._conn().execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_BACKSTOP_PAGES}")

    def checkpoint(self) -> int:
        """A PASSIVE checkpoint on a connection of its own: writers go on meanwhile (WAL mode), and
        this connection's lock is not the one a write waits for. Returns the pages the WAL held
        (copied, unless a reader held some back)."""
        with self._checkpoint_lock, self._errors():
            if self._db is None:
                return 0  # closed meanwhile
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                                     timeout=0)
            return max(0, self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])

    def close(self) -> None:
        with self._checkpoint_lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._lockfile is not None:
                os.close(self._lockfile)  # releases the flock
                self._lockfile = None

    def __enter__(self) -> "State":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate SQLite's exceptions into one line naming the file."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            msg = str(e)
            if "not a database" in msg:
                raise StateError(f"{self.path}: not an sni-lab state database (not SQLite)") from None
            if "locked" in msg or "busy" in msg:
                raise StateError(f"{self.path}: is locked by another process") from None
            if "malformed" in msg or "corrupt" in msg:
                raise StateError(f"{self.path}: corrupted ({msg}); move it away to start afresh") from None
            raise StateError(f"{self.path}: {msg}") from None

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it or nothing. BEGIN IMMEDIATE takes the write
        lock up front, so a busy database fails here rather than halfway."""
        with self._lock, self._errors():
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            self._event_bytes_tx = 0
            try:
                if self.before_write is not None:
                    self.before_write()
                yield db
                db.execute("COMMIT")
                if self._event_bytes is not None:
                    delta = self._event_bytes_tx
                    self._event_bytes = None if delta is None else self._event_bytes + delta
            except BaseException:
                if db.in_transaction:  # SQLite may already have rolled back (disk full, ...)
                    db.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def free_to_write(self) -> Iterator[bool]:
        """True, holding the lock meanwhile, when no other thread is using the connection (the event
        sink's batch); else False at once: a caller on the event loop comes back later rather than
        wait. The writes made meanwhile are this thread's own, not another's."""
        got = self._lock.acquire(blocking=False)
        try:
            yield got
        finally:
            if got:
                self._lock.release()

    @contextlib.contextmanager
    def counting(self) -> Iterator[dict[str, Any]]:
        """What this thread asks of SQLite meanwhile: `statements` (their text) and `steps` (virtual
        machine instructions: a scan takes some per row, an index seek a constant few), so a
        test can show that a change reads and writes the same few rows whatever the table holds."""
        mine = threading.get_ident()
        seen: dict[str, Any] = {"statements": [], "steps": 0}

        def statement(sql: str) -> None:
            if threading.get_ident() == mine:
                seen["statements"].append(sql)

        def step() -> int:
            if threading.get_ident() == mine:
                seen["steps"] += 1
            return 0

        with self._lock:
            db = self._conn()
            db.set_trace_callback(statement)
            db.set_progress_handler(step, 1)
        try:
            yield seen
        finally:
            with self._lock:
                db.set_trace_callback(None)
                db.set_progress_handler(None, 1)

    def _read(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock, self._errors():
            return self._conn().execute(sql, tuple(args)).fetchall()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateError(f"{self.path}: state is closed")
        return self._db

    # -- custom hostnames ----------------------------------------------------------

    def hostnames(self, include_deleted: bool = True) -> list[Hostname]:
        """Every hostname (a whole-table read: for small labs and tests; the API pages)."""
        where = "" if include_deleted else "WHERE status != 'deleted'"
        return [_hostname(r) for r in self._read(f"SELECT * FROM hostnames {where} ORDER BY created, rowid")]

    def has_hostnames(self) -> bool:
        return bool(self._read("SELECT 1 FROM hostnames LIMIT 1"))

    def edge_hostnames(self) -> Hostnames:
        """The live hostnames as the edge's index holds them (what a start loads, once)."""
        with self._lock, self._errors():
            cursor = self._conn().cursor()
            cursor.row_factory = None  # plain tuples: a start reads every live hostname
            return Hostnames.of_rows(cursor.execute("SELECT name, zone, status, poisoned_by FROM hostnames "
                                                    "WHERE status != 'deleted' ORDER BY rowid"))

    def hostname_page(self, after: int = 0, limit: int = 100, statuses: Iterable[str] = (), zone: str | None = None,
                      prefix: str | None = None) -> tuple[list[Hostname], int | None]:
        """Up to `limit` hostnames after position `after`, in the order they were made, and the
        position to go on from (None: the last page). Filters: any of `statuses`, a zone, a name prefix."""
        where, args = ["rowid > ?"], [after]
        statuses = list(dict.fromkeys(statuses))
        if len(statuses) == 1:
            where.append("status = ?")  # by the status index: a rare status is a short read
        elif statuses:  # most of the table: in order, by rowid (the index would sort them all first)
            where.append(f"+status IN ({', '.join('?' * len(statuses))})")
        args += statuses
        if zone is not None:
            where.append("zone = ?")
            args.append(zone)
        if prefix:  # a range of the name index: as cheap as the names that match
            where += ["name >= ?", "name < ?"]
            args += [prefix, prefix + "\U0010ffff"]
        by = " INDEXED BY hostnames_name" if prefix else ""  # else a bound prefix may scan the table
        rows = self._read(f"SELECT rowid AS position, * FROM hostnames{by} WHERE {' AND '.join(where)} "
                          f"ORDER BY rowid LIMIT ?", (*args, limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        return [_hostname(r) for r in rows], rows[-1]["position"] if more else None

    def due_hostnames(self, now: float, limit: int) -> list[Hostname]:
        """The hostnames the verifier should ask about at `now`, the longest due first (by the due
        index). A hostname with no next_check is due at once."""
        return [_hostname(r) for r in self._read(
            f"SELECT * FROM hostnames INDEXED BY hostnames_due WHERE {VERIFIED} AND {DUE} <= ? ORDER BY {DUE} LIMIT ?",
            (now, limit))]

    def hostname(self, id_or_name: str) -> Hostname | None:
        """By id; else by name: the live registration, or the latest deleted one (history)."""
        rows = self._read("SELECT * FROM hostnames WHERE id = ?", (id_or_name,))
        if not rows:
            try:
                name = normalize(id_or_name)
            except (HostError, TypeError):
                return None
            rows = self._read("SELECT * FROM hostnames WHERE name = ? "
                              "ORDER BY status = 'deleted', updated DESC LIMIT 1", (name,))
        return _hostname(rows[0]) if rows else None

    def add_hostnames(self, hostnames: Iterable[Hostname], events: Iterable[Event] = ()) -> None:
        """Insert new registrations, with their events, all in one transaction or none. An id or a
        live name already there is refused (HostnameError), never overwritten."""
        cols = ", ".join(HOSTNAME_FIELDS)
        with self._tx() as db:
            try:
                db.executemany(f"INSERT INTO hostnames ({cols}) VALUES ({', '.join('?' * len(HOSTNAME_FIELDS))})",
                               [tuple(getattr(h, f) for f in HOSTNAME_FIELDS) for h in hostnames])
            except sqlite3.IntegrityError as e:
                if "hostnames.name" in str(e):
                    raise HostnameError("a name is already registered as a custom hostname") from None
                raise HostnameError("a hostname id is already used") from None
            self._hostname_events(db, list(events))

    def save_hostname(self, h: Hostname, event: Event | None = None) -> None:
        """Upsert `h`; with `event` (its hostname.status), both in one transaction, so a
        kill -9 never leaves a status without its history or a history without its status."""
        cols = ", ".join(HOSTNAME_FIELDS)
        updates = ", ".join(f"{f} = excluded.{f}" for f in HOSTNAME_FIELDS[1:])
        with self._tx() as db:
            self._hostname_events(db, [event] if event else [])
            try:
                db.execute(f"INSERT INTO hostnames ({cols}) VALUES ({', '.join('?' * len(HOSTNAME_FIELDS))}) "
                           f"ON CONFLICT (id) DO UPDATE SET {updates}",
                           tuple(getattr(h, f) for f in HOSTNAME_FIELDS))
            except sqlite3.IntegrityError as e:
                if "hostnames.name" not in str(e):
                    raise
                # The unique index caught a race that create()'s duplicate check could not see.
                raise HostnameError(f"{h.name} is already registered as a custom hostname") from None

    def purge_hostname(self, id: str, event: Event | None = None) -> int:
        """Remove the row entirely: a scenario's setup undone is gone, not listed as deleted (a
        user's delete keeps the row: save_hostname). `event` is stored in the same transaction."""
        with self._tx() as db:
            self._hostname_events(db, [event] if event else [])
            return db.execute("DELETE FROM hostnames WHERE id = ?", (id,)).rowcount

    def _hostname_events(self, db: sqlite3.Connection, events: list[Event]) -> None:
        if events:
            rows = event_rows(events)
            self._count_event_bytes(len(rows), db.executemany(INSERT_EVENT, rows).rowcount, rows)
            self._written_with_hostname.update(e["id"] for e in events)

    # -- DNS admin -----------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._read("SELECT name, type, value, ttl FROM records ORDER BY rowid")]

    def set_record(self, name: str, rtype: str, value: str | Iterable[str], ttl: int) -> None:
        """Replace the whole RRset (name, type): setting a CNAME moves it, it does not add a second.
        Pass a list of values for an RRset of several (two A addresses, several TXT strings)."""
        values = [value] if isinstance(value, str) else list(dict.fromkeys(value))
        with self._tx() as db:
            db.execute("DELETE FROM records WHERE name = ? AND type = ?", (name, rtype.upper()))
            db.executemany("INSERT INTO records (name, type, value, ttl) VALUES (?, ?, ?, ?)",
                           [(name, rtype.upper(), v, ttl) for v in values])

    def delete_record(self, name: str, rtype: str | None = None) -> int:
        with self._tx() as db:
            if rtype is None:
                return db.execute("DELETE FROM records WHERE name = ?", (name,)).rowcount
            return db.execute("DELETE FROM records WHERE name = ? AND type = ?", (name, rtype.upper())).rowcount

    def overrides(self) -> list[dict[str, Any]]:
        """All overrides, expired ones included until purge_expired() runs."""
        cols = ", ".join(OVERRIDE_FIELDS)
        return [dict(r) for r in self._read(f"SELECT {cols} FROM overrides ORDER BY rowid")]

    def save_override(self, d: dict[str, Any]) -> None:
        """Upsert by d["id"]. Keys: id, name, type, value, [client], [expires: epoch], [ttl]."""
        unknown = set(d) - set(OVERRIDE_FIELDS)
        missing = {"id", "name", "type", "value"} - set(d)
        if unknown or missing:
            raise ValueError(f"override: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        row = {"client": None, "expires": None, "ttl": OVERRIDE_TTL, **d}
        row["type"] = str(row["type"]).upper()
        cols = ", ".join(OVERRIDE_FIELDS)
        updates = ", ".join(f"{f} = excluded.{f}" for f in OVERRIDE_FIELDS[1:])
        with self._tx() as db:
            db.execute(f"INSERT INTO overrides ({cols}) VALUES ({', '.join('?' * len(OVERRIDE_FIELDS))}) "
                       f"ON CONFLICT (id) DO UPDATE SET {updates}", tuple(row[f] for f in OVERRIDE_FIELDS))

    def delete_override(self, id: Any) -> int:
        return self.delete_overrides([id])

    def delete_overrides(self, ids: Iterable[Any]) -> int:
        with self._tx() as db:
            return db.executemany("DELETE FROM overrides WHERE id = ?", [(i,) for i in ids]).rowcount

    def purge_expired(self, now: float) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM overrides WHERE expires IS NOT NULL AND expires <= ?", (now,)).rowcount

    # -- zones added at run time ---------------------------------------------------

    def zones(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self._read("SELECT data FROM zones ORDER BY rowid")]

    def save_zone(self, d: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO zones (name, data) VALUES (?, ?)", (d["name"], json.dumps(d)))

    def delete_zone(self, name: str) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM zones WHERE name = ?", (name,)).rowcount

    # -- settings ------------------------------------------------------------------

    def get(self, key: str, default: str | None = None) -> str | None:
        rows = self._read("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set(self, key: str, value: str | None) -> None:
        """`None` removes the key. Values are strings: callers own their encoding."""
        if value is not None and not isinstance(value, str):
            raise TypeError(f"setting {key!r}: expected str, got {type(value).__name__}")
        with self._tx() as db:
            if value is None:
                db.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                db.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                           "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    # -- events --------------------------------------------------------------------

    def add_events(self, events: list[Event]) -> int:
        """Append a batch in one transaction; returns how many were stored.

        An id already stored is skipped, so re-delivering a batch is harmless; a shortfall
        means the in-memory counter restarted below last_event_id() (see Events start)."""
        return self.add_rows(event_rows(events))

    def add_rows(self, rows: list[tuple]) -> int:
        """`add_events` for rows already made by `event_rows`."""
        with self._tx() as db:
            # executemany's rowcount sums the rows each statement inserted.
            stored = db.executemany(INSERT_EVENT, rows).rowcount
            ours = self._written_with_hostname & {r[0] for r in rows} if self._written_with_hostname else ()
            if ours:  # stored (and counted) with their hostname: skipped here
                self._written_with_hostname -= ours
                rows = [r for r in rows if r[0] not in ours]
            self._count_event_bytes(len(rows), stored, rows)
            return stored + len(ours)

    def _count_event_bytes(self, offered: int, stored: int, rows: list[tuple]) -> None:
        if self._event_bytes_tx is not None:
            # Some other id was already stored: which rows were is unknown, so is the sum.
            self._event_bytes_tx = None if stored != offered else self._event_bytes_tx + sum(len(r[4]) for r in rows)

    def events(self, since: int = 0, limit: int = 1000) -> list[Event]:
        rows = self._read("SELECT id, ts, kind, trace, data FROM events WHERE id > ? ORDER BY id LIMIT ?",
                          (since, limit))
        return [_event(r) for r in rows]

    def newest_events(self, n: int, since: int = 0, before: int | None = None, kind: str | None = None,
                      trace: str | None = None, internal: bool = False) -> list[Event]:
        """The newest `n` events with since < id < before, oldest first; `kind`: a prefix;
        `internal`: also the lab's own traffic. Filtered here, so a rare kind costs one query."""
        where, args = ["id > ?"], [since]
        if before is not None:
            where.append("id < ?")
            args.append(before)
        if kind is not None:
            where.append("substr(kind, 1, ?) = ?")
            args += [len(kind), kind]
        if trace is not None:
            where.append("trace = ?")
            args.append(trace)
        if not internal:
            where.append("json_extract(data, '$.internal') IS NOT 1")
        rows = self._read(f"SELECT id, ts, kind, trace, data FROM events WHERE {' AND '.join(where)} "
                          f"ORDER BY id DESC LIMIT ?", (*args, n))
        return [_event(r) for r in reversed(rows)]

    def prune_events(self, keep: int, keep_bytes: int | None = None) -> int:
        """Forget all but the newest `keep` events, and the oldest beyond `keep_bytes` of
        stored data: a load test (or a flood of long paths) must not fill the disk. Reads only
        the rows it removes (the stored total is counted as events are written)."""
        with self._tx() as db:
            total = self._event_bytes
            if total is None:
                total = db.execute("SELECT coalesce(sum(length(data)), 0) FROM events").fetchone()[0]
            cut = db.execute("SELECT coalesce(max(id), 0) - ? FROM events", (keep,)).fetchone()[0]
            freed = db.execute("SELECT coalesce(sum(length(data)), 0) FROM events WHERE id <= ?", (cut,)).fetchone()[0]
            if keep_bytes is not None and total - freed > keep_bytes:
                # Oldest first, the event whose removal brings the rest within the budget (SQLite stops there).
                row = db.execute("SELECT id, total FROM (SELECT id, sum(length(data)) OVER (ORDER BY id) AS total "
                                 "FROM events WHERE id > ?) WHERE total >= ? LIMIT 1",
                                 (cut, total - freed - keep_bytes)).fetchone()
                if row is not None:
                    cut, freed = row[0], freed + row[1]
            gone = db.execute("DELETE FROM events WHERE id <= ?", (cut,)).rowcount
            self._event_bytes, self._event_bytes_tx = total, -freed  # the total before, what COMMIT takes off
            return gone

    def event_bytes(self) -> int:
        """Stored event data in bytes (what `prune_events(keep_bytes=...)` bounds)."""
        return self._read("SELECT coalesce(sum(length(data)), 0) FROM events")[0][0]

    def last_event_id(self) -> int:
        return self._read("SELECT coalesce(max(id), 0) FROM events")[0][0]

    # -- everything ----------------------------------------------------------------

    def reset(self) -> None:
        """Delete everything (`sni-lab reset`); the schema stays."""
        with self._tx() as db:
            for table in TABLES:
                db.execute(f"DELETE FROM {table}")
            self._event_bytes = None  # summed again (nothing) at the next pruning


def _event(row: sqlite3.Row) -> Event:
    return {"id": row["id"], "ts": row["ts"], "kind": row["kind"], "trace": row["trace"], **json.loads(row["data"])}


def _hostname(row: sqlite3.Row) -> Hostname:
    return Hostname(**{f: row[f] for f in HOSTNAME_FIELDS})


def _lock(path: Path, directory: Path) -> int:
    """An advisory lock held while the State is open, so two labs never share one state dir."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; SQLite's own locking still protects the data
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(f"{directory}: is locked by another process (is `sni-lab up` running?)") from None
    return fd


_DUMPS = json.JSONEncoder(default=str, separators=(",", ":"), check_circular=False).encode
# ON CONFLICT (id), not OR IGNORE: that would also silently skip a NOT NULL violation. An id
# already stored is one the control plane wrote with its hostname (save_hostname).
INSERT_EVENT = "INSERT INTO events (id, ts, kind, trace, data) VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"


def event_rows(events: list[Event]) -> list[tuple]:
    """Events as rows of the events table: the whole event as data (its columns repeated), no copies."""
    return [(e["id"], e["ts"], e["kind"], e.get("trace"), _DUMPS(e)) for e in events]


class EventSink:
    """Copies every event of `events` into `state`, in batches, off the request path.

    `emit()` only appends to a bounded deque here; a task writes the batch every
    `interval` seconds in a worker thread. If the database cannot keep up (locked, slow
    disk) the oldest events are dropped and counted in `dropped`, never the process' memory.
    """

    def __init__(self, events: Events, state: State, interval: float = 0.5, max_buffer: int = 10000,
                 keep_rows: int = Limits.event_log_rows, keep_bytes: int = Limits.event_log_bytes) -> None:
        self.events = events
        self.state = state
        self.interval = interval
        self.max_buffer = max_buffer
        self.keep_rows = keep_rows
        self.keep_bytes = keep_bytes
        self._unpruned = 0      # bytes written since the last pruning
        self.dropped = 0        # events lost because the buffer was full
        self.skipped = 0        # events whose id was already stored
        self.flushes = 0        # batches written
        self.last_error: str | None = None
        self._buf: collections.deque[Event] = collections.deque()
        self._unsubscribe: Any = None
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    def _push(self, event: Event) -> None:
        if len(self._buf) >= self.max_buffer:
            self._buf.popleft()
            self.dropped += 1
        self._buf.append(event)

    async def start(self) -> None:
        # Events emitted before the sink started (startup) are still in the ring buffer.
        last = await asyncio.to_thread(self.state.last_event_id)
        for event in self.events.since(last):
            self._push(event)
        self._unsubscribe = self.events.subscribe(self._push)
        self._task = asyncio.create_task(self._run(), name="lab.state.EventSink")

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
            await self.flush()

    async def flush(self) -> None:
        if not self._buf:
            return
        batch = list(self._buf)
        self._buf.clear()
        # Encode here, write there: a worker thread running a Python loop keeps the GIL for a
        # whole switch interval (5 ms) whenever the event loop wants it back; SQLite's own
        # steps release it. Here, a slice at a time: half a second of a busy lab is thousands
        # of events, tens of ms of JSON in one go (measured: 4,200 in 35 ms, every request
        # waiting behind it); a slice is ~2 ms, and requests come in between.
        rows = event_rows(batch[:ENCODE_SLICE])
        for start in range(ENCODE_SLICE, len(batch), ENCODE_SLICE):
            await asyncio.sleep(0)
            rows += event_rows(batch[start:start + ENCODE_SLICE])
        try:
            stored = await asyncio.to_thread(self.state.add_rows, rows)
        except (StateError, sqlite3.Error) as e:
            # Keep the batch for the next round, ahead of newer events, within the bound.
            self.last_error = str(e)
            log.warning("event log: %s (%d events kept for retry)", e, len(batch))
            newer = list(self._buf)
            self._buf.clear()
            for event in batch + newer:
                self._push(event)
            return
        self.flushes += 1
        self._unpruned += sum(len(r[4]) for r in rows)
        if self.flushes % PRUNE_EVERY == 0 or self._unpruned > self.keep_bytes // 8:
            self._unpruned = 0
            try:
                await asyncio.to_thread(self.state.prune_events, self.keep_rows, self.keep_bytes)
            except StateError as e:
                self.last_error = str(e)
                log.warning("event log: pruning: %s", e)
        if stored < len(batch):
            if not self.skipped:
                log.warning("event log: ids already stored were skipped; start Events after "
                            "State.last_event_id() so ids stay unique across restarts")
            self.skipped += len(batch) - stored

    async def close(self) -> None:
        """Stop, then write what is left. Never cancels a write halfway."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()
