"""Hostile and broken clients against a real ``MediationServer`` on 127.0.0.1 (in-process).

Each test runs its own server on port 0 inside ``asyncio.run`` with an overall deadline, and talks
to it over real TCP sockets with a ``Channel`` (or raw bytes where the framing itself is the
attack). Argon2id is switched to its minimum cost, and new nodes prove 1 bit of work on their key
(``IDENTITY_BITS``), so floods of joins stay fast; the limits under test are the server's own
counters, not timing.

Bugs these tests found were fixed; the tests stay as regressions.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque

import pytest
from nacl import pwhash

from overlay import crypto
from overlay.control import identity_proof, passwords
from overlay.control.channel import Channel, Message
from overlay.control.messages import key_to_text
from overlay.server import app
from overlay.server.app import MediationServer
from overlay.server.mediator import FAILED_JOINS_PER_NETWORK, FAILED_JOINS_PER_NODE, FAILED_JOINS_PER_SOURCE

PW = "right-password"
IDENTITY_BITS = 1


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch):
    monkeypatch.setattr(passwords, "OPSLIMIT", pwhash.argon2id.OPSLIMIT_MIN)
    monkeypatch.setattr(passwords, "MEMLIMIT", pwhash.argon2id.MEMLIMIT_MIN)


class Client:
    """A node's side of the control channel, minimal and scriptable."""

    def __init__(self, port: int, key: bytes | None = None, source: str | None = None):
        self.port = port
        self.source = source          # a loopback address of 127/8 to connect from
        self.key = key or crypto.generate_private_key()
        self.ch = Channel(initiator=True, static_private=self.key)
        self.inbox: deque[dict] = deque()
        self.rid = 0
        self.work = 0                 # identity proof the server asked for in its hello reply
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def open(self, rcvbuf: int | None = None) -> "Client":
        if rcvbuf is None:
            local = (self.source, 0) if self.source else None
            self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port, local_addr=local)
        else:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", self.port))
            self.r, self.w = await asyncio.open_connection(sock=s, limit=rcvbuf)
        return self

    async def connect(self, name: str | None = None) -> "Client":
        await self.open()
        self.w.write(self.ch.data_to_send())
        while not self.ch.established:
            await self._read()
        self.w.write(self.ch.data_to_send())
        if name is not None:
            r = await self.request("hello", name=name, version=1)
            assert r["t"] == "ok", r
        return self

    def proof(self) -> str:
        if not hasattr(self, "_proof"):
            self._proof = identity_proof.solve(crypto.public_key(self.key), self.work)
        return self._proof

    async def _read(self, timeout: float = 10.0) -> None:
        data = await asyncio.wait_for(self.r.read(65536), timeout)
        if not data:
            raise EOFError("server closed the connection")
        self.ch.receive_data(data)
        while (ev := self.ch.next_event()) is not None:
            if isinstance(ev, Message):
                self.inbox.append(ev.body)

    def send(self, body: dict) -> None:
        self.ch.send(body)
        self.w.write(self.ch.data_to_send())

    def next_id(self) -> int:
        self.rid += 1
        return self.rid

    async def request(self, t: str, **fields) -> dict:
        if t in ("create", "join") and self.work:
            fields.setdefault("proof", self.proof())
        rid = self.next_id()
        self.send({"t": t, "id": rid, **fields})
        r = await self.reply(rid)
        if t == "hello" and r["t"] == "ok":
            self.work = r["identity_work"]
        return r

    async def reply(self, rid: int | None) -> dict:
        while True:
            for i, m in enumerate(self.inbox):
                if m.get("t") in ("ok", "error") and m.get("id") == rid:
                    del self.inbox[i]
                    return m
            await self._read()

    async def closed(self, timeout: float = 10.0) -> bool:
        """Read (keeping messages) until the server closes; False if still open at ``timeout``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            while True:
                left = end - loop.time()
                if left <= 0:
                    return False
                data = await asyncio.wait_for(self.r.read(65536), left)
                if not data:
                    return True
                try:
                    self.ch.receive_data(data)
                    while (ev := self.ch.next_event()) is not None:
                        if isinstance(ev, Message):
                            self.inbox.append(ev.body)
                except Exception:
                    pass  # we may have broken our own channel on purpose
        except (ConnectionResetError, BrokenPipeError):
            return True
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


def serve(tmp_path, body, timeout: float = 40.0) -> None:
    """Run ``await body(server)`` against a fresh in-process server, then shut it down."""
    async def main():
        server = MediationServer(tmp_path / "server", "127.0.0.1", 0, identity_bits=IDENTITY_BITS)
        await server.start()
        try:
            await asyncio.wait_for(body(server), timeout)
        finally:
            await server.close()
    asyncio.run(main())


async def still_serves(server: MediationServer, name: str = "checker") -> None:
    """A fresh, well-behaved node can still do everything after the abuse."""
    c = await Client(server.port).connect(name)
    try:
        assert (await c.request("ping"))["t"] == "ok"
        r = await c.request("create", network=f"net-{name}", password=PW)
        assert r["t"] == "ok", r
    finally:
        c.close()


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(2, "big") + payload


# ============================================================================ framing / handshake


@pytest.mark.parametrize("garbage", [
    frame(b"hello"),                                   # too short to be Noise message 1
    frame(b"G" * 40) + frame(b"E" * 80),               # "message 1" then a forged message 3
    b"\x00\x00",                                       # zero-length frame
])
def test_garbage_before_handshake_closes(tmp_path, garbage):
    async def body(server):
        c = await Client(server.port).open()
        c.w.write(garbage)
        assert await c.closed()
        await asyncio.sleep(0.05)
        assert not [x for x in server.connections if x.key is None and not x.closed]
        await still_serves(server)
    serve(tmp_path, body)


@pytest.mark.parametrize("hostile", ["low_order_key", "deep_json"])
def test_hostile_input_closes_connection_and_server_survives(tmp_path, hostile):
    async def body(server):
        c = Client(server.port)
        if hostile == "low_order_key":
            await c.open()
            c.w.write(frame(bytes(32)))                    # message 1 with the all-zero point
        else:
            await c.connect("deep")
            nested = b'{"t":' + b"[" * 30000 + b"]" * 30000 + b"}"
            c.w.write(frame(c.ch._send_cs.encrypt(b"", nested)))
        assert await c.closed()
        await still_serves(server)
    serve(tmp_path, body)


@pytest.mark.parametrize("hostile", ["low_order_key", "deep_json"])
def test_hostile_input_is_a_protocol_error_not_a_crash(tmp_path, hostile, caplog):
    async def body(server):
        c = Client(server.port)
        if hostile == "low_order_key":
            await c.open()
            c.w.write(frame(bytes(32)))
        else:
            await c.connect("deep")
            c.w.write(frame(c.ch._send_cs.encrypt(b"", b"[" * 30000)))
        assert await c.closed()
    with caplog.at_level(logging.INFO):
        serve(tmp_path, body)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "unhandled exception logged"
    assert any("protocol error" in r.getMessage() for r in caplog.records)


def test_zero_length_frame_after_handshake(tmp_path):
    async def body(server):
        c = await Client(server.port).connect("zero")
        c.w.write(b"\x00\x00")
        assert await c.closed()
        errs = [m for m in c.inbox if m.get("t") == "error"]
        assert errs and errs[-1]["code"] == "protocol" and errs[-1]["id"] is None
        await still_serves(server)
    serve(tmp_path, body)


def test_maximum_size_garbage_frame_after_handshake(tmp_path):
    async def body(server):
        c = await Client(server.port).connect("big")
        c.w.write(frame(b"\xaa" * 65535))
        assert await c.closed()
        assert c.inbox[-1]["code"] == "protocol"
        await still_serves(server)
    serve(tmp_path, body)


def test_replayed_frame_closes(tmp_path):
    async def body(server):
        c = await Client(server.port).connect("replay")
        c.ch.send({"t": "ping", "id": 99})
        raw = c.ch.data_to_send()
        c.w.write(raw)
        assert (await c.reply(99))["t"] == "ok"
        c.w.write(raw)
        assert await c.closed()
        assert c.inbox[-1]["code"] == "protocol"
        await still_serves(server)
        assert not server.sessions.get(crypto.public_key(c.key))
    serve(tmp_path, body)


# ============================================================================ requests


def test_unknown_type_keeps_connection(tmp_path):
    async def body(server):
        c = await Client(server.port).connect("alice")
        r = await c.request("teleport", to="mars")
        assert r["t"] == "error" and r["code"] == "unknown_type"
        assert (await c.request("ping"))["t"] == "ok"
    serve(tmp_path, body)


def test_request_before_hello(tmp_path):
    async def body(server):
        c = await Client(server.port).connect()
        r = await c.request("create", network="x", password=PW)
        assert r["code"] == "hello_first"
        assert (await c.request("ping"))["code"] == "hello_first"
        assert (await c.request("hello", name="alice", version=1))["t"] == "ok"
        r = await c.request("hello", name="alice", version=1)
        assert r["t"] == "error" and r["code"] == "bad_request"
        assert (await c.request("ping"))["t"] == "ok"
        assert server.store.network("x") is None
    serve(tmp_path, body)


@pytest.mark.parametrize("fields", [
    {"t": "hello", "name": "alice", "version": "1"},
    {"t": "hello", "name": "alice", "version": True},
    {"t": "hello", "name": 7, "version": 1},
    {"t": "hello", "name": "alice", "version": 1, "admin": True},
    {"t": "hello", "name": "alice"},
])
def test_malformed_fields_bad_request(tmp_path, fields):
    async def body(server):
        c = await Client(server.port).connect()
        rid = c.next_id()
        c.send({**fields, "id": rid})
        r = await c.reply(rid)
        assert r["t"] == "error" and r["code"] == "bad_request", r
        assert (await c.request("hello", name="alice", version=1))["t"] == "ok"   # still usable
    serve(tmp_path, body)


def test_bad_ids_and_names(tmp_path):
    async def body(server):
        c = await Client(server.port).connect("alice")
        c.send({"t": "ping", "id": "seven"})
        r = await c.reply(None)
        assert r["code"] == "bad_request"
        c.send({"t": "ping"})
        assert (await c.reply(None))["code"] == "bad_request"
        assert (await c.request("create", network="no spaces", password=PW))["code"] == "invalid_name"
        assert (await c.request("chat", network="nope", text="x" * 1001))["code"] == "bad_request"
        assert (await c.request("ping"))["t"] == "ok"
    serve(tmp_path, body)


@pytest.mark.parametrize("plaintext", [b"[1,2,3]", b"not json", b"\xff\xfe"])
def test_non_object_json_closes(tmp_path, plaintext):
    async def body(server):
        c = await Client(server.port).connect("alice")
        c.w.write(frame(c.ch._send_cs.encrypt(b"", plaintext)))
        assert await c.closed()
        assert c.inbox[-1]["code"] == "protocol"
    serve(tmp_path, body)


def test_lone_surrogate_is_bad_request(tmp_path):
    async def body(server):
        c = await Client(server.port).connect("alice")
        assert (await c.request("create", network="lan", password=PW))["t"] == "ok"
        rid = c.next_id()
        raw = b'{"t":"chat","id":%d,"network":"lan","text":"a\\ud800"}' % rid
        c.w.write(frame(c.ch._send_cs.encrypt(b"", raw)))
        r = await c.reply(rid)
        assert r["code"] == "bad_request", r
    serve(tmp_path, body)


def test_unhashable_candidate_kind_is_bad_request(tmp_path):
    async def body(server):
        c = await Client(server.port).connect("alice")
        r = await c.request("endpoints", candidates=[{"addr": "1.2.3.4:5", "kind": []}])
        assert r["code"] == "bad_request"
        assert (await c.request("ping"))["t"] == "ok"
    serve(tmp_path, body)


def test_surrogate_candidate_cannot_wedge_a_peer(tmp_path):
    async def body(server):
        victim = await Client(server.port).connect("victim")
        assert (await victim.request("create", network="lan", password=PW))["t"] == "ok"
        evil = await Client(server.port).connect("evil")
        assert (await evil.request("join", network="lan", password=PW))["t"] == "ok"
        rid = evil.next_id()
        raw = (b'{"t":"endpoints","id":%d,"candidates":[{"addr":"\\ud800:1","kind":"lan"}]}' % rid)
        evil.w.write(frame(evil.ch._send_cs.encrypt(b"", raw)))
        await evil.reply(rid)              # refused (the fix) or accepted (today)
        r = await asyncio.wait_for(victim.request("punch", peer=key_to_text(crypto.public_key(evil.key))), 3)
        assert r["t"] in ("ok", "error")
        assert (await asyncio.wait_for(victim.request("ping"), 3))["t"] == "ok"
    serve(tmp_path, body)


def test_relay_over_tcp_garbage_is_dropped(tmp_path):
    async def body(server):
        key = crypto.public_key(crypto.generate_private_key())
        early = await Client(server.port).connect()
        r = await early.request("relay", to=key_to_text(key), data="AAAA")
        assert r["code"] == "hello_first"                   # not a bypass before hello
        c = await Client(server.port).connect("alice")
        for body_ in ({"t": "relay", "to": 5, "data": "AAAA"},
                      {"t": "relay", "to": key_to_text(key), "data": ["x"]},
                      {"t": "relay", "to": key_to_text(key), "data": "!!!"},
                      {"t": "relay", "to": key_to_text(key), "data": ""},
                      {"t": "relay"}):
            c.send(body_)
        for _ in range(500):                                  # to a node sharing no network
            c.ch.send({"t": "relay", "to": key_to_text(key), "data": "AAAA"})
        c.w.write(c.ch.data_to_send())
        assert (await c.request("ping"))["t"] == "ok"
        assert not [m for m in c.inbox if m.get("t") == "error"]  # fire and forget: never answered
    serve(tmp_path, body)


def test_second_connection_with_same_key_replaces_first(tmp_path):
    async def body(server):
        key = crypto.generate_private_key()
        c1 = await Client(server.port, key).connect("alice")
        c2 = await Client(server.port, key).connect("alice")
        assert await c1.closed()
        assert any(m.get("code") == "replaced" for m in c1.inbox)
        assert (await c2.request("ping"))["t"] == "ok"
        assert server.sessions[crypto.public_key(key)] is not None
        assert len(server.sessions) == 1
    serve(tmp_path, body)


# ============================================================================ floods


@pytest.mark.slow
def test_join_flood_is_rate_limited_and_others_are_served(tmp_path):
    async def body(server):
        owner = await Client(server.port).connect("owner")
        assert (await owner.request("create", network="lan", password=PW))["t"] == "ok"
        other = await Client(server.port).connect("other")

        # one attacker, sequential guesses: the per-node limit kicks in after 5 failures
        a = await Client(server.port, source="127.0.0.2").connect("attacker")
        codes = [(await a.request("join", network="lan", password=f"guess{i}"))["code"] for i in range(8)]
        assert codes == ["wrong_password"] * FAILED_JOINS_PER_NODE + ["rate_limited"] * 3
        r = await a.request("join", network="lan", password=PW)   # the right one is refused too
        assert r["code"] == "rate_limited" and "failed join attempts" in r["message"]

        # fresh keys from three other addresses flood at once, more than each address may fail
        per_src = FAILED_JOINS_PER_SOURCE // FAILED_JOINS_PER_NODE + 1
        attackers = [await Client(server.port, source=f"127.0.0.{3 + i % 3}").connect(f"flood{i}")
                     for i in range(3 * per_src)]
        ids = {}
        for c in attackers:
            ids[c] = []
            for i in range(2 * FAILED_JOINS_PER_NODE):
                rid = c.next_id()
                c.ch.send({"t": "join", "id": rid, "network": "lan", "password": f"g{i}", "proof": c.proof()})
                ids[c].append(rid)
            c.w.write(c.ch.data_to_send())
        # meanwhile another node is answered, and joins with the right password at once
        assert (await other.request("ping"))["t"] == "ok"
        r = await other.request("join", network="lan", password=PW)
        assert r["t"] == "ok" and r["status"] == "joined", r
        wrong = 0
        for c in attackers:
            replies = [await c.reply(rid) for rid in ids[c]]
            codes = {r["code"] for r in replies}
            assert codes <= {"wrong_password", "rate_limited"}, codes
            n_wrong = sum(r["code"] == "wrong_password" for r in replies)
            assert n_wrong <= FAILED_JOINS_PER_NODE
            wrong += n_wrong
        # per source address: at most its limit (+1 per attacker racing the check while hashing)
        assert wrong <= 3 * FAILED_JOINS_PER_SOURCE + len(attackers)
        # the attackers' addresses stay limited, for fresh keys too; the owner's is not
        late = await Client(server.port, source="127.0.0.3").connect("late")
        r = await late.request("join", network="lan", password="guess")
        assert r["code"] == "rate_limited" and "from your address" in r["message"], r
        fresh = await Client(server.port).connect("fresh")
        assert (await fresh.request("join", network="lan", password=PW))["status"] == "joined"
        assert {k for k in server.store.members("lan")} == {
            crypto.public_key(c.key) for c in (owner, other, fresh)}
        # bounded server state: one window per attacking node / address / network, each short
        m = server.mediator
        assert len(m._fail_node) == 1 + len(attackers)
        assert all(len(w.times) <= FAILED_JOINS_PER_NODE for w in m._fail_node.values())
        assert set(m._fail_src) == {f"127.0.0.{i}" for i in range(2, 6)}
        assert set(m._fail_net) == {"lan"} and len(m._fail_net["lan"].times) <= FAILED_JOINS_PER_NETWORK
        assert all(x._queue.qsize() <= x._queue.maxsize for x in server.connections)
        await still_serves(server)
    serve(tmp_path, body, timeout=90)


def test_request_flood_rate_limited_then_closed(tmp_path):
    async def body(server):
        c = await Client(server.port).connect("flooder")
        n = 500
        for i in range(n):
            c.ch.send({"t": "ping", "id": 1000 + i})
        c.w.write(c.ch.data_to_send())
        assert await c.closed()
        replies = [m for m in c.inbox if m.get("t") in ("ok", "error")]
        oks = [m for m in replies if m["t"] == "ok"]
        limited = [m for m in replies if m.get("code") == "rate_limited"]
        assert len(oks) <= app.BURST     # queued pings may be dropped by the close: no lower bound
        assert len(limited) > 0
        assert replies[-1]["code"] == "abuse" and replies[-1]["id"] is None
        assert len(replies) < n + 1          # closed before answering everything
        await asyncio.sleep(0.05)
        assert crypto.public_key(c.key) not in server.sessions
        await still_serves(server)
    serve(tmp_path, body)


def test_token_bucket_refills(tmp_path):
    async def body(server):
        c = await Client(server.port).connect("bursty")
        ids = []
        for _ in range(int(app.BURST) + 40):        # below the abuse limit: stays connected
            ids.append(c.next_id())
            c.ch.send({"t": "ping", "id": ids[-1]})
        c.w.write(c.ch.data_to_send())
        codes = [(await c.reply(rid)).get("code") for rid in ids]
        assert codes.count("rate_limited") >= 40
        await asyncio.sleep(0.5)                     # refills RATE tokens per second
        assert (await c.request("ping"))["t"] == "ok"
    serve(tmp_path, body)


def test_non_reading_client_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "MAX_WRITE_BUFFER", 256 * 1024)
    monkeypatch.setattr(app, "BURST", 100_000.0)     # this test is about output, not input limits

    async def body(server):
        c = Client(server.port)
        await c.open(rcvbuf=4096)
        c.w.write(c.ch.data_to_send())
        while not c.ch.established:
            await c._read()
        c.w.write(c.ch.data_to_send())
        assert (await c.request("hello", name="sink", version=1))["t"] == "ok"
        assert (await c.request("create", network="lan", password=PW))["t"] == "ok"
        for i in range(100):
            assert (await c.request("chat", network="lan", text="é" * 1000))["t"] == "ok"
        c.inbox.clear()
        # each history request makes the server push ~200 KB; never read any of it
        conn = server.sessions[crypto.public_key(c.key)]
        for _ in range(60):                  # up to ~100 MB asked for; the cap must cut it off
            if conn.closed or conn.transport.is_closing():
                break
            for _ in range(8):
                c.ch.send({"t": "history", "id": c.next_id(), "network": "lan"})
            c.w.write(c.ch.data_to_send())
            await asyncio.sleep(0.02)
        assert conn.transport.is_closing()
        assert conn.transport.get_write_buffer_size() <= app.MAX_WRITE_BUFFER + 300 * 1024 or conn.closed
        await asyncio.sleep(0.1)
        assert crypto.public_key(c.key) not in server.sessions
        await still_serves(server)
    serve(tmp_path, body)


# ============================================================================ slowloris


def test_silent_connection_closed_after_handshake_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "HANDSHAKE_TIMEOUT", 0.3)

    async def body(server):
        c = await Client(server.port).open()
        half = await Client(server.port).open()
        half.w.write(b"\x00\x40" + b"x" * 10)          # a frame that never completes
        hs_only = await Client(server.port).connect()   # handshake done, never says hello
        for x in (c, half, hs_only):
            assert await x.closed(timeout=5)
        await asyncio.sleep(0.05)
        assert server.connections == set()
        await still_serves(server)
    serve(tmp_path, body)


def test_dribbling_handshake_closed_after_handshake_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(app, "HANDSHAKE_TIMEOUT", 1.0)

    async def body(server):
        c = await Client(server.port).open()
        c.w.write(b"\xff\xff")                           # announce a 64 KiB message 1 ...
        for _ in range(70):                              # ... and send it a byte every 50 ms
            await asyncio.sleep(0.05)
            if c.r.at_eof():
                break
            c.w.write(b"x")
        # a real handshake deadline (1 s, reaper every 1 s) has closed it by now
        assert await c.closed(timeout=0.5)
    serve(tmp_path, body)


# ============================================================================ shutdown


def test_close_with_connected_nodes_is_clean(tmp_path, caplog):
    async def main():
        server = MediationServer(tmp_path / "server", "127.0.0.1", 0)
        await server.start()
        c = await Client(server.port).connect("alice")
        await server.close()
        assert await c.closed(timeout=5)
        await asyncio.sleep(0.1)                 # let connection_lost callbacks run
    with caplog.at_level(logging.ERROR):
        asyncio.run(asyncio.wait_for(main(), 20))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], \
        [r.getMessage() for r in caplog.records]
