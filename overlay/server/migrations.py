"""Schema migrations of the server's database, SQLite and PostgreSQL, run at every start.

Each backend has an ordered list of steps; ``schema_version`` holds the number of the last step
applied and a start applies the ones after it, each step and its version bump in one transaction.
SQLite databases written before this table existed (version 0) hold some or all of what the first
steps create, so those SQLite steps are written to be idempotent (``IF NOT EXISTS``, a column added
only if missing): such a data directory opens unchanged. PostgreSQL starts at the current schema.
"""

from __future__ import annotations

import sqlite3
from typing import Callable

# ---------------------------------------------------------------------------- SQLite
SQLITE_BASE = """
CREATE TABLE IF NOT EXISTS nodes (
    key BLOB PRIMARY KEY, name TEXT NOT NULL, vip TEXT NOT NULL UNIQUE, created REAL NOT NULL,
    last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS networks (
    name TEXT PRIMARY KEY, pw_hash BLOB NOT NULL, owner BLOB NOT NULL, locked INTEGER NOT NULL DEFAULT 0,
    approval INTEGER NOT NULL DEFAULT 0, max_members INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE, key BLOB NOT NULL,
    joined REAL NOT NULL, PRIMARY KEY (network, key));
CREATE INDEX IF NOT EXISTS members_by_key ON members(key);
CREATE TABLE IF NOT EXISTS pending (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE, key BLOB NOT NULL,
    requested REAL NOT NULL, PRIMARY KEY (network, key));
CREATE TABLE IF NOT EXISTS former (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE, key BLOB NOT NULL,
    PRIMARY KEY (network, key));
CREATE TABLE IF NOT EXISTS bans (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE, key BLOB NOT NULL,
    PRIMARY KEY (network, key));
CREATE TABLE IF NOT EXISTS chat (
    id INTEGER PRIMARY KEY AUTOINCREMENT, network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE,
    sender BLOB NOT NULL, name TEXT NOT NULL, text TEXT NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS chat_by_network ON chat(network, id);
CREATE TABLE IF NOT EXISTS routes (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE, key BLOB NOT NULL, prefix TEXT NOT NULL,
    PRIMARY KEY (network, key, prefix));
CREATE TABLE IF NOT EXISTS hubs (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE, key BLOB NOT NULL,
    PRIMARY KEY (network, key))
"""


def _sqlite_column(column: str, decl: str) -> Callable[[sqlite3.Connection], None]:
    def step(db: sqlite3.Connection) -> None:
        if column not in {r[1] for r in db.execute("PRAGMA table_info(networks)")}:
            db.execute(f"ALTER TABLE networks ADD COLUMN {column} {decl}")
    return step


def _sqlite_base(db: sqlite3.Connection) -> None:
    for statement in SQLITE_BASE.split(";"):
        db.execute(statement)


SQLITE_STEPS: list[Callable[[sqlite3.Connection], None]] = [
    _sqlite_base,                                                  # 1: the first schema
    _sqlite_column("type", "TEXT NOT NULL DEFAULT 'mesh'"),        # 2: network types
    _sqlite_column("gateway", "BLOB"),                             # 3: the gateway member
    _sqlite_column("encrypted", "INTEGER NOT NULL DEFAULT 1"),     # 4: admin encryption-off
]


def migrate_sqlite(db: sqlite3.Connection) -> int:
    """Bring an SQLite database (autocommit connection) to the current schema; return its version."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = db.execute("SELECT version FROM schema_version").fetchone()
    version = row[0] if row else 0
    if row is None:
        db.execute("INSERT INTO schema_version VALUES (0)")
    for number, step in enumerate(SQLITE_STEPS, 1):
        if number <= version:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            step(db)
            db.execute("UPDATE schema_version SET version=?", (number,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        version = number
    return version


# ---------------------------------------------------------------------------- PostgreSQL
PG_STEPS: list[str] = [
    # 1: the schema of SQLite's version 4, with PostgreSQL's types; ``seq`` columns keep the order
    # SQLite gets from rowid (members and pending in join order on ties, former members newest first)
    """
CREATE TABLE nodes (
    key BYTEA PRIMARY KEY, name TEXT NOT NULL, vip TEXT NOT NULL UNIQUE, created DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL);
CREATE TABLE networks (
    name TEXT PRIMARY KEY, pw_hash BYTEA NOT NULL, owner BYTEA NOT NULL, locked BOOLEAN NOT NULL DEFAULT false,
    approval BOOLEAN NOT NULL DEFAULT false, max_members INTEGER NOT NULL DEFAULT 0,
    created DOUBLE PRECISION NOT NULL, type TEXT NOT NULL DEFAULT 'mesh', gateway BYTEA,
    encrypted BOOLEAN NOT NULL DEFAULT true);
CREATE TABLE members (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE, key BYTEA NOT NULL,
    joined DOUBLE PRECISION NOT NULL, seq BIGSERIAL, PRIMARY KEY (network, key));
CREATE INDEX members_by_key ON members(key);
CREATE TABLE pending (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE, key BYTEA NOT NULL,
    requested DOUBLE PRECISION NOT NULL, seq BIGSERIAL, PRIMARY KEY (network, key));
CREATE TABLE former (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE, key BYTEA NOT NULL,
    seq BIGSERIAL, PRIMARY KEY (network, key));
CREATE TABLE bans (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE, key BYTEA NOT NULL,
    PRIMARY KEY (network, key));
CREATE TABLE chat (
    id BIGSERIAL PRIMARY KEY, network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE,
    sender BYTEA NOT NULL, name TEXT NOT NULL, text TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL);
CREATE INDEX chat_by_network ON chat(network, id);
CREATE TABLE routes (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE, key BYTEA NOT NULL, prefix TEXT NOT NULL,
    PRIMARY KEY (network, key, prefix));
CREATE TABLE hubs (
    network TEXT NOT NULL REFERENCES networks(name) ON DELETE CASCADE, key BYTEA NOT NULL,
    PRIMARY KEY (network, key));
""",
]

PG_MIGRATION_LOCK = 0x6F766C79   # pg_advisory_xact_lock key: instances starting together migrate once


async def migrate_postgres(conn) -> int:
    """Bring a PostgreSQL database (an asyncpg connection) to the current schema; return its version."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", PG_MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = await conn.fetchval("SELECT version FROM schema_version")
        if version is None:
            await conn.execute("INSERT INTO schema_version VALUES (0)")
            version = 0
        for number, sql in enumerate(PG_STEPS, 1):
            if number > version:
                await conn.execute(sql)
                await conn.execute("UPDATE schema_version SET version=$1", number)
                version = number
    return version
