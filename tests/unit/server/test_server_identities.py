"""Identities cost the server nothing until they join a network (issue 9.2), and a new one costs
its maker a proof of work, not the crowd behind its address (issue 21)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from tests.unit.control.test_control_mediator import PW, World
from tests.unit.control.test_control_mediator import db  # noqa: F401  (the fixture: SQLite, PostgreSQL)
from overlay import crypto
from overlay.control import identity_proof, passwords
from overlay.control.messages import RequestError
from overlay.control.rawclient import RawClient
from overlay.server.app import MediationServer
from overlay.server.mediator import (
    DEFAULT_IDENTITY_BITS, DEFAULT_NEW_NODES_PER_HOUR, FAILED_JOINS_PER_NODE, NEW_NODES_WINDOW, NODE_TTL,
)
from overlay.server.vips import VipAllocator


@pytest.fixture
def w(db):  # noqa: F811
    world = World(db)
    yield world
    world.close()


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


def test_new_identities_are_limited_per_address():
    w = World(new_nodes_per_hour=20)
    src = "203.0.113.5"
    hello_from(w, "owner", "198.51.100.1")
    w.req("owner", "create", network="lan", password=PW)
    w.req("owner", "create", network="other", password=PW)
    for i in range(20):
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
    w.store.close()


def _proved(w: World, who: str) -> str:
    return identity_proof.solve(w.key(who), w.m.identity_bits)


@pytest.mark.slow
def test_a_crowd_behind_one_address_joins_with_the_defaults():
    """40 nodes behind one NAT join one network within a minute: a LAN party, a class, an office."""
    w = World(identity_bits=1)          # the default per-address bound; proofs made cheap here
    assert w.m.new_nodes_per_hour == DEFAULT_NEW_NODES_PER_HOUR
    hello_from(w, "host", "198.51.100.1")
    w.req("host", "create", network="party", password=PW, proof=_proved(w, "host"))
    for i in range(40):
        hello_from(w, f"guest{i}", "198.51.100.1")
        w.now += 1.0
        r = w.req(f"guest{i}", "join", network="party", password=PW, proof=_proved(w, f"guest{i}"))
        assert r["status"] == "joined"
    assert len(w.members("party")) == 41 and w.store.node_count() == 41
    w.store.close()


def test_a_new_node_proves_work_on_its_key(db):  # noqa: F811
    w = World(db, identity_bits=3)
    hello_from(w, "owner", "198.51.100.1")
    w.req("owner", "create", network="lan", password=PW, proof=_proved(w, "owner"))
    assert hello_from(w, "old", "203.0.113.5")["identity_work"] == 3
    e = w.fails("old", "join", network="lan", password=PW)            # a node from before proofs
    assert e.code == "identity_proof" and "sent none: upgrade overlay" in e.message
    assert w.fails("old", "create", network="mine", password=PW).code == "identity_proof"
    # a proof is bound to its key: another node's does not check
    stolen = next(p for p in (_proved(w, "owner") for _ in range(50))
                  if not identity_proof.check(w.key("old"), p, 3))
    e = w.fails("old", "join", network="lan", password=PW, proof=stolen)
    assert e.code == "identity_proof" and "does not check" in e.message
    for junk in ("", "zz" * 8, "00" * 9, "0" * 64):
        assert not identity_proof.check(w.key("old"), junk, 1)
    assert w.store.node(w.key("old")) is None
    w.req("old", "join", network="lan", password=PW, proof=_proved(w, "old"))
    assert w.store.node(w.key("old")) is not None
    # stored nodes never prove again; the proof is asked of new nodes only
    w.disconnect("old")
    assert hello_from(w, "old", "203.0.113.5")["identity_work"] == 0
    w.req("old", "leave", network="lan")
    w.req("old", "join", network="lan", password=PW)
    # bad proofs count as failures: a key (and an address) sending them is refused before checking
    hello_from(w, "forger", "203.0.113.9")
    for _ in range(FAILED_JOINS_PER_NODE):
        assert w.fails("forger", "join", network="lan", password=PW, proof="0" * 16).code == "identity_proof"
    assert w.fails("forger", "join", network="lan", password=PW, proof="0" * 16).code == "rate_limited"
    w.close()


@pytest.mark.slow
def test_a_flood_of_fresh_identities_stays_bounded():
    """Without proofs nothing is stored; with proofs (each costing its maker) at most the
    per-address bound an hour; the server's memory holds only the online guests."""
    w = World(identity_bits=1, new_nodes_per_hour=30)
    src = "203.0.113.5"
    for i in range(500):
        hello_from(w, f"f{i}", src)
        assert w.fails(f"f{i}", "create", network=f"n{i}", password=PW).code == "identity_proof"
        w.disconnect(f"f{i}")
    assert w.store.node_count() == 0 and not w.m._guests and not w.m._proven and not w.m.online
    codes = []
    for i in range(40):
        hello_from(w, f"p{i}", src)
        try:
            w.req(f"p{i}", "create", network=f"p{i}", password=PW, proof=_proved(w, f"p{i}"))
            codes.append("ok")
        except RequestError as e:
            codes.append(e.code)
        w.disconnect(f"p{i}")
    assert codes == ["ok"] * 30 + ["rate_limited"] * 10
    assert w.store.node_count() == 30 and not w.m._guests and not w.m._proven
    assert len(w.m._new_per_source[src].times) == 30
    w.store.close()


