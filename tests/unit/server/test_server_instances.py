"""Two server instances on one PostgreSQL database, in one process: each a ``PgStore``, a
``Mediator`` and an ``InstanceSync`` (overlay/server/pg_sync.py) over a stand-in for the glue that
records what would be delivered to the nodes connected to it.

Covers what the process test (tests/process/test_server_instances_process.py) cannot pin down:
which instance a node is online on when it moves, a departure announced by an instance it has
left, a late instance learning who is online, and an instance vanishing.
"""

from __future__ import annotations

import asyncio
import json
import time

from polling import wait_async

from overlay.control.messages import RequestError, validate_request
from overlay.server.mediator import Mediator
from overlay.server.pg_sync import InstanceSync
from overlay.server.store_pg import PgStore
from tests.unit.control.test_control_mediator import PW, World, fake_hash


def key(label: str) -> bytes:
    return World.key(label)


class Session:
    def __init__(self):
        self.closed_with = None

    def close(self, final=None):
        self.closed_with = final


class Glue:
    """What InstanceSync needs of app.MediationServer, plus the glue's request sequence."""

    def __init__(self, store: PgStore, relay: str | None = None):
        self.store = store
        self.mediator = Mediator(store, identity_bits=0)
        self.sessions: dict[bytes, Session] = {}
        self.delivered: list[tuple[bytes, dict]] = []
        self.sync = InstanceSync(self, store)
        self.mediator.relay_of = self.sync.relay_of      # as app.run_server wires it
        self.relay = relay                                # this instance's relay address (app.relay_address)
        self.rid = 0

    def deliver(self) -> None:
        out = self.mediator.outgoing
        while out:
            k, msg = out.popleft()
            if k in self.sessions:
                self.delivered.append((k, msg))

    def membership_changed(self, t: str) -> None:
        pass

    async def request(self, who: str, t: str, **fields) -> dict:
        k = key(who)
        self.rid += 1
        msg = validate_request({"t": t, "id": self.rid, **fields})
        now = time.time()
        h = fake_hash(msg["password"]) if t == "create" else None
        claim = await self.store.prepare(self.mediator, k, msg, now, h)
        try:
            if t == "hello":
                self.sessions[k] = Session()
                reply = self.mediator.hello(k, msg, now)
            else:
                reply = self.mediator.handle(k, msg, now, password_hash=h, password_ok=True)
        except RequestError:
            await self.store.undo(claim)
            raise
        self.sync.accepted(k, msg, now, reply, h, None, relay=self.relay if t == "hello" else None)
        await self.store.flush()
        self.deliver()
        return reply

    async def leave_node(self, who: str) -> None:
        """The node's connection closed here (app.MediationServer.unregister)."""
        k = key(who)
        self.sessions.pop(k, None)
        if not self.sync.online_elsewhere(k):
            self.mediator.disconnect(k, time.time())
            self.sync.bye(k, time.time())
        await self.store.flush()
        self.deliver()

    def record(self, who: str, network: str = "lan") -> dict:
        net = self.store.network(network)
        return self.mediator._member_record(net, key(who))

    def online(self, who: str, network: str = "lan") -> bool | None:
        """Whether this instance's mediator shows ``who`` online in ``network``."""
        k = key(who)
        net = self.store.network(network)
        return self.mediator._member_record(net, k)["online"] if self.store.is_member(network, k) else None


async def _pair(url: str) -> tuple[Glue, Glue]:
    a = Glue(await PgStore.open(url))
    await a.sync.start()
    b = Glue(await PgStore.open(url))
    await b.sync.start()
    return a, b


async def _close(*glues: Glue) -> None:
    for g in glues:
        await g.sync.close()
        await g.store.aclose()


