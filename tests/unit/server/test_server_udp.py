"""The mediation server's UDP port (STUN, relay) and its introductions (punch, relay over TCP)."""

from __future__ import annotations

import asyncio
import base64
import socket

import pytest

from overlay import crypto
from overlay.control import passwords
from overlay.control.rawclient import RawClient
from overlay.relay import frames
from overlay.relay.server import RelayServer
from overlay.server.app import MediationServer

aioice_stun = pytest.importorskip("aioice.stun", reason="needs aioice (an independent STUN implementation)")


def udp_sock() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


async def recv(s: socket.socket, timeout: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(s, 65536), timeout)


async def no_recv(s: socket.socket, timeout: float = 0.3) -> bool:
    try:
        await recv(s, timeout)
    except asyncio.TimeoutError:
        return True
    return False


async def register(s: socket.socket, cl: RawClient, dest) -> bytes:
    """Register ``cl``'s relay address from socket ``s``; return the REGISTER that succeeded."""
    key, secret = crypto.public_key(cl.key), base64.b64decode(cl.hello["udp_token"])
    pkt = frames.register(key, secret)
    s.sendto(pkt, dest)
    t, _, nonce = frames.parse(await recv(s))
    if t == getattr(frames, "CHALLENGE", None):
        pkt = frames.register(key, secret, nonce)
        s.sendto(pkt, dest)
        t, _, _ = frames.parse(await recv(s))
    assert t == frames.REGISTERED
    return pkt


def run(coro_fn, tmp_path, **kw):
    async def main():
        server = MediationServer(tmp_path / "srv", "127.0.0.1", 0, **kw)
        await server.start()
        try:
            await coro_fn(server)
        finally:
            await server.close()
    asyncio.run(main())


async def node(server, name: str) -> RawClient:
    return await RawClient(name, crypto.generate_private_key()).connect("127.0.0.1", server.port)


async def share(server, *clients: RawClient, network: str = "net") -> None:
    # memberships straight into the mediator (the password path is tested elsewhere)
    owner = clients[0]
    m = server.mediator
    for c in clients:                                  # as if their identity proofs had checked
        m.proof_checked(crypto.public_key(c.key), True, 0.0)
    h = passwords.hash_password("pw")
    r = m.handle(crypto.public_key(owner.key), {"t": "create", "id": 1, "network": network, "password": "pw"},
                 0.0, password_hash=h)
    assert r["t"] == "ok"
    for c in clients[1:]:
        r = m.handle(crypto.public_key(c.key), {"t": "join", "id": 1, "network": network, "password": "pw"},
                     0.0, password_ok=True)
        assert r["status"] == "joined"
    server._peer_cache.clear()


def test_relay_stops_at_once_when_peers_no_longer_may_reach(tmp_path):
    """The relay caches who may reach whom per source; a kick (or a ban, a type, hub or gateway
    change) through the control connection invalidates it at once, not after the cache's lifetime."""
    async def body(server):
        a, b = await node(server, "a"), await node(server, "b")
        await share(server, a, b)
        sa, sb = udp_sock(), udp_sock()
        dest = ("127.0.0.1", server.port)
        for cl, s in ((a, sa), (b, sb)):
            await register(s, cl, dest)
        pb = crypto.public_key(b.key)
        sa.sendto(frames.data(pb, b"\x04before"), dest)
        assert frames.parse(await recv(sb))[2] == b"\x04before"      # cached now: a may reach b
        r = await a.request({"t": "admin", "network": "net", "action": "kick", "target": "b"})
        assert r["t"] == "ok", r
        sa.sendto(frames.data(pb, b"\x04after"), dest)
        t, key, reason = frames.parse(await recv(sa))
        assert t == frames.REFUSED and key == pb and reason[0] == frames.REASON_NOT_PEER
        assert await no_recv(sb)
    run(body, tmp_path)


