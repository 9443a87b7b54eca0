"""Identities cost the server nothing until they join a network (issue 9.2)."""

from __future__ import annotations

import ipaddress
import sqlite3

import pytest

from cluster import Cluster
from test_control_mediator import PW, World
from overlay.server.mediator import NEW_NODES_PER_ADDRESS, NEW_NODES_WINDOW, NODE_TTL
from overlay.server.vips import VipAllocator


@pytest.fixture
def w():
    world = World()
    yield world
    world.store.close()


def hello_from(w: World, who: str, source: str) -> dict:
    from overlay.control.messages import validate_request
    msg = validate_request({"t": "hello", "id": w._id(), "name": who, "version": 1})
    try:
        return w.m.hello(w.key(who), msg, w.now, source=source)
    finally:
        w._collect()


def test_hello_alone_stores_nothing(w):
    for i in range(5000):
        assert w.hello(f"n{i}")["ip"] is None
    assert w.store.node_count() == 0
    for i in range(5000):
        w.disconnect(f"n{i}")
    assert w.store.node_count() == 0 and not w.m._guests and not w.m.online
    # the first network gives the address, once, and it is kept
    w.hello("alice")
    w.req("alice", "create", network="lan", password=PW)
    ip = w.ev("alice", "address")[0]["ip"]
    assert w.store.node_count() == 1 and w.store.node(w.key("alice")).vip == ip
    w.disconnect("alice")
    assert w.hello("alice")["ip"] == ip and w.ev("alice", "address") == []
    # a failed join (wrong password, unknown network) stores nothing either
    w.hello("bob")
    assert w.fails("bob", "join", network="lan", password="wrong").code == "wrong_password"
    assert w.fails("bob", "join", network="nosuch", password=PW).code == "unknown_network"
    assert w.store.node(w.key("bob")) is None


def test_vip_allocation_is_amortised_constant():
    pool = ipaddress.IPv4Network("10.0.0.0/16")
    used = {str(pool.network_address + i) for i in range(1, 20_001)}
    a = VipAllocator(pool, used)          # a server restarting with 20,000 nodes
    assert a.allocate() == str(pool.network_address + 20_001) and a.probes == 1
    for _ in range(10_000):
        a.allocate()
    assert a.probes == 10_001             # one address looked at per allocation
    # released addresses come back only after a lap of the pool, and the lap is paid once
    tail = pool.num_addresses - 2 - len(a)          # free addresses after the cursor
    a.release(str(pool.network_address + 5))
    for _ in range(tail):
        a.allocate()
    assert a.allocate() == str(pool.network_address + 5)
    assert a.probes <= 10_001 + 2 * (pool.num_addresses - 2)


def test_mediator_allocates_without_reading_every_address(w, monkeypatch):
    calls = []
    real = w.store.used_vips
    monkeypatch.setattr(w.store, "used_vips", lambda: calls.append(1) or real())
    w.hello("n0")
    w.req("n0", "create", network="lan", password=PW)
    for i in range(1, 50):
        w.hello(f"n{i}")
        w.req(f"n{i}", "join", network="lan", password=PW)
    assert calls == [] and w.m.vips.probes == 50


def test_new_identities_are_limited_per_address(w):
    src = "203.0.113.5"
    hello_from(w, "owner", "198.51.100.1")
    w.req("owner", "create", network="lan", password=PW)
    w.req("owner", "create", network="other", password=PW)
    for i in range(NEW_NODES_PER_ADDRESS):
        hello_from(w, f"n{i}", src)
        w.req(f"n{i}", "join", network="lan", password=PW)
    hello_from(w, "extra", src)
    e = w.fails("extra", "join", network="lan", password=PW)
    assert e.code == "rate_limited" and "new nodes from your address" in e.args[0]
    assert w.fails("extra", "create", network="mine", password=PW).code == "rate_limited"
    assert w.store.node(w.key("extra")) is None
    # nodes already stored are not new: they still join; other addresses are unaffected
    w.req("n0", "join", network="other", password=PW)
    hello_from(w, "elsewhere", "203.0.113.6")
    w.req("elsewhere", "join", network="lan", password=PW)
    w.now += NEW_NODES_WINDOW
    w.req("extra", "join", network="lan", password=PW)


def test_expiry_policy(w):
    day = 86400.0
    _ = [w.hello(n) for n in ("owner", "member", "leaver", "banned", "online", "recent", "asker")]
    w.req("owner", "create", network="lan", password=PW)
    w.req("owner", "create", network="gated", password=PW, approval=True)
    for n in ("member", "leaver", "banned", "online", "recent"):
        w.req(n, "join", network="lan", password=PW)
    w.req("asker", "join", network="gated", password=PW)       # pending, never approved
    for n in ("leaver", "online", "recent"):
        w.req(n, "leave", network="lan")
    w.admin("owner", "lan", "ban", target="banned")
    vips = {n: w.store.node(w.key(n)).vip for n in ("leaver", "asker", "recent")}
    for n in ("owner", "member", "leaver", "banned", "asker"):
        w.disconnect(n)
    w.now += NODE_TTL - 10 * day
    w.disconnect("recent")                  # seen 10 days before the cut-off
    w.now += 10 * day + 1
    gone = w.m.expire(w.now)
    assert sorted(gone) == sorted([w.key("leaver"), w.key("asker")])
    for n in ("owner", "member", "banned", "online", "recent"):
        assert w.store.node(w.key(n)) is not None, n
    assert w.store.node(w.key("leaver")) is None and w.store.pending("gated") == []
    assert w.m.expire(w.now + 60) == []                      # hourly at most
    assert w.m.expire(w.now + NODE_TTL) == [w.key("recent")]          # its own 30 days later
    assert {vips["leaver"], vips["asker"], vips["recent"]}.isdisjoint(
        {f"{a}" for a in map(ipaddress.IPv4Address, w.m.vips._used)})


def test_real_node_gets_its_address_on_its_first_network(tmp_path):
    with Cluster(tmp_path) as c:
        c.start_server()
        a = c.start_node("alice")
        b = c.start_node("bob")
        assert a.status()["node"]["virtual_ip"] is None
        assert " -  server" in a.ok("status")
        db = sqlite3.connect(tmp_path / "server" / "overlay.db")
        assert db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] == 0
        a.ok("create", "lan", "--password", "pw")
        b.ok("join", "lan", "--password", "pw")
        c.wait(lambda: a.status()["node"]["virtual_ip"] and b.status()["node"]["virtual_ip"],
               what="addresses after joining")
        assert db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] == 2
        assert "pong from bob" in a.ok("ping", "bob", "-c", "3")     # the stack answers on the new address
        db.close()
