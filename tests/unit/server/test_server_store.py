"""The server's store: SQLite migrations (a data directory from before them opens unchanged),
PostgreSQL's schema, ``--migrate-from`` SQLite to PostgreSQL, and what the database decides when
two instances race (distinct virtual IPs, unique names, the member limit, one network per name).

The PostgreSQL tests use the throw-away cluster of tests/support/postgres.py (``pg_url``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import sqlite3

import pytest

from overlay.control.messages import RequestError, validate_request
from overlay.server import migrate
from overlay.server.mediator import Mediator
from overlay.server.migrations import PG_STEPS, SQLITE_STEPS
from overlay.server.store import Store
from overlay.server.store_pg import PgStore
from tests.unit.control.test_control_mediator import PW, World, _setup, fake_hash

# The schema exactly as the server wrote it before schema_version existed (its CREATE script, then
# the three ALTERs it ran at start): a data directory of that server must open unchanged.
MAIN_SCHEMA = """
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
    PRIMARY KEY (network, key));
ALTER TABLE networks ADD COLUMN type TEXT NOT NULL DEFAULT 'mesh';
ALTER TABLE networks ADD COLUMN gateway BLOB;
ALTER TABLE networks ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 1;
"""


def key(label: str) -> bytes:
    return World.key(label)


def _old_deployment(path) -> None:
    db = sqlite3.connect(path)
    db.executescript(MAIN_SCHEMA)
    a, b, c = key("alice"), key("bob"), key("carol")
    db.executemany("INSERT INTO nodes VALUES (?,?,?,?,?)",
                   [(a, "alice", "100.64.0.1", 1.0, 5.0), (b, "bob", "100.64.0.2", 2.0, 5.0),
                    (c, "carol", "100.64.0.3", 3.0, 5.0)])
    db.execute("INSERT INTO networks VALUES ('lan', ?, ?, 1, 0, 5, 1.0, 'hub-and-spoke', ?, 0)",
               (fake_hash(PW), a, None))
    db.executemany("INSERT INTO members VALUES ('lan', ?, ?)", [(a, 1.0), (b, 2.0)])
    db.execute("INSERT INTO former VALUES ('lan', ?)", (c,))
    db.execute("INSERT INTO bans VALUES ('lan', ?)", (c,))
    db.execute("INSERT INTO hubs VALUES ('lan', ?)", (b,))
    db.execute("INSERT INTO routes VALUES ('lan', ?, '192.168.1.0/24')", (b,))
    db.execute("INSERT INTO chat (network, sender, name, text, ts) VALUES ('lan', ?, 'bob', 'hello', 4.0)", (b,))
    db.commit()
    db.close()


def _check_old_deployment(s) -> None:
    a, b, c = key("alice"), key("bob"), key("carol")
    assert s.node(b).vip == "100.64.0.2" and s.node(c).name == "carol"
    net = s.network("lan")
    assert (net.owner, net.locked, net.approval, net.max_members, net.type, net.encrypted) == \
        (a, True, False, 5, "hub-and-spoke", False)
    assert s.members("lan") == [a, b] and s.former_members("lan") == [c]
    assert s.is_banned("lan", c) and s.hubs("lan") == {b}
    assert s.routes("lan") == {b: ["192.168.1.0/24"]}
    assert [(n, t) for _, _, n, t, _ in s.chat_history("lan")] == [("bob", "hello")]


# ============================================================================ SQLite migrations


def test_sqlite_data_dir_from_before_migrations_opens_unchanged(tmp_path):
    path = tmp_path / "overlay.db"
    _old_deployment(path)
    s = Store(path)
    try:
        assert s.schema_version == len(SQLITE_STEPS)
        _check_old_deployment(s)
    finally:
        s.close()
    s = Store(path)               # a second start applies nothing
    try:
        assert s.db.execute("SELECT version FROM schema_version").fetchall() == [(len(SQLITE_STEPS),)]
        _check_old_deployment(s)
    finally:
        s.close()


def test_sqlite_from_before_network_types_gains_the_columns(tmp_path):
    path = tmp_path / "overlay.db"
    db = sqlite3.connect(path)
    db.executescript(MAIN_SCHEMA.split("ALTER")[0])
    db.execute("INSERT INTO networks VALUES ('lan', x'00', x'01', 0, 0, 0, 1.0)")
    db.commit()
    db.close()
    s = Store(path)
    try:
        net = s.network("lan")
        assert (net.type, net.gateway, net.encrypted) == ("mesh", None, True)
    finally:
        s.close()


def test_new_sqlite_database_is_at_the_last_version(tmp_path):
    s = Store(tmp_path / "overlay.db")
    try:
        assert s.schema_version == len(SQLITE_STEPS)
        cols = {r[1] for r in s.db.execute("PRAGMA table_info(networks)")}
        assert {"type", "gateway", "encrypted"} <= cols
    finally:
        s.close()


# ============================================================================ PostgreSQL


def test_postgres_schema_is_migrated_once_and_state_reloads(pg_url):
    w = World(pg_url)
    try:
        assert w.store.schema_version == len(PG_STEPS)
        _setup(w, "alice", "bob")
    finally:
        w.close()
    w2 = World(pg_url)            # a second start: nothing to migrate, everything loaded
    try:
        assert w2.store.schema_version == len(PG_STEPS)
        assert w2.count("schema_version") == 1
        assert w2.members("lan") == {"alice", "bob"}
    finally:
        w2.close()


def test_migrate_from_sqlite_moves_everything_and_refuses_a_non_empty_target(tmp_path, pg_url):
    path = tmp_path / "overlay.db"
    _old_deployment(path)
    moved = dict(asyncio.run(migrate.migrate(f"sqlite:{path}", pg_url)))
    assert moved == {"nodes": 3, "networks": 1, "members": 2, "pending join requests": 0, "former members": 1,
                     "bans": 1, "approved routes": 1, "hubs": 1, "chat messages": 1}
    assert migrate.summary(list(moved.items())).startswith("moved 3 nodes, 1 networks, 2 members")

    async def reopen():
        s = await PgStore.open(pg_url)
        try:
            _check_old_deployment(s)
            # new chat ids continue after the moved ones
            m = Mediator(s, identity_bits=0)
            m.hello(key("bob"), validate_request({"t": "hello", "id": 1, "name": "bob", "version": 1}), 10.0)
            msg = validate_request({"t": "chat", "id": 2, "network": "lan", "text": "after"})
            await s.prepare(m, key("bob"), msg, 10.0)
            assert m.handle(key("bob"), msg, 10.0)["chat_id"] == 2
            await s.flush()
        finally:
            await s.aclose()
    asyncio.run(reopen())
    with pytest.raises(migrate.TargetNotEmpty):
        asyncio.run(migrate.migrate(str(path), pg_url))


def test_migrate_from_a_live_world(tmp_path, pg_url):
    """State written by the mediator on SQLite (pending requests, types, chat) reads the same on PostgreSQL."""
    w = World(str(tmp_path / "overlay.db"))
    _setup(w, "alice", "bob", "carol")
    _setup(w, "dan", network="other", approval=True)
    w.hello("eve")
    w.req("eve", "join", network="other", password=PW)
    w.admin("alice", "lan", "type", target="gateway")
    w.admin("alice", "lan", "gateway", target="bob")
    w.admin("alice", "lan", "kick", target="carol")
    w.req("bob", "chat", network="lan", text="one")
    before = {n: w.store.node(w.key(n)).vip for n in ("alice", "bob", "carol", "dan", "eve")}
    w.close()
    asyncio.run(migrate.migrate(f"sqlite:{tmp_path}", pg_url))     # a data directory works too
    w2 = World(pg_url)
    try:
        assert {n: w2.store.node(w2.key(n)).vip for n in before} == before
        assert w2.store.network("lan").gateway == w2.key("bob") and w2.store.network("lan").type == "gateway"
        assert w2.store.pending("other") == [w2.key("eve")]
        assert w2.store.former_members("lan") == [w2.key("carol")]
        w2.hello("alice")
        w2.req("alice", "history", network="lan")
        assert [e["text"] for e in w2.ev("alice", "chat")] == ["one"]
        w2.hello("frank")
        w2.req("frank", "join", network="lan", password=PW)
        assert w2.store.node(w2.key("frank")).vip not in before.values()
    finally:
        w2.close()


# ============================================================================ racing instances


class Instance:
    """One server instance's store and mediator, driven as the glue drives them."""

    def __init__(self, store: PgStore):
        self.store = store
        self.m = Mediator(store, identity_bits=0)
        self.rid = 0

    async def request(self, who: str, t: str, **fields) -> dict:
        k = key(who)
        self.rid += 1
        msg = validate_request({"t": t, "id": self.rid, **fields})
        if t == "hello":
            claim = await self.store.prepare(self.m, k, msg, 1.0)
            reply = self.m.hello(k, msg, 1.0)
        else:
            h = fake_hash(msg["password"]) if t == "create" else None
            if t == "join":
                assert self.m.join_precheck(k, msg, 1.0) == fake_hash(msg["password"])
            claim = await self.store.prepare(self.m, k, msg, 1.0, h)
            try:
                reply = self.m.handle(k, msg, 1.0, password_hash=h, password_ok=True)
            except RequestError:
                await self.store.undo(claim)
                raise
        await self.store.flush()
        self.m.outgoing.clear()
        return reply