def test_stun_binding_with_independent_client(tmp_path):
    async def body(server):
        s = udp_sock()
        req = aioice_stun.Message(message_method=aioice_stun.Method.BINDING,
                                  message_class=aioice_stun.Class.REQUEST)
        s.sendto(bytes(req), ("127.0.0.1", server.port))
        resp = aioice_stun.parse_message(await recv(s))
        assert resp.message_class == aioice_stun.Class.RESPONSE
        assert resp.transaction_id == req.transaction_id
        assert resp.attributes["XOR-MAPPED-ADDRESS"] == s.getsockname()
        # garbage and STUN responses are ignored, and the port keeps answering
        s.sendto(b"\x00\x01garbage", ("127.0.0.1", server.port))
        s.sendto(bytes(resp), ("127.0.0.1", server.port))
        assert await no_recv(s)
        s.sendto(bytes(req), ("127.0.0.1", server.port))
        assert aioice_stun.parse_message(await recv(s)).transaction_id == req.transaction_id
    run(body, tmp_path)


def test_relay_between_peers_only(tmp_path):
    async def body(server):
        a, b, c = await node(server, "a"), await node(server, "b"), await node(server, "c")
        await share(server, a, b)
        sa, sb, sc = udp_sock(), udp_sock(), udp_sock()
        dest = ("127.0.0.1", server.port)
        for cl, s in ((a, sa), (b, sb), (c, sc)):
            await register(s, cl, dest)
        pa, pb = crypto.public_key(a.key), crypto.public_key(b.key)

        sa.sendto(frames.data(pb, b"\x04opaque wireguard bytes"), dest)
        t, src, payload = frames.parse(await recv(sb))
        assert (t, src, payload) == (frames.DATA, pa, b"\x04opaque wireguard bytes")

        # c shares no network with b: refused, nothing delivered
        sc.sendto(frames.data(pb, b"x"), dest)
        t, key, reason = frames.parse(await recv(sc))
        assert t == frames.REFUSED and key == pb and reason[0] == frames.REASON_NOT_PEER
        assert await no_recv(sb)

        # a wrong secret does not register (cannot steal b's traffic)
        evil = udp_sock()
        evil.sendto(frames.register(pb, b"\0" * 16), dest)
        t, _, nonce = frames.parse(await recv(evil))
        assert t == frames.CHALLENGE
        evil.sendto(frames.register(pb, b"\0" * 16, nonce), dest)
        assert await no_recv(evil)
        sa.sendto(frames.data(pb, b"still b"), dest)
        assert frames.parse(await recv(sb))[2] == b"still b"

        # unregistered sender and malformed frames
        evil.sendto(frames.data(pb, b"x"), dest)
        assert frames.parse(await recv(evil))[0] == frames.REFUSED
        evil.sendto(b"OVR\x01\x09" + b"\0" * 40, dest)
        assert await no_recv(evil)
        assert server.relay.stats["malformed"] >= 1
    run(body, tmp_path)


def test_replayed_registration_does_not_redirect_traffic(tmp_path):
    """Issue 9.4: a REGISTER captured on the wire and replayed from another address must not
    move the victim's relay address there."""
    async def body(server):
        a, b = await node(server, "a"), await node(server, "b")
        await share(server, a, b)
        sa, sb, evil = udp_sock(), udp_sock(), udp_sock()
        dest = ("127.0.0.1", server.port)
        await register(sa, a, dest)
        captured = await register(sb, b, dest)          # what an eavesdropper saw b send
        pb = crypto.public_key(b.key)
        for _ in range(3):
            evil.sendto(captured, dest)
            reply = await recv(evil)
            assert frames.parse(reply)[0] != frames.REGISTERED
        assert server.relay.udp_address(pb) == sb.getsockname()
        sa.sendto(frames.data(pb, b"for b only"), dest)
        assert frames.parse(await recv(sb))[2] == b"for b only"
        assert await no_recv(evil)
        # b itself re-registering with the same nonce still works (refresh within the minute)
        sb.sendto(captured, dest)
        assert frames.parse(await recv(sb))[0] == frames.REGISTERED
    run(body, tmp_path)


