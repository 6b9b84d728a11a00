"""One SQLite database per ckfs root, reached only through `DB.transaction`.

Why SQLite in WAL mode: readers (``ckfs images ls`` while a pull runs) never
wait for the writer, and a crash loses at most the transaction in flight, so
a state change is either fully recorded or not at all. Every change goes
through `transaction`, which begins ``IMMEDIATE`` (takes the write lock up
front, so two processes never both read-then-write and collide at commit)
and rolls back on any exception.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckfs.errors import FailedPrecondition, Unavailable
from ckfs.metadata.schema import MIGRATIONS

__all__ = ["DB", "now_ns"]

#: How long a writer waits for another process's transaction, in seconds.
#: Pulls hold transactions for milliseconds; a minute means something is stuck.
BUSY_TIMEOUT = 60.0


def now_ns() -> int:
    return time.time_ns()


class DB:
    """A connection to ``<root>/metadata.db`` usable from any thread.

    sqlite3 connections are not safe to share between threads on their own,
    so one re-entrant lock serializes use; trio code reaches the database
    from worker threads via `trio.to_thread`.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        # WAL: readers do not block the writer nor the writer readers.
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode; only a power
        # loss can drop the last commits, which re-running the command redoes.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self.transaction() as tx:
            version = tx.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise FailedPrecondition(
                    f"{self.path}: schema version {version} is newer than this ckfs "
                    f"understands ({len(MIGRATIONS)}); upgrade ckfs"
                )
            for n in range(version, len(MIGRATIONS)):
                tx.executescript_in_tx(MIGRATIONS[n])
                tx.execute(f"PRAGMA user_version={n + 1}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        """Run the body in one write transaction; roll back if it raises.

        Nested use joins the outer transaction, so helpers can require a
        transaction without caring whether their caller opened one.
        """
        with self._lock:
            if self._conn.in_transaction:
                yield Tx(self._conn)
                return
            with self._translated():
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield Tx(self._conn)
                except BaseException:
                    self._rollback()
                    raise
                else:
                    self._conn.execute("COMMIT")

    def _rollback(self) -> None:
        # SQLite may already have rolled back by itself (SQLITE_FULL does).
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Turn SQLite's operational errors into what the rest of ckfs speaks.

        A full disk must read like any other full disk (``OSError`` ENOSPC,
        naming the database); a lock held past `BUSY_TIMEOUT` is `Unavailable`.
        """
        try:
            yield
        except sqlite3.OperationalError as e:
            text = str(e)
            if "disk is full" in text or "disk I/O error" in text:
                code = errno.ENOSPC if "full" in text else errno.EIO
                raise OSError(code, os.strerror(code), str(self.path)) from e
            if "locked" in text or "busy" in text:
                raise Unavailable(f"{self.path}: database is busy: {text}") from e
            raise

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run a read-only statement and return all rows."""
        with self._lock, self._translated():
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class Tx:
    """The handle a transaction body gets: execute statements, nothing else."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    def executescript_in_tx(self, script: str) -> None:
        """Run several statements without the implicit COMMIT of executescript."""
        for stmt in script.split(";"):
            if stmt.strip():
                self._conn.execute(stmt)

    def get_row(
        self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()
    ) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
        return row