@pytest.fixture
def cheap_argon2(monkeypatch):
    from nacl import pwhash
    monkeypatch.setattr(passwords, "OPSLIMIT", pwhash.argon2id.OPSLIMIT_MIN)
    monkeypatch.setattr(passwords, "MEMLIMIT", pwhash.argon2id.MEMLIMIT_MIN)


@pytest.mark.slow
def test_forty_nodes_behind_one_address_join_a_real_server(tmp_path, cheap_argon2):
    """40 raw control clients from 127.0.0.1 with the server's default per-address bound, each
    proving work on its key (1 bit here, to keep the test light: the cost is in
    benchmarks/bench_identity.py), join one network; an old client without a proof gets a clear
    error; stored state: the 41 nodes."""
    async def main():
        server = MediationServer(tmp_path / "srv", "127.0.0.1", 0, identity_bits=1)
        await server.start()
        try:
            host = await RawClient("host", crypto.generate_private_key()).connect("127.0.0.1", server.port)
            assert host.hello["identity_work"] == 1
            assert (await host.request({"t": "create", "network": "party", "password": PW}))["t"] == "ok"
            guests = [RawClient(f"guest{i}", crypto.generate_private_key()) for i in range(40)]
            await asyncio.gather(*(g.connect("127.0.0.1", server.port) for g in guests))
            replies = await asyncio.gather(*(g.request({"t": "join", "network": "party", "password": PW},
                                                      timeout=60) for g in guests))
            assert [r.get("status") for r in replies] == ["joined"] * 40, [r for r in replies if r["t"] != "ok"]
            assert server.store.member_count("party") == 41 and server.store.node_count() == 41
            old = await RawClient("old", crypto.generate_private_key()).connect("127.0.0.1", server.port)
            old.hello["identity_work"] = 0           # speaks like a node from before proofs
            r = await old.request({"t": "join", "network": "party", "password": PW})
            assert r["code"] == "identity_proof" and "upgrade overlay" in r["message"], r
            for c in (host, old, *guests):
                c.close()
        finally:
            await server.close()
    asyncio.run(asyncio.wait_for(main(), 120))


def test_identity_proof_is_cached_and_bound_to_the_key(tmp_path):
    key = crypto.public_key(crypto.generate_private_key())
    path = tmp_path / identity_proof.FILE
    p = identity_proof.load_or_solve(path, key, 2)
    assert identity_proof.check(key, p, 2) and path.read_text().strip() == p
    assert path.stat().st_mode & 0o777 == 0o600
    assert identity_proof.load_or_solve(path, key, 2) == p                     # cached
    other = crypto.public_key(crypto.generate_private_key())
    q = identity_proof.load_or_solve(path, other, 2)                            # another key: solved anew
    assert identity_proof.check(other, q, 2) and path.read_text().strip() == q
    assert DEFAULT_IDENTITY_BITS >= 1


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
    w.run(w.store.flush())                                   # the database forgot them too
    assert w.count("nodes") == w.store.node_count() == 4 and w.count("pending") == 0
    assert {vips["leaver"], vips["asker"], vips["recent"]}.isdisjoint(
        {f"{a}" for a in map(ipaddress.IPv4Address, w.m.vips._used)})