def test_members_presence_chat_and_a_node_moving_between_instances(pg_url):
    async def main():
        a, b = await _pair(pg_url)
        try:
            await a.request("alice", "hello", name="alice", version=1)
            await a.request("alice", "create", network="lan", password=PW)
            await b.request("bob", "hello", name="bob", version=1)
            await wait_async(lambda: b.store.network("lan"), 5, "B learns of lan")
            await b.request("bob", "join", network="lan", password=PW)
            await wait_async(lambda: a.online("bob"), 5, "A sees bob online")
            assert b.online("alice") is True
            assert a.store.node(key("bob")).vip == b.store.node(key("bob")).vip
            # alice (on A) was told of bob joining on B, as a delta
            assert any(m["t"] == "members" and m["members"][0]["name"] == "bob"
                       for k, m in a.delivered if k == key("alice"))

            await b.request("bob", "chat", network="lan", text="hi")
            await wait_async(lambda: [m for k, m in a.delivered if m["t"] == "chat"], 5, "chat reaches A")
            assert a.store.chat_history("lan") == b.store.chat_history("lan")

            # bob moves to A: B's session is replaced, and B's closing it takes nobody offline
            await a.request("bob", "hello", name="bob", version=1)
            await wait_async(lambda: b.sessions[key("bob")].closed_with, 5, "B closes bob's old session")
            assert b.sessions[key("bob")].closed_with["code"] == "replaced"
            await b.leave_node("bob")
            assert b.online("bob") is True and a.online("bob") is True
            # a late departure announced by B (bob was online there once) changes nothing on A
            b.sync.bye(key("bob"), time.time())
            await b.store.flush()
            await asyncio.sleep(0.2)
            assert a.online("bob") is True
            # bob leaves A for good: offline everywhere
            await a.leave_node("bob")
            await wait_async(lambda: b.online("bob") is False, 5, "B sees bob offline")
        finally:
            await _close(a, b)
    asyncio.run(main())


def test_a_late_instance_learns_who_is_online_and_a_dead_one_is_noticed(pg_url):
    async def main():
        a = Glue(await PgStore.open(pg_url))
        await a.sync.start()
        c = None
        try:
            await a.request("alice", "hello", name="alice", version=1)
            await a.request("alice", "create", network="lan", password=PW)
            await a.request("alice", "endpoints", candidates=[{"addr": "192.0.2.1:4000", "kind": "lan"}])
            b = Glue(await PgStore.open(pg_url))
            await b.sync.start()                              # asks A to announce alice again
            await wait_async(lambda: b.online("alice"), 5, "the late instance sees alice online")
            assert b.mediator.endpoints[key("alice")]["candidates"][0]["addr"] == "192.0.2.1:4000"
            c = Glue(await PgStore.open(pg_url))
            await c.sync.start()
            await c.request("carol", "hello", name="carol", version=1)
            await c.request("carol", "join", network="lan", password=PW)
            await wait_async(lambda: a.online("carol") and b.online("carol"), 5, "carol online everywhere")
            # c vanishes: its listening connection goes; the others take carol offline
            await c.sync.close()
            assert await _liveness_until(a, "carol"), "A never noticed that C is gone"
            assert await _liveness_until(b, "carol"), "B never noticed that C is gone"
            assert a.online("alice") is True and b.online("alice") is True
            await _close(b)
        finally:
            await _close(a)
            if c is not None:
                await c.store.aclose()
    asyncio.run(main())


