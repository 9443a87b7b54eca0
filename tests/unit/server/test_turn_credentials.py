"""TURN credentials the server hands its nodes (coturn's shared-secret REST scheme)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac

import pytest

from overlay import crypto
from overlay.control.rawclient import RawClient
from overlay.nat.turn import parse_turn_url
from overlay.server.app import MediationServer
from overlay.server.turn_credentials import TurnSettings, node_id, rest_password


def test_turn_url():
    assert parse_turn_url("turn:turn.example.net:3478") == ("turn.example.net", 3478)
    assert parse_turn_url("turn:192.0.2.1") == ("192.0.2.1", 3478)
    assert parse_turn_url("turn:[2001:db8::1]:5349?transport=udp") == ("2001:db8::1", 5349)
    assert parse_turn_url("turn:[2001:db8::1]") == ("2001:db8::1", 3478)
    for bad in ("turns:x:5349", "x:3478", "turn:x:3478?transport=tcp", "turn:x:0", "turn:"):
        with pytest.raises(ValueError):
            parse_turn_url(bad)


def test_settings_are_checked():
    with pytest.raises(ValueError):
        TurnSettings("turn:x:3478", "")
    with pytest.raises(ValueError):
        TurnSettings("turn:x:3478", "s", ttl=10)
    with pytest.raises(ValueError):
        TurnSettings("stun:x:3478", "s")


def test_rest_credentials():
    s = TurnSettings("turn:198.51.100.5:3478", "north", ttl=3600)
    key = bytes(range(32))
    c = s.credentials(node_id(key), 1_700_000_000.7)
    assert c["username"] == f"1700003600:{node_id(key)}" and c["expires"] == 1_700_003_600 and c["ttl"] == 3600
    want = base64.b64encode(hmac.new(b"north", c["username"].encode(), hashlib.sha1).digest()).decode()
    assert c["password"] == want == rest_password("north", c["username"])
    assert c["url"] == "turn:198.51.100.5:3478"
    assert node_id(key) == base64.urlsafe_b64encode(key).decode().rstrip("=") and ":" not in node_id(key)


def run(coro_fn, tmp_path, **kw):
    async def main():
        server = MediationServer(tmp_path / "srv", "127.0.0.1", 0, **kw)
        await server.start()
        try:
            await coro_fn(server)
        finally:
            await server.close()
    asyncio.run(main())


def test_hello_carries_credentials_and_nodes_renew_them(tmp_path):
    async def main(server):
        cl = await RawClient("alice", crypto.generate_private_key()).connect("127.0.0.1", server.port)
        try:
            t = cl.hello["turn"]
            assert t["url"] == "turn:198.51.100.5:3478" and t["ttl"] == 7200
            assert t["username"].endswith(":" + node_id(crypto.public_key(cl.key)))
            assert t["password"] == rest_password("s3cret", t["username"])
            again = await cl.request({"t": "turn", "id": 7})
            assert again["t"] == "ok" and again["turn"]["username"].endswith(node_id(crypto.public_key(cl.key)))
        finally:
            cl.close()
    run(main, tmp_path, turn=TurnSettings("turn:198.51.100.5:3478", "s3cret", ttl=7200))


def test_without_turn_nothing_is_handed_out(tmp_path):
    async def main(server):
        cl = await RawClient("bob", crypto.generate_private_key()).connect("127.0.0.1", server.port)
        try:
            assert "turn" not in cl.hello
            r = await cl.request({"t": "turn", "id": 3})
            assert r["t"] == "ok" and r["turn"] is None
        finally:
            cl.close()
    run(main, tmp_path)
