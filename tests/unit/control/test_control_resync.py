"""Resynchronisation (overlay/control/resync.py) and presence storms (overlay/server/presence.py).

A returning node's hello names, per network, the digest of the member records it holds; where the
server's matches, it sends no records but one ``presence`` event. These tests run the mediator
(``World`` from test_control_mediator, SQLite and PostgreSQL) with each node's ``NodeState`` fed
the events the mediator queues for it, and compare what a node holds after a reconnection with a
full snapshot of the same moment.
"""

from __future__ import annotations

import asyncio

import pytest

from overlay import crypto
from overlay.control import messages, resync
from overlay.control.messages import RequestError, key_to_text, validate_request
from overlay.node.state import NodeState
from overlay.server import presence as presence_mod
from overlay.server.mediator import NODE_TTL
from tests.unit.control import test_control_mediator as mediator_tests
from tests.unit.control.test_control_mediator import PW, World

db, w = mediator_tests.db, mediator_tests.w     # the mediator's fixtures: SQLite and PostgreSQL




class Nodes:
    """Each node's view, fed the events the mediator queued for it."""

    def __init__(self, w: World):
        self.w = w
        self.state: dict[str, NodeState] = {}
        self.got: dict[str, list[dict]] = {}

    def of(self, who: str) -> NodeState:
        st = self.state.get(who)
        if st is None:
            st = self.state[who] = NodeState()
            st.me = {"key": key_to_text(self.w.key(who))}
        return st

    def feed(self) -> None:
        for k, evs in self.w.events().items():
            who = next((n for n in self.state if self.w.key(n) == k), None)
            if who is None:
                continue
            self.got.setdefault(who, []).extend(evs)
            for ev in evs:
                self.of(who).apply(ev)

    def take(self, who: str) -> list[dict]:
        self.feed()
        return self.got.pop(who, [])

    def hello(self, who: str, sync: bool = True) -> list[dict]:
        """``who`` (re)connects as the daemon does: a resync around the hello's snapshots."""
        st = self.of(who)
        self.feed()
        self.got.pop(who, None)
        st.begin_resync()
        extra = {"sync": st.sync_digests()} if sync else {}
        self.w.hello(who, **extra)
        evs = self.take(who)
        st.end_resync()
        return evs


def view(st: NodeState, network: str) -> list[tuple]:
    """What a node holds of a network's members (everything a record says)."""
    v = st.networks[network]
    return sorted((m.key, m.name, m.ip, m.online, m.role, m.iface, m.kind, tuple(sorted(m.routes)),
                   tuple(sorted(m.withdrawn)), m.caps) for m in v.members.values())


def truth(w: World, who: str, network: str) -> list[tuple]:
    """What a full snapshot says right now (a fresh view from the ``members`` request)."""
    st = NodeState()
    w.events()
    w.req(who, "members", network=network)
    for ev in w.ev(who):
        st.apply(ev)
    return view(st, network)


@pytest.fixture
def nodes(w):
    return Nodes(w)


def _lan(w: World, nodes: Nodes, *names: str, network: str = "lan") -> None:
    for n in names:
        nodes.of(n)
        w.hello(n, sync={})
    w.req(names[0], "create", network=network, password=PW)
    for n in names[1:]:
        w.req(n, "join", network=network, password=PW)
    nodes.feed()


# ---------------------------------------------------------------------------- the hello

def test_digest_match_sends_no_records_only_presence(w, nodes):
    _lan(w, nodes, "ann", "bob", "cat", "dan")
    w.disconnect("cat")
    w.disconnect("bob")
    evs = nodes.hello("bob")
    assert [e["t"] for e in evs] == ["network", "presence"]       # no member records
    p = evs[1]
    assert p["count"] == 4 and p["digest"] == nodes.of("bob").networks["lan"].digest()[0]
    assert w.m.synced == 1
    assert view(nodes.of("bob"), "lan") == truth(w, "bob", "lan")
    online = {m.name: m.online for m in nodes.of("bob").networks["lan"].members.values()}
    assert online == {"ann": True, "bob": True, "cat": False, "dan": True}


