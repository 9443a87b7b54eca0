"""The server's store on PostgreSQL (``overlay server --database postgresql://USER@HOST:PORT/DB``).

The mediator is synchronous (sans-I/O), so it reads an in-memory ``Model`` loaded at start and
its writes are queued as SQL; the glue awaits ``flush`` (one transaction, in order) before it
answers a request, so a reply means the change is in the database, as with SQLite.

What must stay true with several server instances on one database is decided by the database, in
``prepare``, a transaction the glue awaits before the mediator applies a request:

- a new node's virtual IP: inserted under ``UNIQUE (vip)``; a clash (another instance took it)
  tries the next address;
- a join or join request: the network's row is locked (``SELECT ... FOR UPDATE``), which orders
  every join into it and every rename of one of its members across instances; under that lock the
  database checks the ban, the lock, ``max_members`` and name uniqueness (members and pending
  requesters), then inserts the member or the request;
- a create: the network's primary key;
- a node's new name (hello, rename): its networks' rows locked, then checked as above;
- a chat message's id: the table's sequence.

Should the mediator then refuse for a reason of its own (a rate limit), ``undo`` removes what
``prepare`` inserted. The driver is asyncpg (see pyproject.toml).
"""

from __future__ import annotations

import asyncio
import logging

from overlay.control.messages import RequestError, normalize_name
from overlay.server.migrations import migrate_postgres
from overlay.server.model import Model, NodeRow
from overlay.ratelog import LogLimiter
from overlay.server.vips import PoolExhausted

log = logging.getLogger("overlay.server")

RETRY_INTERVAL = 1.0   # seconds between attempts while the database is out of reach
VIP_ATTEMPTS = 64      # addresses tried when other instances keep taking the one proposed

NAME_CLASH = ("SELECT 1 FROM nodes n WHERE n.name=$2 AND n.key<>$3 AND ("
              "EXISTS (SELECT 1 FROM members m WHERE m.network=$1 AND m.key=n.key) OR "
              "EXISTS (SELECT 1 FROM pending p WHERE p.network=$1 AND p.key=n.key)) LIMIT 1")


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


class Claim:
    """What ``prepare`` changed in the database, for ``undo``."""

    def __init__(self) -> None:
        self.undo: list[tuple[str, tuple]] = []
        self.vip: str | None = None        # a virtual IP taken from the mediator's allocator
        self.key: bytes | None = None
        self.release = lambda vip: None     # gives ``vip`` back to the mediator's allocator
        self.chat_id: int | None = None     # reserved for a chat message