async def _two_instances(url: str, setup=None) -> tuple[Instance, Instance]:
    a = Instance(await PgStore.open(url, max_size=8))
    if setup is not None:
        await setup(a)
    b = Instance(await PgStore.open(url, max_size=8))   # loads what a wrote
    return a, b


async def _db_rows(url: str, sql: str) -> list:
    import asyncpg
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


def test_racing_joins_on_two_instances_get_distinct_vips_and_unique_names(pg_url):
    async def setup(a):
        await a.request("owner", "hello", name="owner", version=1)
        await a.request("owner", "create", network="lan", password=PW)

    async def main():
        a, b = await _two_instances(pg_url, setup)
        try:
            # 30 nodes per instance join at once; each name is used twice (once on each instance)
            async def join(inst, label, name):
                await inst.request(label, "hello", name=name, version=1)
                try:
                    return (await inst.request(label, "join", network="lan", password=PW))["status"]
                except RequestError as e:
                    return e.code
            jobs = [join(a, f"a{i}", f"n{i}") for i in range(30)] + [join(b, f"b{i}", f"n{i}") for i in range(30)]
            results = await asyncio.gather(*jobs)
            assert results.count("joined") == 30 and results.count("name_taken") == 30, results
            # a name a loser took is free again: it is not stored as a member anywhere
        finally:
            await a.store.aclose()
            await b.store.aclose()
        rows = await _db_rows(pg_url, "SELECT n.name, n.vip FROM members m JOIN nodes n ON n.key=m.key "
                                      "WHERE m.network='lan'")
        names = [r[0] for r in rows]
        assert len(names) == 31 and len(set(names)) == 31
        vips = await _db_rows(pg_url, "SELECT vip FROM nodes")
        assert len({r[0] for r in vips}) == len(vips)
        # the nodes that lost were not stored (their VIPs went back), those that won keep theirs
        assert len(vips) == 31
        assert all(ipaddress.IPv4Address(r[0]) in ipaddress.IPv4Network("100.64.0.0/10") for r in vips)
    asyncio.run(main())