def test_returning_nodes_of_a_storm_read_no_member_lists(w, nodes, monkeypatch):
    """Once a network's digest is known, a matching hello reads nothing of its members from the
    store (a restart: every node of a big network comes back with the same digest)."""
    monkeypatch.setattr(presence_mod, "COALESCE_ABOVE", 2)    # a big network in a storm: changes held
    monkeypatch.setattr(presence_mod, "BURST", 0)
    _lan(w, nodes, "ann", "bob", "cat", "dan")
    w.disconnect("bob")
    nodes.hello("bob")                       # computes the digest
    for n in ("cat", "dan"):
        w.disconnect(n)
    reads: list[str] = []
    for name in ("members", "nodes", "routes", "member_count"):
        real = getattr(w.store, name)
        monkeypatch.setattr(w.store, name, lambda *a, real=real, name=name: reads.append(name) or real(*a))
    for n in ("cat", "dan"):
        assert [e["t"] for e in nodes.hello(n)] == ["network", "presence"]
    assert reads == [] and w.m.synced == 3
    monkeypatch.undo()
    w.m.flush_presence(w.now + 10)
    nodes.feed()
    for n in ("ann", "bob", "cat", "dan"):
        assert view(nodes.of(n), "lan") == truth(w, n, "lan"), n


def test_digest_mismatch_gets_the_full_snapshot(w, nodes):
    _lan(w, nodes, "ann", "bob", "cat")
    w.disconnect("bob")
    w.events()
    w.hello("bob", sync={"lan": "AAAAAAAAAAAAAAAAAAAAAA=="})
    evs = w.ev("bob")
    assert [e["t"] for e in evs] == ["network", "members"]
    assert len(evs[1]["members"]) == 3 and w.m.synced == 0


def test_a_node_without_sync_gets_the_full_snapshot_and_record_deltas(w, nodes):
    _lan(w, nodes, "ann", "bob", "cat")
    w.disconnect("bob")
    w.events()
    w.hello("bob")                              # a node from before resynchronisation
    assert [e["t"] for e in w.ev("bob")] == ["network", "members"]
    assert w.key("bob") not in w.m.resync_ok and w.key("ann") in w.m.resync_ok


@pytest.mark.parametrize("change", ["join", "leave", "rename", "vip", "route"])
def test_a_change_while_away_is_seen_after_the_reconnection(w, nodes, change):
    _lan(w, nodes, "ann", "bob", "cat")
    before = nodes.of("bob").networks["lan"].digest()[0]
    w.disconnect("bob")
    if change == "join":
        w.hello("eve", sync={})
        w.req("eve", "join", network="lan", password=PW)
    elif change == "leave":
        w.req("cat", "leave", network="lan")
    elif change == "rename":
        w.req("cat", "rename", name="kit")
    elif change == "vip":       # cat leaves, is forgotten, joins again: another virtual IP
        old_ip = w.store.node(w.key("cat")).vip
        w.req("cat", "leave", network="lan")
        w.disconnect("cat")
        w.now += NODE_TTL + 1
        w.m.expire(w.now)
        w.run(w.store.flush())
        w.hello("cat", sync={})
        w.req("cat", "join", network="lan", password=PW)
        assert w.store.node(w.key("cat")).vip != old_ip
    elif change == "route":     # an approved gateway route (not presence: in the digest)
        w.hello("cat", routes=["192.168.7.0/24"], sync={})
        w.admin("ann", "lan", "route-approve", target="cat", prefix="192.168.7.0/24")
    w.events()
    evs = nodes.hello("bob")
    assert "members" in [e["t"] for e in evs]   # the full snapshot: the digests differ
    assert nodes.of("bob").networks["lan"].digest()[0] != before
    assert view(nodes.of("bob"), "lan") == truth(w, "bob", "lan")
    # and the next reconnection without a change needs no records again
    w.disconnect("bob")
    assert [e["t"] for e in nodes.hello("bob") if e["t"] != "members" or
            not all(m.get("routes") or m.get("withdrawn") for m in e["members"])] == ["network", "presence"]
    assert view(nodes.of("bob"), "lan") == truth(w, "bob", "lan")


