"""``overlay server --migrate-from sqlite:PATH --database postgresql://...``: move a deployment.

The SQLite database is read through a snapshot (SQLite's backup API, so a running server's
write-ahead log is included and the original is never written to), brought to the current schema
like any data directory, and copied table by table into the PostgreSQL database in one
transaction: nodes with their virtual IPs, networks with their settings, members and pending
requests in their order, former members, bans, approved routes, hubs and the kept chat (message
ids kept). A target that already holds nodes or networks is refused: nothing is overwritten.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from overlay.server.migrations import migrate_postgres
from overlay.server.store import Store

# (table, SELECT on SQLite in the order rows must arrive, INSERT on PostgreSQL, what the count means)
TABLES = [
    ("nodes", "SELECT key, name, vip, created, last_seen FROM nodes ORDER BY rowid",
     "INSERT INTO nodes (key, name, vip, created, last_seen) VALUES ($1,$2,$3,$4,$5)", "nodes"),
    ("networks", "SELECT name, pw_hash, owner, locked, approval, max_members, created, type, gateway, "
                 "encrypted FROM networks ORDER BY rowid",
     "INSERT INTO networks (name, pw_hash, owner, locked, approval, max_members, created, type, gateway, "
     "encrypted) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)", "networks"),
    ("members", "SELECT network, key, joined FROM members ORDER BY joined, rowid",
     "INSERT INTO members (network, key, joined) VALUES ($1,$2,$3)", "members"),
    ("pending", "SELECT network, key, requested FROM pending ORDER BY requested, rowid",
     "INSERT INTO pending (network, key, requested) VALUES ($1,$2,$3)", "pending join requests"),
    ("former", "SELECT network, key FROM former ORDER BY rowid",
     "INSERT INTO former (network, key) VALUES ($1,$2)", "former members"),
    ("bans", "SELECT network, key FROM bans", "INSERT INTO bans (network, key) VALUES ($1,$2)", "bans"),
    ("routes", "SELECT network, key, prefix FROM routes",
     "INSERT INTO routes (network, key, prefix) VALUES ($1,$2,$3)", "approved routes"),
    ("hubs", "SELECT network, key FROM hubs", "INSERT INTO hubs (network, key) VALUES ($1,$2)", "hubs"),
    ("chat", "SELECT id, network, sender, name, text, ts FROM chat ORDER BY id",
     "INSERT INTO chat (id, network, sender, name, text, ts) VALUES ($1,$2,$3,$4,$5,$6)", "chat messages"),
]


class TargetNotEmpty(Exception):
    pass


def parse_source(text: str) -> Path:
    """``sqlite:PATH`` (or a plain path) -> the SQLite file."""
    path = Path(text[len("sqlite:"):] if text.startswith("sqlite:") else text)
    if path.is_dir():
        path = path / "overlay.db"   # a server's data directory
    if not path.is_file():
        raise FileNotFoundError(f"no SQLite database at {path}")
    return path


def read_sqlite(path: Path) -> dict[str, list[tuple]]:
    """Every table's rows, from a migrated snapshot of the database at ``path``."""
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with tempfile.TemporaryDirectory(prefix="overlay-migrate-") as tmp:
        copy = Path(tmp) / "snapshot.db"
        dst = sqlite3.connect(copy)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        store = Store(copy)          # runs the SQLite migrations on the snapshot
        try:
            rows = {table: [tuple(r) for r in store.db.execute(select)] for table, select, _, _ in TABLES}
        finally:
            store.close()
    # SQLite's flags are integers, PostgreSQL's booleans
    rows["networks"] = [(*r[:3], bool(r[3]), bool(r[4]), *r[5:9], bool(r[9])) for r in rows["networks"]]
    return rows


async def copy_to_postgres(rows: dict[str, list[tuple]], url: str) -> list[tuple[str, int]]:
    """Write ``rows`` into the (empty) PostgreSQL database at ``url``; return (what, count) per table."""
    import asyncpg
    conn = await asyncpg.connect(url)
    try:
        await migrate_postgres(conn)
        async with conn.transaction():
            await conn.execute("LOCK TABLE nodes, networks IN EXCLUSIVE MODE")
            have = await conn.fetchval("SELECT (SELECT count(*) FROM nodes) + (SELECT count(*) FROM networks)")
            if have:
                raise TargetNotEmpty("the target database already holds nodes or networks; "
                                     "migrate only into an empty one")
            for table, _, insert, _ in TABLES:
                if rows[table]:
                    await conn.executemany(insert, rows[table])
            await conn.execute("SELECT setval(pg_get_serial_sequence('chat', 'id'), "
                               "GREATEST((SELECT max(id) FROM chat), 1))")
    finally:
        await conn.close()
    return [(what, len(rows[table])) for table, _, _, what in TABLES]


async def migrate(source: str, url: str) -> list[tuple[str, int]]:
    return await copy_to_postgres(read_sqlite(parse_source(source)), url)


def summary(moved: list[tuple[str, int]]) -> str:
    return "moved " + ", ".join(f"{n} {what}" for what, n in moved)