def test_registration_nonce_is_bound_to_address_and_time():
    r = RelayServer(lambda s, d: True, secret=b"s" * 32)
    key = b"k" * 32
    secret = r.token_for(key)
    here, there = ("192.0.2.1", 4000), ("198.51.100.7", 4000)
    nonce = r.nonce_for(here, 100.0)
    assert r.receive(frames.register(key, secret, nonce), here, 110.0) == [(frames.registered(), here)]
    # same nonce: from elsewhere, or two minutes later, is challenged with a fresh nonce
    for addr, now in ((there, 110.0), (here, 100.0 + 2 * 60.0)):
        out = r.receive(frames.register(key, secret, nonce), addr, now)
        assert out == [(frames.challenge(r.nonce_for(addr, now)), addr)]
    assert r.udp_address(key) == here and r.stats["challenged"] == 2
    # a proof with another key's secret is refused outright
    assert r.receive(frames.register(key, r.token_for(b"x" * 32), nonce), here, 110.0) == []
    assert r.stats["refused"] == 1


def test_relay_over_tcp_both_ways(tmp_path):
    async def body(server):
        a, b = await node(server, "a"), await node(server, "b")
        await share(server, a, b)
        pb = crypto.public_key(b.key)
        # b has no UDP at all: a's UDP frames reach b over its control connection
        sa = udp_sock()
        dest = ("127.0.0.1", server.port)
        await register(sa, a, dest)
        got = b.expect(lambda m: m.get("t") == "relay")
        sa.sendto(frames.data(pb, b"to tcp-only b"), dest)
        ev = await asyncio.wait_for(got, 2)
        assert base64.b64decode(ev["data"]) == b"to tcp-only b" and ev["from"] == a.hello["key"]
        # and b's answers over TCP reach a over UDP
        b.send({"t": "relay", "id": 0, "to": a.hello["key"], "data": base64.b64encode(b"reply").decode()})
        t, src, payload = frames.parse(await recv(sa))
        assert (src, payload) == (pb, b"reply")
    run(body, tmp_path)


def test_relay_bandwidth_cap():
    now = 0.0
    r = RelayServer(lambda s, d: True, rate=100_000)
    a, b = b"a" * 32, b"b" * 32
    r._register(b, ("127.0.0.1", 2), now)
    out: list = []
    sent = sum(r.forward(a, b, b"x" * 1000, now, out) for _ in range(1000))
    assert sent == len(out) and 0 < sent < 1000        # the burst passes, the rest is dropped
    assert r.stats["capped"] == 1000 - sent
    out.clear()
    assert r.forward(a, b, b"x" * 1000, now + 1.0, out)  # a second later it flows again


def test_punch_introduces_both_sides(tmp_path):
    async def body(server):
        a, b, c = await node(server, "a"), await node(server, "b"), await node(server, "c")
        await share(server, a, b)
        sb = udp_sock()
        await register(sb, b, ("127.0.0.1", server.port))
        cands = [{"addr": "192.168.1.20:41641", "kind": "lan"}]
        assert (await a.request({"t": "endpoints", "candidates": cands, "nat": {"varies": False}}))["t"] == "ok"
        to_a = a.expect(lambda m: m.get("t") == "punch")
        to_b = b.expect(lambda m: m.get("t") == "punch")
        assert (await a.request({"t": "punch", "peer": b.hello["key"]}))["t"] == "ok"
        ev_a, ev_b = await asyncio.wait_for(asyncio.gather(to_a, to_b), 2)
        assert ev_a["peer"] == b.hello["key"] and ev_b["peer"] == a.hello["key"]
        host, port = sb.getsockname()
        assert {"addr": f"{host}:{port}", "kind": "srflx"} in ev_a["candidates"]
        assert ev_b["candidates"] == cands and ev_b["nat"] == {"varies": False}
        r = await a.request({"t": "punch", "peer": c.hello["key"]})
        assert r["t"] == "error" and r["code"] == "not_peer"
        r = await a.request({"t": "endpoints", "candidates": [{"addr": "x", "kind": "bogus"}]})
        assert r["t"] == "error" and r["code"] == "bad_request"
    run(body, tmp_path)