def test_racing_joins_respect_max_members_and_distinct_creates(pg_url):
    async def setup(a):
        await a.request("owner", "hello", name="owner", version=1)
        await a.request("owner", "create", network="small", password=PW, max_members=5)

    async def main():
        a, b = await _two_instances(pg_url, setup)
        try:
            async def join(inst, label):
                await inst.request(label, "hello", name=label, version=1)
                try:
                    return (await inst.request(label, "join", network="small", password=PW))["status"]
                except RequestError as e:
                    return e.code
            results = await asyncio.gather(*[join(i, f"{p}{n}") for n in range(8) for p, i in (("a", a), ("b", b))])
            assert results.count("joined") == 4 and results.count("full") == 12, results

            async def create(inst, label):
                await inst.request(label, "hello", name=label, version=1)
                try:
                    return (await inst.request(label, "create", network="same", password=PW))["t"]
                except RequestError as e:
                    return e.code
            made = await asyncio.gather(*[create(i, f"c{p}{n}") for n in range(4) for p, i in (("a", a), ("b", b))])
            assert made.count("ok") == 1 and made.count("network_exists") == 7, made
        finally:
            await a.store.aclose()
            await b.store.aclose()
        count = await _db_rows(pg_url, "SELECT count(*) FROM members WHERE network='small'")
        assert count[0][0] == 5
    asyncio.run(main())