class PgStore(Model):
    def __init__(self, pool, url: str = "") -> None:
        super().__init__()
        self.pool = pool
        self.url = url
        self.replaying = False       # applying another instance's change: the database has it already
        self._queue: list[tuple[str, tuple]] = []
        self._flush_lock = asyncio.Lock()
        self._kicked = False
        self._claimed: dict[bytes, str] = {}
        self._chat_ids: list[int] = []
        self.schema_version = 0
        self.write_errors = 0
        self.writes = 0              # changes made by this instance (``load_fresh`` watches it)
        self._gate: asyncio.Event | None = None   # set while ``load_fresh`` runs
        self.rlog = LogLimiter()
        self._retry: asyncio.Task | None = None

    @classmethod
    async def open(cls, url: str, *, min_size: int = 1, max_size: int = 4) -> "PgStore":
        import asyncpg   # the optional extra: overlay[postgres]
        pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size)
        try:
            store = cls(pool, url)
            async with pool.acquire() as conn:
                store.schema_version = await migrate_postgres(conn)
                await store._load(conn)
        except BaseException:
            await pool.close()
            raise
        return store

    async def _load(self, conn) -> None:
        await load_model(self, conn)

    async def load_fresh(self, attempts: int = 5) -> tuple[Model, str]:
        """The whole database loaded again into a new ``Model``, and the snapshot it was read in
        (``pg_current_snapshot()``: which transactions it shows, for ``visible_in``). Requests wait
        in ``prepare`` until the caller has taken the model (it must not yield before); our queued
        writes are flushed first; should this instance write meanwhile all the same (a node's
        departure: its last-seen time does not count), it loads again."""
        gate = self._gate = asyncio.Event()      # requests wait in ``prepare`` meanwhile
        try:
            for _ in range(attempts):
                await self.flush()
                writes = self.writes
                model = Model()
                async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                                         readonly=True):
                    snapshot = await conn.fetchval("SELECT pg_current_snapshot()::text")
                    await load_model(model, conn)
                if self.writes == writes and not self._queue:
                    break
            else:
                log.warning("instance sync: this instance kept writing while its model was reloaded")
        finally:
            # the waiters run once the caller yields: it takes the model first
            self._gate = None
            gate.set()
        return model, snapshot

    # ---------------------------------------------------------------- writes
    def _write(self, sql: str, *args) -> None:
        if not self.replaying:
            if not sql.startswith("UPDATE nodes SET name=$1, last_seen="):
                self.writes += 1
            self._queue.append((sql, args))
            self.flush_soon()

    def notify(self, channel: str, payload: str) -> None:
        """NOTIFY other instances, in order with the writes queued before (same transaction). The
        payload goes out behind the transaction's id and a space (see ``visible_in``)."""
        self._queue.append(("SELECT pg_notify($1, pg_current_xact_id()::text || ' ' || $2)", (channel, payload)))
        self.flush_soon()

    def flush_soon(self) -> None:
        if self._queue and not self._kicked:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return      # no loop (a synchronous caller): the next flush() takes it
            self._kicked = True
            loop.call_soon(self._kick)

    def _kick(self) -> None:
        self._kicked = False
        if self._queue:
            asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        """Write everything queued so far, in order, in one transaction (writes of the sync paths,
        such as a disconnect, are flushed by a task the first of them schedules). The database
        out of reach: the changes stay queued, in order, and are tried again every
        ``RETRY_INTERVAL`` (the model, and so the server, goes on meanwhile); a statement the
        database refuses is logged and counted, and the others are written one by one."""
        async with self._flush_lock:
            batch, self._queue = self._queue, []
            if not batch:
                return
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    for sql, args in batch:
                        await conn.execute(sql, *args)
                return
            except _unreachable() as e:
                self._queue[:0] = batch
                self.rlog.log(log, logging.WARNING, "database unreachable (%s); %d changes queued, retrying",
                              e, len(self._queue))
                self._retry_later()
                return
            except Exception as e:      # one bad statement must not lose the others: one by one
                log.warning("database write failed (%s); writing %d changes one by one", e, len(batch))
            async with self.pool.acquire() as conn:
                for sql, args in batch:
                    try:
                        await conn.execute(sql, *args)
                    except Exception as e2:
                        self.write_errors += 1
                        self.rlog.log(log, logging.ERROR, "database write lost: %s: %s", " ".join(sql.split()[:3]), e2)

    def _retry_later(self) -> None:
        if self._retry is None or self._retry.done():
            async def retry() -> None:
                await asyncio.sleep(RETRY_INTERVAL)
                self._retry = None           # a failure in this flush schedules the next try
                await self.flush()
            self._retry = asyncio.get_running_loop().create_task(retry())

    async def aclose(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        await self.flush()
        if self._retry is not None:
            self._retry.cancel()
        if self._queue:
            log.error("database unreachable at exit: %d changes not written", len(self._queue))
        await self.pool.close()

    def close(self) -> None:
        """Synchronous callers cannot close a pool; ``aclose`` does."""

    # ---------------------------------------------------------------- claims (see the module docstring)
    def claimed_vip(self, key: bytes) -> str | None:
        return self._claimed.pop(key, None)

    def replay_vip(self, mediator, key: bytes, vip: str) -> None:
        """Another instance stored ``key`` with ``vip``: the mediator's replay takes that one."""
        if self.node(key) is None:
            self._claimed[key] = vip
            mediator.vips.mark_used(vip)

    def replay_chat_id(self, cid: int) -> None:
        self._chat_ids.insert(0, cid)

    def _next_chat_id(self) -> int:
        if self._chat_ids:
            return self._chat_ids.pop(0)
        # no reservation (a caller that skipped prepare): past the highest id seen here
        return max((m[-1][0] for m in self._chat.values() if m), default=0) + 1

    async def prepare(self, mediator, key: bytes, msg: dict, now: float, password_hash: bytes | None = None):
        while self._gate is not None:
            await self._gate.wait()
        try:
            return await self._prepare(mediator, key, msg, now, password_hash)
        except _unreachable() as e:
            self.rlog.log(log, logging.WARNING, "database unreachable: %s", e)
            raise RequestError("unavailable", "the server cannot reach its database; try again shortly") from None

    async def _prepare(self, mediator, key: bytes, msg: dict, now: float, password_hash: bytes | None):
        t = msg["t"]
        if t == "chat":
            claim = Claim()
            claim.chat_id = await self.pool.fetchval("SELECT nextval(pg_get_serial_sequence('chat', 'id'))")
            self._chat_ids.append(claim.chat_id)
            return claim
        if t in ("hello", "rename"):
            node = self.node(key)
            try:
                name = normalize_name(msg["name"], "node name")
            except RequestError:
                return None                  # the mediator refuses it
            if node is None or node.name == name:
                return None
            return await self._claim_name(key, name, node.name, now)
        if t in ("create", "join"):
            return await self._claim_membership(mediator, key, msg, now, password_hash)
        return None

    async def undo(self, claim) -> None:
        if claim is None:
            return
        if claim.chat_id in self._chat_ids:      # the mediator refused the message
            self._chat_ids.remove(claim.chat_id)
        if claim.key is not None:
            self._claimed.pop(claim.key, None)
        if claim.vip is not None and claim.key is not None and self.node(claim.key) is None:
            claim.release(claim.vip)
        if not claim.undo:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            for sql, args in claim.undo:
                await conn.execute(sql, *args)

    async def _claim_name(self, key: bytes, name: str, old: str, now: float) -> Claim:
        claim = Claim()
        async with self.pool.acquire() as conn, conn.transaction():
            nets = [r[0] for r in await conn.fetch(
                "SELECT name FROM networks WHERE name IN (SELECT network FROM members WHERE key=$1 "
                "UNION SELECT network FROM pending WHERE key=$1) ORDER BY name FOR UPDATE", key)]
            for net in nets:
                if await conn.fetchval(NAME_CLASH, net, name, key):
                    raise RequestError("name_taken", f"the name {name!r} is already taken in network {net!r}")
            await conn.execute("UPDATE nodes SET name=$1 WHERE key=$2", name, key)
        claim.undo.append(("UPDATE nodes SET name=$1 WHERE key=$2 AND name=$3", (old, key, name)))
        return claim

    async def _claim_membership(self, mediator, key: bytes, msg: dict, now: float,
                                password_hash: bytes | None) -> Claim | None:
        network = normalize_name(msg["network"], "network name")
        node = self.node(key)
        name = mediator._guests.get(key) if node is None else node.name
        if name is None:
            return None                      # not said hello: the mediator refuses
        claim = Claim()
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if self.node(key) is None:
                    await self._claim_node(conn, mediator, key, name, now, claim)
                if msg["t"] == "create":
                    if password_hash is None:
                        raise RequestError("internal", "password was not hashed")
                    made = await conn.fetchval(
                        "INSERT INTO networks (name, pw_hash, owner, approval, max_members, created) "
                        "VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (name) DO NOTHING RETURNING name",
                        network, password_hash, key, bool(msg.get("approval", False)), msg.get("max_members", 0), now)
                    if made is None:
                        raise RequestError("network_exists", f"network {network!r} already exists")
                    await conn.execute("INSERT INTO members (network, key, joined) VALUES ($1,$2,$3)", network, key, now)
                    claim.undo.append(("DELETE FROM networks WHERE name=$1 AND owner=$2", (network, key)))
                else:
                    await self._claim_join(conn, key, name, network, now, claim)
        except BaseException:
            if claim.vip is not None:
                mediator.vips.release(claim.vip)
                self._claimed.pop(key, None)
            raise
        if claim.vip is not None:
            # the node row goes when the whole request is undone, unless the node got stored
            claim.undo.append(("DELETE FROM nodes WHERE key=$1 AND NOT EXISTS "
                               "(SELECT 1 FROM members WHERE key=$1) AND NOT EXISTS "
                               "(SELECT 1 FROM pending WHERE key=$1)", (key,)))
        return claim

    async def _claim_node(self, conn, mediator, key: bytes, name: str, now: float, claim: Claim) -> None:
        for _ in range(VIP_ATTEMPTS):
            try:
                vip = mediator.vips.allocate()
            except PoolExhausted:
                raise RequestError("pool_exhausted",
                                   f"the server's address pool {mediator.pool} is exhausted") from None
            got = await conn.fetchval("INSERT INTO nodes VALUES ($1,$2,$3,$4,$5) ON CONFLICT DO NOTHING "
                                      "RETURNING vip", key, name, vip, now, now)
            if got is not None:
                claim.vip, claim.key, claim.release = vip, key, mediator.vips.release
                self._claimed[key] = vip
                return
            have = await conn.fetchval("SELECT vip FROM nodes WHERE key=$1", key)
            mediator.vips.release(vip)
            if have is not None:            # another instance stored this node meanwhile
                self._claimed[key] = have
                claim.key = key
                return
            # the address went to a node of another instance: leave it marked used here
            mediator.vips.mark_used(vip)
        raise RequestError("internal", "could not allocate a virtual IP; try again")

    async def _claim_join(self, conn, key: bytes, name: str, network: str, now: float, claim: Claim) -> None:
        row = await conn.fetchrow("SELECT approval, locked, max_members FROM networks WHERE name=$1 FOR UPDATE",
                                  network)
        if row is None:
            raise RequestError("unknown_network", f"network {network!r} does not exist")
        approval, locked, max_members = row
        if await conn.fetchval("SELECT 1 FROM members WHERE network=$1 AND key=$2", network, key):
            raise RequestError("already_member", f"you are already a member of {network!r}")
        if await conn.fetchval("SELECT 1 FROM bans WHERE network=$1 AND key=$2", network, key):
            raise RequestError("banned", f"you are banned from {network!r}")
        if locked:
            raise RequestError("locked", f"network {network!r} is locked: its owner is not accepting new members")
        if max_members and await conn.fetchval("SELECT count(*) FROM members WHERE network=$1",
                                               network) >= max_members:
            raise RequestError("full", f"network {network!r} is full ({max_members} members)")
        if await conn.fetchval(NAME_CLASH, network, name, key):
            raise RequestError("name_taken", f"the name {name!r} is already taken in network {network!r}; "
                                             "restart with another --name")
        if approval:
            if await conn.fetchval("SELECT 1 FROM pending WHERE network=$1 AND key=$2", network, key) is None:
                await conn.execute("INSERT INTO pending (network, key, requested) VALUES ($1,$2,$3)",
                                   network, key, now)
                claim.undo.append(("DELETE FROM pending WHERE network=$1 AND key=$2", (network, key)))
        else:
            await conn.execute("INSERT INTO members (network, key, joined) VALUES ($1,$2,$3)", network, key, now)
            claim.undo.append(("DELETE FROM members WHERE network=$1 AND key=$2", (network, key)))


async def load_model(model: Model, conn) -> None:
    """Every table of the database into ``model``."""
    for r in await conn.fetch("SELECT key, name, vip, created, last_seen FROM nodes"):
        model._nodes[bytes(r[0])] = _node_row(r)
    for r in await conn.fetch("SELECT name, pw_hash, owner, locked, approval, max_members, created, type, "
                              "gateway, encrypted FROM networks ORDER BY created, name"):
        model._load_network(r[0], bytes(r[1]), bytes(r[2]), r[3], r[4], r[5], r[6], r[7],
                            bytes(r[8]) if r[8] is not None else None, r[9])
    for r in await conn.fetch("SELECT network, key, joined FROM members ORDER BY joined, seq"):
        model._load_member(r[0], bytes(r[1]), r[2])
    for r in await conn.fetch("SELECT network, key, requested FROM pending ORDER BY requested, seq"):
        model._load_pending(r[0], bytes(r[1]), r[2])
    for r in await conn.fetch("SELECT network, key FROM former ORDER BY seq"):
        model._former[r[0]][bytes(r[1])] = None
    for r in await conn.fetch("SELECT network, key FROM bans"):
        model._load_ban(r[0], bytes(r[1]))
    for r in await conn.fetch("SELECT network, key, prefix FROM routes ORDER BY prefix"):
        model._routes[r[0]].setdefault(bytes(r[1]), []).append(r[2])
    for r in await conn.fetch("SELECT network, key FROM hubs"):
        model._hubs[r[0]].add(bytes(r[1]))
    for r in await conn.fetch("SELECT id, network, sender, name, text, ts FROM chat ORDER BY id"):
        model._chat[r[1]].append((r[0], bytes(r[2]), r[3], r[4], r[5]))


def visible_in(snapshot: str, xid: int) -> bool:
    """Whether transaction ``xid`` (committed: its NOTIFY arrived) is visible in ``snapshot``
    (``xmin:xmax:xip,...``, PostgreSQL's text form of pg_snapshot)."""
    xmin, xmax, xip = snapshot.split(":")
    if xid < int(xmin):
        return True
    return xid < int(xmax) and str(xid) not in xip.split(",")


def _unreachable() -> tuple:
    """The exceptions of a database out of reach (a connection that failed or could not be made)."""
    import asyncpg
    return (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
            asyncpg.CannotConnectNowError)


def _node_row(r) -> NodeRow:
    return NodeRow(r[1], r[2], r[3], r[4])
