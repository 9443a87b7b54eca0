"""Persistent state of the mediation server: SQLite under ``--data`` (the default backend).

Nodes (key, name, virtual IP), networks (password hash, owner, settings, type, hubs, gateway,
approved routes), members, pending join requests, bans and the last chat messages survive a
server restart. Writes are tiny and rare next
to the control traffic, so every call commits (WAL mode keeps that cheap).

The mediator calls the synchronous methods of ``Store``; the PostgreSQL backend
(overlay/server/store_pg.py) offers the same ones over an in-memory model. ``StoreHooks`` are what
the asyncio glue awaits around a request: ``prepare`` (a database transaction that decides what
must hold across server instances: a virtual IP, name uniqueness, the member limit), ``undo``
(when the mediator then refused) and ``flush`` (the request's writes are durable); SQLite, one
process and synchronous, needs none of them. The schema and its migrations: overlay/server/migrations.py.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from overlay.control.messages import CHAT_HISTORY
from overlay.server.migrations import migrate_sqlite

@dataclass
class Network:
    name: str
    owner: bytes
    locked: bool
    approval: bool
    max_members: int
    pw_hash: bytes
    type: str = "mesh"           # mesh | hub-and-spoke | gateway
    gateway: bytes | None = None  # the gateway member of a gateway network (None: the owner)
    encrypted: bool = True        # False: payloads authenticated, not encrypted (admin encryption off)


@dataclass
class Node:
    key: bytes
    name: str
    vip: str


class StoreHooks:
    """What the glue awaits around a request (no-ops for SQLite; see the module docstring)."""

    async def prepare(self, mediator, key: bytes, msg: dict, now: float, password_hash: bytes | None = None):
        return None

    async def undo(self, claim) -> None:
        return None

    def claimed_vip(self, key: bytes) -> str | None:
        """The virtual IP ``prepare`` reserved in the database for a new node (None: allocate one)."""
        return None

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class Store(StoreHooks):
    def __init__(self, path: str | Path):
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.schema_version = migrate_sqlite(self.db)

    def close(self) -> None:
        self.db.close()

    def _one(self, sql: str, *args):
        return self.db.execute(sql, args).fetchone()

    # ---------------------------------------------------------------- nodes
    def node(self, key: bytes) -> Node | None:
        row = self._one("SELECT key, name, vip FROM nodes WHERE key=?", key)
        return Node(*row) if row else None

    def nodes(self, keys: list[bytes]) -> dict[bytes, Node]:
        out = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            q = ",".join("?" * len(chunk))
            for row in self.db.execute(f"SELECT key, name, vip FROM nodes WHERE key IN ({q})", chunk):
                out[row[0]] = Node(*row)
        return out

    def used_vips(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT vip FROM nodes")}

    def add_node(self, key: bytes, name: str, vip: str, now: float) -> None:
        self.db.execute("INSERT INTO nodes VALUES (?,?,?,?,?)", (key, name, vip, now, now))

    def update_node(self, key: bytes, name: str, now: float) -> None:
        self.db.execute("UPDATE nodes SET name=?, last_seen=? WHERE key=?", (name, now, key))

    def expirable_nodes(self, seen_before: float) -> list[tuple[bytes, str]]:
        """Nodes last seen before ``seen_before`` in no network, owning none, banned nowhere."""
        return list(self.db.execute(
            "SELECT key, vip FROM nodes WHERE last_seen < ? AND key NOT IN (SELECT key FROM members) "
            "AND key NOT IN (SELECT owner FROM networks) AND key NOT IN (SELECT key FROM bans)",
            (seen_before,)))

    def delete_node(self, key: bytes) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM pending WHERE key=?", (key,))
            self.db.execute("DELETE FROM nodes WHERE key=?", (key,))

    def node_count(self) -> int:
        return self._one("SELECT COUNT(*) FROM nodes")[0]

    # ---------------------------------------------------------------- networks
    def network(self, name: str) -> Network | None:
        row = self._one(
            "SELECT name, owner, locked, approval, max_members, pw_hash, type, gateway, encrypted FROM networks "
            "WHERE name=?", name)
        if not row:
            return None
        return Network(row[0], row[1], bool(row[2]), bool(row[3]), row[4], row[5], row[6], row[7], bool(row[8]))

    def add_network(self, name: str, pw_hash: bytes, owner: bytes, approval: bool, max_members: int,
                    now: float) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO networks (name, pw_hash, owner, approval, max_members, created) "
                            "VALUES (?,?,?,?,?,?)", (name, pw_hash, owner, int(approval), max_members, now))
            self.db.execute("INSERT INTO members VALUES (?,?,?)", (name, owner, now))

    def set_network(self, name: str, **fields) -> None:
        allowed = {"locked", "approval", "max_members", "owner", "pw_hash", "type", "gateway", "encrypted"}
        assert set(fields) <= allowed
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE networks SET {cols} WHERE name=?", (*fields.values(), name))

    def delete_network(self, name: str) -> None:
        self.db.execute("DELETE FROM networks WHERE name=?", (name,))

    def networks_of(self, key: bytes) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT network FROM members WHERE key=? ORDER BY joined", (key,))]

    def owned_networks(self, key: bytes) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM networks WHERE owner=?", (key,))]

    # ---------------------------------------------------------------- members
    def members(self, network: str) -> list[bytes]:
        return [r[0] for r in self.db.execute(
            "SELECT key FROM members WHERE network=? ORDER BY joined", (network,))]

    def member_count(self, network: str) -> int:
        return self._one("SELECT COUNT(*) FROM members WHERE network=?", network)[0]

    def is_member(self, network: str, key: bytes) -> bool:
        return self._one("SELECT 1 FROM members WHERE network=? AND key=?", network, key) is not None

    def add_member(self, network: str, key: bytes, now: float) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM pending WHERE network=? AND key=?", (network, key))
            self.db.execute("INSERT OR IGNORE INTO members VALUES (?,?,?)", (network, key, now))

    def remove_member(self, network: str, key: bytes) -> None:
        """Remove a member, remembered as a former member (the owner may still ban it by name)."""
        with self.db:
            self.db.execute("BEGIN")
            if self.db.execute("DELETE FROM members WHERE network=? AND key=?", (network, key)).rowcount:
                self.db.execute("INSERT OR REPLACE INTO former VALUES (?,?)", (network, key))
                self.db.execute("DELETE FROM hubs WHERE network=? AND key=?", (network, key))
                self.db.execute("DELETE FROM routes WHERE network=? AND key=?", (network, key))
                self.db.execute("UPDATE networks SET gateway=NULL WHERE name=? AND gateway=?", (network, key))

    def former_members(self, network: str) -> list[bytes]:
        """Nodes that left or were removed from ``network``, the most recent first."""
        return [r[0] for r in self.db.execute("SELECT key FROM former WHERE network=? ORDER BY rowid DESC",
                                              (network,))]

    def peers_of(self, key: bytes) -> set[bytes]:
        """Every node sharing at least one network with ``key`` (excluding itself)."""
        rows = self.db.execute(
            "SELECT DISTINCT m2.key FROM members m1 JOIN members m2 ON m1.network=m2.network "
            "WHERE m1.key=? AND m2.key<>?", (key, key))
        return {r[0] for r in rows}

    def shared_networks(self, a: bytes, b: bytes) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT m1.network FROM members m1 JOIN members m2 ON m1.network=m2.network "
            "WHERE m1.key=? AND m2.key=?", (a, b))]

    # ---------------------------------------------------------------- hubs (hub-and-spoke networks)
    def hubs(self, network: str) -> set[bytes]:
        return {r[0] for r in self.db.execute("SELECT key FROM hubs WHERE network=?", (network,))}

    def set_hub(self, network: str, key: bytes, on: bool) -> None:
        if on:
            self.db.execute("INSERT OR IGNORE INTO hubs VALUES (?,?)", (network, key))
        else:
            self.db.execute("DELETE FROM hubs WHERE network=? AND key=?", (network, key))

    # ---------------------------------------------------------------- approved gateway routes
    def routes(self, network: str) -> dict[bytes, list[str]]:
        out: dict[bytes, list[str]] = {}
        for key, prefix in self.db.execute("SELECT key, prefix FROM routes WHERE network=? ORDER BY prefix",
                                           (network,)):
            out.setdefault(key, []).append(prefix)
        return out

    def set_route(self, network: str, key: bytes, prefix: str, on: bool) -> bool:
        if on:
            return self.db.execute("INSERT OR IGNORE INTO routes VALUES (?,?,?)", (network, key, prefix)).rowcount > 0
        return self.db.execute("DELETE FROM routes WHERE network=? AND key=? AND prefix=?",
                               (network, key, prefix)).rowcount > 0

    # ---------------------------------------------------------------- pending / bans
    def pending(self, network: str) -> list[bytes]:
        return [r[0] for r in self.db.execute(
            "SELECT key FROM pending WHERE network=? ORDER BY requested", (network,))]

    def pending_networks_of(self, key: bytes) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT network FROM pending WHERE key=?", (key,))]

    def add_pending(self, network: str, key: bytes, now: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO pending VALUES (?,?,?)", (network, key, now))

    def remove_pending(self, network: str, key: bytes) -> None:
        self.db.execute("DELETE FROM pending WHERE network=? AND key=?", (network, key))

    def is_banned(self, network: str, key: bytes) -> bool:
        return self._one("SELECT 1 FROM bans WHERE network=? AND key=?", network, key) is not None

    def bans(self, network: str) -> list[bytes]:
        return [r[0] for r in self.db.execute("SELECT key FROM bans WHERE network=?", (network,))]

    def ban(self, network: str, key: bytes) -> None:
        self.db.execute("INSERT OR IGNORE INTO bans VALUES (?,?)", (network, key))

    def unban(self, network: str, key: bytes) -> bool:
        return self.db.execute("DELETE FROM bans WHERE network=? AND key=?", (network, key)).rowcount > 0

    # ---------------------------------------------------------------- chat
    def add_chat(self, network: str, sender: bytes, name: str, text: str, now: float) -> int:
        with self.db:
            self.db.execute("BEGIN")
            cid = self.db.execute("INSERT INTO chat (network, sender, name, text, ts) VALUES (?,?,?,?,?)",
                                  (network, sender, name, text, now)).lastrowid
            self.db.execute(
                "DELETE FROM chat WHERE network=? AND id NOT IN "
                "(SELECT id FROM chat WHERE network=? ORDER BY id DESC LIMIT ?)",
                (network, network, CHAT_HISTORY))
        assert cid is not None   # an INSERT's row id
        return cid

    def chat_history(self, network: str) -> list[tuple[int, bytes, str, str, float]]:
        rows = self.db.execute(
            "SELECT id, sender, name, text, ts FROM chat WHERE network=? ORDER BY id DESC LIMIT ?",
            (network, CHAT_HISTORY)).fetchall()
        return rows[::-1]