def test_racing_renames_into_one_name(pg_url):
    async def setup(a):
        for n in ("owner", "x", "y"):
            await a.request(n, "hello", name=n, version=1)
        await a.request("owner", "create", network="lan", password=PW)
        for n in ("x", "y"):
            await a.request(n, "join", network="lan", password=PW)

    async def main():
        a, b = await _two_instances(pg_url, setup)
        try:
            async def rename(inst, label):
                await inst.request(label, "hello", name=label, version=1)
                try:
                    return (await inst.request(label, "rename", name="same"))["t"]
                except RequestError as e:
                    return e.code
            results = await asyncio.gather(rename(a, "x"), rename(b, "y"))
            assert sorted(results) == ["name_taken", "ok"], results
        finally:
            await a.store.aclose()
            await b.store.aclose()
        names = await _db_rows(pg_url, "SELECT name FROM nodes ORDER BY name")
        assert sorted(r[0] for r in names) in (["owner", "same", "y"], ["owner", "same", "x"])
    asyncio.run(main())



def test_a_refused_chat_gives_its_reserved_id_back(pg_url):
    w = World(pg_url)
    try:
        _setup(w, "alice", "bob")
        w.hello("mallory")
        assert w.fails("mallory", "chat", network="lan", text="x").code == "not_member"
        assert w.store._chat_ids == []
        first = w.req("bob", "chat", network="lan", text="one")["chat_id"]
        second = w.req("alice", "chat", network="lan", text="two")["chat_id"]
        assert second > first
    finally:
        w.close()


class _FlakyPool:
    """A pool whose database is out of reach ``down`` times, then takes every statement."""

    def __init__(self, down: int):
        self.down = down
        self.executed: list[tuple] = []
        pool = self

        class Conn:
            def transaction(self):
                return self

            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc):
                return False

            async def execute(self, sql, *args):
                pool.executed.append((sql.split()[0], args))

        self.conn = Conn()

    def acquire(self):
        if self.down:
            self.down -= 1
            raise ConnectionRefusedError(111, "refused")
        return self.conn

    async def close(self):
        pass


def test_writes_wait_in_order_while_the_database_is_unreachable(monkeypatch):
    monkeypatch.setattr("overlay.server.store_pg.RETRY_INTERVAL", 0.01)

    async def main():
        pool = _FlakyPool(down=3)
        s = PgStore(pool)
        s.add_node(key("a"), "a", "100.64.0.1", 1.0)
        s.update_node(key("a"), "b", 2.0)
        await s.flush()                          # refused: kept
        assert pool.executed == [] and len(s._queue) == 2 and s.node(key("a")).name == "b"
        for _ in range(200):
            if not s._queue and pool.executed:
                break
            await asyncio.sleep(0.01)
        assert [sql for sql, _ in pool.executed] == ["INSERT", "UPDATE"] and s.write_errors == 0
        await s.aclose()
    asyncio.run(main())