def test_presence_sync_carries_interfaces_capabilities_and_routes(w, nodes):
    _lan(w, nodes, "ann", "bob", "cat", "dan")
    w.hello("cat", iface="tun", caps=["no-inner-csum"], routes=["10.9.0.0/16"], sync={})
    w.admin("ann", "lan", "route-approve", target="cat", prefix="10.9.0.0/16")
    w.hello("dan", caps=["no-inner-csum"], sync={})
    w.hello("cat", iface="tun", caps=["no-inner-csum"], sync={})    # no longer advertises its route
    nodes.feed()
    w.disconnect("bob")
    evs = nodes.hello("bob")
    assert [e["t"] for e in evs] == ["network", "presence", "members"]   # cat's record: its routes
    assert [m["name"] for m in evs[2]["members"]] == ["cat"]
    assert view(nodes.of("bob"), "lan") == truth(w, "bob", "lan")
    cat = next(m for m in nodes.of("bob").networks["lan"].members.values() if m.name == "cat")
    assert (cat.iface, cat.caps, cat.withdrawn) == ("tun", ("no-inner-csum",), ("10.9.0.0/16",))


def test_other_network_types_get_the_full_snapshot(w, nodes):
    _lan(w, nodes, "ann", "bob", "cat")
    w.admin("ann", "lan", "type", target="hub-and-spoke")
    nodes.feed()
    w.disconnect("ann")
    assert "members" in [e["t"] for e in nodes.hello("ann")]
    assert view(nodes.of("ann"), "lan") == truth(w, "ann", "lan")


def test_node_keeps_its_peers_across_a_resync_by_presence():
    """The daemon's view through a reconnection answered with a presence event: no peer is
    dropped and added again (their WireGuard tunnels stay), presence is updated."""
    w = World()
    try:
        nodes = Nodes(w)
        _lan(w, nodes, "ann", "bob", "cat")
        st = nodes.of("bob")
        before = st.peers()
        w.disconnect("bob")
        w.disconnect("cat")
        seen = []
        st.begin_resync()
        w.hello("bob", sync=st.sync_digests())
        for ev in w.ev("bob"):
            st.apply(ev)
            seen.append(set(st.peers()))
        assert all(s == set(before) for s in seen)
        assert st.end_resync() is False
        assert set(st.peers()) == set(before)
        assert {p.name: p.online for p in st.peers().values()} == {"ann": True, "cat": False}
    finally:
        w.close()


def test_a_presence_event_over_other_members_asks_for_the_snapshot():
    st = NodeState()
    st.apply({"t": "network", "network": {"name": "n", "type": "mesh"}})
    st.apply({"t": "members", "network": "n", "members": [
        {"name": "a", "key": "QQ==", "ip": "100.64.0.1", "online": True, "role": "owner"}]})
    st.apply({"t": "presence", "network": "n", "digest": "other", "count": 1, "online": "AA==", "groups": []})
    assert st.needs_snapshot == {"n"}
    assert st.networks["n"].members["QQ=="].online is True         # nothing applied
    st.needs_snapshot.clear()
    digest = st.networks["n"].digest()[0]
    st.apply({"t": "presence", "network": "n", "digest": digest, "count": 1, "online": "AA==", "groups": []})
    assert st.networks["n"].members["QQ=="].online is False and not st.needs_snapshot
    st.apply({"t": "presence", "network": "n", "digest": digest, "count": 1, "online": "AAAA", "groups": []})
    assert st.needs_snapshot == {"n"}                               # a bitmap of another size


