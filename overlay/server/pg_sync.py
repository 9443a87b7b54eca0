"""Several ``overlay server`` instances on one PostgreSQL database: LISTEN/NOTIFY between them.

Every instance holds the whole state in memory (overlay/server/store_pg.py) and decides what must
be unique in the database. What one instance changes, the others learn through PostgreSQL's
NOTIFY, sent in the same transaction as the change (so it arrives after the change is committed,
in commit order): each request an instance's mediator accepted, with what made it deterministic
(the virtual IP the database gave a new node, the chat message's id, a password's hash, ``now``),
and each node's arrival (hello) and departure. A receiving instance replays that request on its
own mediator with its writes switched off: its model follows the database, and the events the
mediator produces reach that instance's own nodes (an event for a node connected elsewhere has no
session here and is dropped). So presence, member changes, chat and punch introductions cross
instances with no protocol of our own beyond the request messages themselves.

A node is online on one instance at a time: a hello on another instance replaces the older session
(as a second connection does on one instance). An instance that stops or dies drops its
listening connection; the others see that in ``pg_stat_activity`` (the connection is named after
the instance) and take its nodes offline. A starting instance asks the others (``sync``) to
announce their online nodes again.

A hello's announcement carries the relay address of the instance the node is on (``r``: where that
node reaches it, or ``--relay-address``); the others put it in the node's member record
(``relay``) for their own nodes, so a pair of nodes on two instances relays through one of them
(the rule is the nodes': overlay/node/server_path.py).

NOTIFYs sent while an instance's listening connection is down (or before it first listens, after
the store's load) are lost. When it listens again (or first),
the instance holds the events that arrive, loads the database again and tells its nodes what
changed (overlay/server/pg_repair.py), then applies the held events that the load did not show
(each NOTIFY carries its transaction's id; the load, its snapshot). It asks the others to
announce their nodes again, and takes offline the nodes of other instances not announced again
within ``CONFIRM_WITHIN`` (they left while it was not listening).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from overlay.control.messages import RequestError, error, key_from_text, key_to_text
from overlay.ratelog import LogLimiter

log = logging.getLogger("overlay.server")

CHANNEL = "overlay_events"
MAX_PAYLOAD = 7900             # NOTIFY's limit is 8000 bytes
APP_PREFIX = "overlay-server "
LIVENESS_INTERVAL = 2.0        # how often instances look for departed ones
MAX_RELAY_ADDRESS = 64         # "[IPv6]:port" fits
CONFIRM_WITHIN = 5.0           # after listening again: the others' nodes not announced by then are offline
# requests that change the database: after a reload, skipped if the load showed their transaction
MODEL_WRITES = {"create", "join", "leave", "admin", "rename", "chat"}

# requests that change nothing: not announced
READ_ONLY = {"ping", "history", "members"}
READ_ONLY_ADMIN = {"pending", "routes"}


class InstanceSync:
    def __init__(self, server, store) -> None:
        self.server = server
        self.store = store
        self.id = os.urandom(6).hex()
        self.remote: dict[bytes, str] = {}       # node online on another instance -> that instance
        self.relay_at: dict[bytes, str] = {}     # such a node -> its instance's relay address (hello's "r")
        self.conn: Any = None
        self.rlog = LogLimiter()
        self.replayed = 0
        self.diverged = 0                         # replays this instance's mediator refused
        self._last_liveness = 0.0
        # our online nodes: their hello, source address, our relay address as they reach it
        self.local: dict[bytes, tuple[dict, str | None, str | None]] = {}
        self._held: list[tuple[int | None, dict]] | None = None   # events arriving while we reload
        self._repair_needed = False
        self._unconfirmed: set[bytes] = set()    # others' nodes not announced again since we listen again
        self._confirm_by = 0.0
        self.confirm_within = CONFIRM_WITHIN
        self.repairs = 0                         # reloads after the listening connection came back
        self.repaired_networks = 0               # networks found changed by them

    async def start(self) -> None:
        import asyncpg
        first = self.conn is None
        if first:       # what changed between the store's load and now: caught up below
            self._held = []
        try:
            self.conn = await asyncpg.connect(self.store.url,
                                              server_settings={"application_name": APP_PREFIX + self.id})
            await self.conn.add_listener(CHANNEL, self._on_notify)
        except BaseException:
            if first:
                self._held = None
            raise
        self._send({"k": "sync"})
        await self.store.flush()
        if first:
            self._repair_needed = True
            await self._repair(after_gap=False)

    async def close(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close()
            except Exception:
                pass

    # ---------------------------------------------------------------- out
    def _send(self, ev: dict) -> None:
        ev["i"] = self.id
        payload = json.dumps(ev, separators=(",", ":"), ensure_ascii=False)
        if len(payload.encode()) > MAX_PAYLOAD:
            self.rlog.log(log, logging.WARNING, "instance sync: a %s event is too large to announce (%d bytes)",
                          ev.get("k"), len(payload))
            return
        self.store.notify(CHANNEL, payload)

    def online_elsewhere(self, key: bytes) -> bool:
        return key in self.remote

    def relay_of(self, key: bytes) -> str | None:
        """The relay address of the instance ``key`` is online on, if that is another instance."""
        return self.relay_at.get(key) if key in self.remote else None

    def _gone(self, key: bytes) -> None:
        del self.remote[key]
        self.relay_at.pop(key, None)

    def hello(self, key: bytes, msg: dict, now: float, source: str | None, relay: str | None = None) -> None:
        self.remote.pop(key, None)
        self.relay_at.pop(key, None)
        self.local[key] = (msg, source, relay)
        ev = {"k": "hello", "key": key_to_text(key), "m": msg, "now": now}
        if relay:
            ev["r"] = relay
        self._send(ev)

    def bye(self, key: bytes, now: float) -> None:
        self.local.pop(key, None)
        self._send({"k": "bye", "key": key_to_text(key), "now": now})

    def accepted(self, key: bytes, msg: dict, now: float, reply: dict, password_hash: bytes | None,
                 source: str | None, relay: str | None = None) -> None:
        """The mediator accepted ``msg`` from a node connected here: tell the other instances
        (``relay``: for a hello, our relay address as that node reaches us)."""
        t = msg["t"]
        if t == "hello":
            self.hello(key, msg, now, source, relay)
            return
        if t in READ_ONLY or (t == "admin" and msg["action"] in READ_ONLY_ADMIN):
            return
        msg = {k: v for k, v in msg.items() if k not in ("password", "proof")}
        ev = {"k": "req", "key": key_to_text(key), "m": msg, "now": now}
        node = self.store.node(key)
        if t in ("create", "join") and node is not None:
            ev["vip"] = node.vip
        if t == "chat":
            ev["cid"] = reply.get("chat_id")
        if password_hash is not None:
            ev["h"] = password_hash.hex()
        self._send(ev)

    # ---------------------------------------------------------------- in
    def _on_notify(self, conn, pid, channel, payload) -> None:
        try:
            xid: int | None = None
            if not payload.startswith("{"):          # "XID {json}" (store_pg.PgStore.notify)
                head, _, payload = payload.partition(" ")
                xid = int(head)
            ev = json.loads(payload)
            if ev.get("i") == self.id:
                return
            if self._held is not None:
                self._held.append((xid, ev))
                return
            self._receive(ev)
        except Exception:
            self.rlog.log(log, logging.ERROR, "instance sync: cannot apply an event", exc_info=True)
        self.server.deliver()

    def _receive(self, ev: dict) -> None:
        try:
            self.server.mediator.end_turn()   # another instance changed the store: no cached reads
            self._apply(ev)
            self.server.mediator.end_turn()
        except Exception:
            self.rlog.log(log, logging.ERROR, "instance sync: cannot apply an event", exc_info=True)

    def _apply(self, ev: dict) -> None:
        kind, origin = ev["k"], ev["i"]
        server, m = self.server, self.server.mediator
        if kind == "sync":               # a new instance: announce our nodes again
            self._announce_local()
            return
        key = key_from_text(ev["key"])
        now = ev.get("now", time.time())
        self.replayed += 1
        self.store.replaying = True
        proven = key in m._proven
        try:
            if kind == "hello":
                self.remote[key] = origin
                self._unconfirmed.discard(key)
                relay = ev.get("r")
                if isinstance(relay, str) and 0 < len(relay) <= MAX_RELAY_ADDRESS:
                    self.relay_at[key] = relay
                else:
                    self.relay_at.pop(key, None)
                local = server.sessions.get(key)
                if local is not None:    # the node moved here -> there: the newer session wins
                    local.close(error(None, "replaced", "this node connected again from elsewhere"))
                # no source address: the rate limits per address are the origin's business (a
                # replica counting every instance's new nodes would refuse what the origin accepted)
                m.hello(key, ev["m"], now, source=None)
            elif kind == "bye":
                if self.remote.get(key) == origin:
                    self._gone(key)
                    if key not in server.sessions:
                        m.disconnect(key, now)
            elif kind == "req":
                msg = ev["m"]
                if ev.get("vip"):
                    self.store.replay_vip(m, key, ev["vip"])
                if ev.get("cid") is not None:
                    self.store.replay_chat_id(ev["cid"])
                m._proven.add(key)       # the origin checked its proof of work
                h = bytes.fromhex(ev["h"]) if ev.get("h") else None
                m.handle(key, msg, now, password_ok=True, password_hash=h)
                server.membership_changed(msg["t"])
        except RequestError as e:
            self.diverged += 1
            self.rlog.log(log, logging.WARNING, "instance sync: %s from another instance refused here: %s",
                          ev.get("m", {}).get("t", kind), e.message)
        finally:
            self.store.replaying = False
            if not proven:
                m._proven.discard(key)

    def _announce_local(self) -> None:
        """Announce our nodes again: hello, endpoints, the networks they went offline in."""
        m = self.server.mediator
        for key in list(self.server.sessions):
            hello = self.local.get(key)
            if hello is not None:
                self.hello(key, hello[0], time.time(), hello[1], hello[2])
                if key in m.endpoints:
                    self._send({"k": "req", "key": key_to_text(key), "now": time.time(),
                                "m": {"t": "endpoints", "id": 0, **m.endpoints[key]}})
                for net in m.away.get(key, ()):
                    self._send({"k": "req", "key": key_to_text(key), "now": time.time(),
                                "m": {"t": "presence", "id": 0, "network": net, "online": False}})

    async def _repair(self, after_gap: bool = True) -> None:
        """Listening again after a gap (or for the first time, after the store's load): reload
        the model, tell our nodes what changed meanwhile (pg_repair.py), then apply the events held
        during the reload that it did not show."""
        from overlay.server.pg_repair import reconcile
        from overlay.server.store_pg import visible_in
        if self._held is None:
            self._held = []
        snapshot = ""
        try:
            fresh, snapshot = await self.store.load_fresh()
            m = self.server.mediator
            old = self.store.adopt(fresh)
            changed = reconcile(m, old, self.store)
            self._repair_needed = False
            self.server.membership_changed("admin")     # who may relay to whom may have changed
            if after_gap:
                self.repairs += 1
                self.repaired_networks += changed
                log.warning("instance sync: reloaded after listening again; %d networks had changed", changed)
        finally:
            held, self._held = self._held, None
            for xid, ev in held:
                done = (self._repair_needed is False and xid is not None and ev.get("k") == "req"
                        and ev.get("m", {}).get("t") in MODEL_WRITES and visible_in(snapshot, xid))
                if not done:
                    self._receive(ev)
            self.server.deliver()

    # ---------------------------------------------------------------- liveness
    async def check_liveness(self) -> None:
        """Listen again if our connection broke (reloading what may have changed meanwhile,
        announcing our nodes again, since the others took them offline), and take the nodes of
        instances whose connection is gone offline."""
        now = time.monotonic()
        if now - self._last_liveness < LIVENESS_INTERVAL:
            return
        self._last_liveness = now
        if self.conn is None or self.conn.is_closed():
            log.warning("instance sync: the listening connection was lost; listening again")
            self._held = []                      # from the moment we listen until the reload is in
            try:
                await self.start()               # asks the others to announce their nodes again
            except BaseException:
                self._held = None
                raise
            self._repair_needed = True
            self._unconfirmed = set(self.remote)
            self._confirm_by = time.monotonic() + self.confirm_within
            self._announce_local()
            await self.store.flush()
        if self._repair_needed:
            await self._repair()
        if self._unconfirmed and time.monotonic() >= self._confirm_by:
            self._take_offline([k for k in self._unconfirmed if k in self.remote])
            self._unconfirmed = set()
        if not self.remote:
            return
        rows = await self.store.pool.fetch("SELECT application_name FROM pg_stat_activity "
                                           "WHERE application_name LIKE $1", APP_PREFIX + "%")
        alive = {r[0][len(APP_PREFIX):] for r in rows}
        self._take_offline([k for k, inst in self.remote.items() if inst not in alive])

    def _take_offline(self, gone: list[bytes]) -> None:
        """Nodes of other instances that are gone (their instance, or they left unannounced)."""
        if not gone:
            return
        m = self.server.mediator
        for key in gone:
            self._gone(key)
            if key not in self.server.sessions:
                m.disconnect(key, time.time())
        m.end_turn()
        self.store.flush_soon()
        self.server.deliver()
