"""The SQLite layer: WAL, forward-only migrations, all-or-nothing transactions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ckfs import errors
from ckfs.metadata.db import DB
from ckfs.metadata.schema import MIGRATIONS


def test_new_database_is_wal_and_current(tmp_path: Path) -> None:
    db = DB(tmp_path / "m.db")
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"
    assert db.query("PRAGMA user_version")[0][0] == len(MIGRATIONS)
    db.close()
    # Reopening migrates nothing and keeps data.
    db = DB(tmp_path / "m.db")
    assert db.query("PRAGMA user_version")[0][0] == len(MIGRATIONS)
    db.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db")
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(errors.FailedPrecondition, match="newer"):
        DB(tmp_path / "m.db")


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    db = DB(tmp_path / "m.db")
    with pytest.raises(RuntimeError), db.transaction() as tx:
        tx.execute("INSERT INTO content (digest, labels, updated_at) VALUES ('d', '{}', 1)")
        raise RuntimeError("boom")
    assert db.query("SELECT count(*) FROM content")[0][0] == 0
    with db.transaction() as tx, db.transaction() as inner:
        # Nested use joins the outer transaction.
        inner.execute("INSERT INTO content (digest, labels, updated_at) VALUES ('d', '{}', 1)")
        assert tx.get_row("SELECT digest FROM content")[0] == "d"  # type: ignore[index]
    assert db.query("SELECT count(*) FROM content")[0][0] == 1
    db.close()