def test_a_member_record_names_the_relay_of_the_instance_the_member_is_on(pg_url):
    """Each instance's hello announcement carries its relay address; the others hand it to their
    nodes in that member's record (``relay``), and only while the member is on another instance."""
    RA, RB = "198.51.100.1:7777", "198.51.100.2:7777"

    async def main():
        a = Glue(await PgStore.open(pg_url), RA)
        await a.sync.start()
        b = Glue(await PgStore.open(pg_url), RB)
        await b.sync.start()
        c = None
        try:
            await a.request("alice", "hello", name="alice", version=1)
            await a.request("alice", "create", network="lan", password=PW)
            await b.request("bob", "hello", name="bob", version=1)
            await wait_async(lambda: b.store.network("lan"), 5, "B learns of lan")
            await b.request("bob", "join", network="lan", password=PW)
            await wait_async(lambda: a.online("bob"), 5, "A sees bob online")
            assert a.record("bob").get("relay") == RB and "relay" not in a.record("alice")
            assert b.record("alice").get("relay") == RA and "relay" not in b.record("bob")
            told = [m for k, e in a.delivered if k == key("alice") and e["t"] == "members"
                    for m in e["members"] if m["name"] == "bob"]
            assert told and told[-1].get("relay") == RB, told
            # a late instance learns it from the announcements made again for it
            c = Glue(await PgStore.open(pg_url), "198.51.100.3:7777")
            await c.sync.start()
            await wait_async(lambda: c.online("alice") and c.online("bob"), 5, "C sees both online")
            assert c.record("alice").get("relay") == RA and c.record("bob").get("relay") == RB
            # bob moves to A: A now carries him itself, B names A's relay
            await a.request("bob", "hello", name="bob", version=1)
            await wait_async(lambda: b.record("bob").get("relay") == RA, 5, "B names A's relay for bob")
            assert "relay" not in a.record("bob")
            await b.leave_node("bob")
            # bob leaves for good: offline, no relay anywhere
            await a.leave_node("bob")
            await wait_async(lambda: b.online("bob") is False, 5, "B sees bob offline")
            assert "relay" not in b.record("bob") and b.sync.relay_of(key("bob")) is None
        finally:
            await _close(a, b)
            if c is not None:
                await _close(c)
    asyncio.run(main())


async def _liveness_until(g: Glue, who: str) -> bool:
    """Run the glue's liveness check (the reaper's job) until ``who`` is offline there."""
    for _ in range(100):
        g.sync._last_liveness = 0.0
        await g.sync.check_liveness()
        if g.online(who) is False:
            return True
        await asyncio.sleep(0.05)
    return False


# ============================================================================ the glue, awaiting the database


class FakeConn:
    """What MediationServer.dispatch needs of a control connection."""

    def __init__(self, label: str):
        self.key = key(label)
        self.registered = False
        self.source = "127.0.0.1"
        self.peer = label
        self.transport = None
        self.sent: list[dict] = []

    def send(self, msg: dict) -> None:
        self.sent.append(msg)

    def send_encoded(self, data: bytes) -> None:   # events batched per loop turn (server/fanout.py)
        self.sent.append(json.loads(data))

    def flush(self) -> None:
        pass

    def close(self, final=None) -> None:
        pass


def test_events_during_a_hello_being_stored_reach_the_node_after_its_snapshot(tmp_path, pg_url):
    """While a hello's writes are being flushed (the glue yields), another member goes offline:
    the event waits for the new session instead of being dropped."""
    from overlay.server.app import MediationServer

    async def main():
        store = await PgStore.open(pg_url)
        server = MediationServer(tmp_path, "127.0.0.1", 0, identity_bits=0, store=store)
        conns = {n: FakeConn(n) for n in ("alice", "carol")}
        rid = iter(range(1, 100))

        async def req(n, t, **f):
            r = await server.dispatch(conns[n], validate_request({"t": t, "id": next(rid), **f}))
            server.deliver()
            await asyncio.sleep(0)   # delivered at the loop turn's end
            return r
        try:
            for n in ("alice", "carol"):
                await req(n, "hello", name=n, version=1)
            await req("alice", "create", network="lan", password=PW)
            await req("carol", "join", network="lan", password=PW)
            server.unregister(conns["alice"])           # alice's connection drops; she comes back
            conns["alice"] = FakeConn("alice")
            gate, flushing = asyncio.Event(), asyncio.Event()
            real_flush = store.flush

            async def slow_flush():
                flushing.set()
                await gate.wait()
                await real_flush()
            store.flush = slow_flush
            hello = asyncio.create_task(req("alice", "hello", name="alice", version=1))
            await flushing.wait()
            store.flush = real_flush
            server.unregister(conns["carol"])          # carol leaves while alice's hello is stored
            gate.set()
            await hello
            server.deliver()
            await asyncio.sleep(0)
            carol = [m for e in conns["alice"].sent if e["t"] == "members" for m in e["members"]
                     if m["name"] == "carol"]
            assert carol and carol[0]["online"] is True and carol[-1]["online"] is False, carol
        finally:
            await server.close()
    asyncio.run(main())