def test_hello_sync_is_validated():
    ok = {"t": "hello", "id": 1, "name": "a", "version": 1, "sync": {"lan": "x" * 24}}
    assert validate_request(ok) is ok
    for bad in ({"lan": 1}, {"x" * 65: "d"}, {f"n{i}": "d" for i in range(resync.MAX_SYNC_NETWORKS + 1)},
                {"lan": "d" * 65}, ["lan"]):
        with pytest.raises(RequestError):
            validate_request({**ok, "sync": bad})


def test_a_hello_never_names_more_networks_than_the_server_accepts():
    st = NodeState()
    for i in range(resync.MAX_SYNC_NETWORKS + 5):
        st.apply({"t": "members", "network": f"n{i}", "members": [
            {"name": "a", "key": "QQ==", "ip": "100.64.0.1", "online": True, "role": "owner"}]})
    sync = st.sync_digests()
    assert len(sync) == resync.MAX_SYNC_NETWORKS
    validate_request({"t": "hello", "id": 1, "name": "a", "version": 1, "sync": sync})


def test_bitmaps_round_trip():
    for n in (0, 1, 7, 8, 9, 1000):
        flags = [i % 3 == 0 for i in range(n)]
        assert resync.decode_bits(resync.encode_bits(flags), n) == flags
    assert resync.decode_bits(resync.encode_bits([True] * 9), 8) is None
    assert resync.decode_bits("not base64!", 8) is None


# ---------------------------------------------------------------------------- presence storms

@pytest.fixture
def small_storms(monkeypatch):
    """Networks above 3 members coalesce, after 2 changes at once."""
    monkeypatch.setattr(presence_mod, "COALESCE_ABOVE", 3)
    monkeypatch.setattr(presence_mod, "BURST", 2)


def test_quiet_presence_changes_go_out_at_once(w, nodes, small_storms):
    _lan(w, nodes, "ann", "bob", "cat", "dan", "eve")
    w.now += 100
    w.req("bob", "presence", network="lan", online=False)
    got = w.ev("ann", "members")
    assert [[(m["name"], m["online"]) for m in e["members"]] for e in got] == [[("bob", False)]]
    assert w.m.presence.due() is None


def test_a_storm_is_coalesced_and_every_final_state_arrives(w, nodes, small_storms):
    names = ["ann", "bob", "cat", "dan", "eve", "fay", "gus", "hal"]
    _lan(w, nodes, *names)
    w.disconnect("hal")
    nodes.hello("hal", sync=False)          # a node from before resynchronisation: records
    w.now += 100
    nodes.feed()
    nodes.got.clear()
    for n in ("bob", "cat", "dan", "eve", "fay"):     # everyone but ann and hal flaps
        w.disconnect(n)
    for n in ("cat", "eve"):
        nodes.hello(n)
    nodes.feed()
    due = w.m.presence.due()
    assert due is not None and due <= w.now + presence_mod.window_for(8)
    held = {n: len(nodes.got.pop(n, [])) for n in ("ann", "hal")}
    assert held == {"ann": 2, "hal": 2}      # the first two changes went out at once, the rest wait
    w.req("cat", "presence", network="lan", online=False)    # a node's own request: never held
    nodes.feed()
    assert [[(m["name"], m["online"]) for m in e["members"]] for e in nodes.got.pop("ann")] == [[("cat", False)]]
    nodes.got.pop("hal")
    w.m.flush_presence(due - 0.01)
    assert w.m.outgoing == deque_empty()
    w.m.flush_presence(due)
    nodes.feed()
    ann, hal = nodes.got.pop("ann"), nodes.got.pop("hal")
    assert [e["t"] for e in ann] == ["presence"]            # one event for the whole window
    assert [e["t"] for e in hal] == ["members"]             # an old node: the changed records
    for who in ("ann", "hal", "cat", "eve"):                # last state wins for everyone
        assert view(nodes.of(who), "lan") == truth(w, who, "lan"), who
    online = {m.name: m.online for m in nodes.of("ann").networks["lan"].members.values()}
    assert online == {"ann": True, "bob": False, "cat": False, "dan": False, "eve": True, "fay": False,
                      "gus": True, "hal": True}
    assert w.m.presence.due() is None


def deque_empty():
    from collections import deque
    return deque()


def test_after_a_storm_quiet_time_changes_go_out_at_once_again():
    c = presence_mod.PresenceCoalescer()
    now = 1000.0
    sent = [c.change("big", bytes([i]), 500, now + i * 0.01) for i in range(100)]   # a storm
    assert sent[:presence_mod.BURST] == [True] * presence_mod.BURST and not any(sent[presence_mod.BURST:])
    due = c.due()
    assert due is not None and due <= now + 1 + presence_mod.window_for(500)
    assert [n for n, _keys in c.take_due(due)] == ["big"]
    later = now + 1 + presence_mod.BURST / presence_mod.RATE      # the bucket refilled
    assert all(c.change("big", bytes([i]), 500, later + i * 0.001) for i in range(presence_mod.BURST))
    assert c.change("small", b"x", presence_mod.COALESCE_ABOVE, later) is True     # small networks: always


def test_a_flush_sees_departures_and_deleted_networks(w, nodes, small_storms):
    _lan(w, nodes, "ann", "bob", "cat", "dan", "eve")
    w.now += 100
    for n in ("bob", "cat", "dan"):
        w.disconnect(n)
    w.req("eve", "leave", network="lan")       # held change of a member who then left
    w.hello("eve", sync={})
    nodes.feed()
    w.m.flush_presence(w.now + 1)
    nodes.feed()
    assert view(nodes.of("ann"), "lan") == truth(w, "ann", "lan")
    for n in ("bob", "cat"):
        w.hello(n, sync={})
    w.admin("ann", "lan", "delete")
    w.events()
    w.m.flush_presence(w.now + 2)
    assert not w.m.outgoing


# ---------------------------------------------------------------------------- a new node, an old server

def test_hello_falls_back_without_sync_for_a_server_that_refuses_it(tmp_path, monkeypatch):
    from overlay.control.channel import Channel, Message
    from overlay.node.control_client import ControlClient
    from overlay.node.home import Home
    from polling import wait_async
    from tests.unit.control.test_control_reconnect import ScriptedServer

    old_hello = {k: v for k, v in messages.REQUEST_SCHEMA["hello"].items() if k not in ("caps", "sync")}
    monkeypatch.setitem(messages.REQUEST_SCHEMA, "hello", old_hello)

    class OldServer(ScriptedServer):
        def __init__(self):
            super().__init__()
            self.hellos: list[dict] = []

        async def _conn(self, reader, writer):
            ch = Channel(initiator=False, static_private=self.key)
            try:
                while data := await reader.read(65536):
                    ch.receive_data(data)
                    while (ev := ch.next_event()) is not None:
                        if isinstance(ev, Message):
                            self.hellos.append(ev.body)
                            try:
                                validate_request(ev.body)
                                reply = {"t": "ok", "id": ev.body["id"]}
                                if ev.body["t"] == "hello":
                                    reply.update(name=ev.body["name"], ip=None)
                                ch.send(reply)
                            except RequestError as e:
                                ch.send({"t": "error", "id": ev.body["id"], "code": e.code, "message": e.message})
                    writer.write(ch.data_to_send())
            finally:
                writer.close()

    async def main():
        srv = OldServer()
        port = await srv.start()
        client = ControlClient(Home(tmp_path / "home"), f"127.0.0.1:{port}", "n1", crypto.generate_private_key())
        client.hello_extra["caps"] = ["no-inner-csum"]
        client.hello_sync = lambda: {"lan": "d" * 24}
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            await wait_async(lambda: client.connected, 10.0, "the node connected to the old server",
                             on_fail=lambda: f"{client.state}: {client.last_error}")
            hellos = [h for h in srv.hellos if h["t"] == "hello"]
            assert [(h.get("caps"), h.get("sync")) for h in hellos] == [
                (["no-inner-csum"], {"lan": "d" * 24}), (None, None)]
        finally:
            task.cancel()
            srv.close()
    asyncio.run(main())
