"""Node capabilities in the control plane: stated in the hello, handed to peers with the member
record while the node is online, folded into the node's peer table (``checksum_free``), and a
hello that still works with a server older than capabilities."""

from __future__ import annotations

import asyncio
import base64
import socket

import pytest
from polling import wait_async

from overlay import crypto
from overlay.control.channel import Channel, Message
from overlay.control import messages
from overlay.control.messages import CAP_NO_INNER_CHECKSUM, RequestError, key_to_text, parse_caps, validate_request
from overlay.node.control_client import ControlClient
from overlay.node.dataplane import DataPlane
from overlay.node.home import Home
from overlay.node.state import NodeState, Peer
from tests.unit.control.test_control_mediator import PW, World

CAP = CAP_NO_INNER_CHECKSUM


@pytest.fixture
def w():
    world = World()
    yield world
    world.store.close()


def _records(w: World, who: str) -> dict[str, dict]:
    """Member records ``who`` received since the last call, by member name (the latest one)."""
    out = {}
    for ev in w.ev(who, "members"):
        for rec in ev["members"]:
            out[rec["name"]] = rec
    return out


# ------------------------------------------------------------------ the schema

def test_hello_caps_are_validated_and_parsed():
    base = {"t": "hello", "id": 1, "name": "a", "version": 1}
    assert validate_request({**base, "caps": [CAP, "future-thing"]})["caps"] == [CAP, "future-thing"]
    assert validate_request({**base, "caps": []})["caps"] == []
    for bad in (["UPPER"], [""], ["x" * 33], [1], [CAP, CAP], ["a"] * (messages.MAX_CAPS + 1), "no-inner-csum"):
        with pytest.raises(RequestError) as e:
            validate_request({**base, "caps": bad})
        assert e.value.code == "bad_request"
    # from a member record (a server's word, not validated by the schema): the good ones, bounded
    assert parse_caps([CAP, "Bad Cap", 7, CAP, "zz"]) == (CAP, "zz")
    assert parse_caps(None) == () and parse_caps("no-inner-csum") == ()
    assert len(parse_caps([f"c{i}" for i in range(100)])) <= messages.MAX_CAPS


# ------------------------------------------------------------------ the mediator

def test_caps_reach_peers_while_online_and_old_nodes_state_none(w):
    w.hello("alice", caps=[CAP])
    w.hello("bob")                                  # an older node: no caps field at all
    w.req("alice", "create", network="lan", password=PW)
    w.req("bob", "join", network="lan", password=PW)
    w.events()
    w.req("bob", "members", network="lan")
    recs = _records(w, "bob")
    assert recs["alice"]["caps"] == [CAP]
    assert "caps" not in recs["bob"]                # absent, exactly as from a server without caps
    # alice goes offline: her record loses the capability (she may come back as a TUN node)
    w.disconnect("alice")
    assert "caps" not in _records(w, "bob")["alice"]
    w.hello("alice")                                # back without the capability
    assert "caps" not in _records(w, "bob")["alice"]
    w.hello("bob", caps=[CAP, "future-thing"])      # unknown ones are passed on as they are
    assert _records(w, "alice")["bob"]["caps"] == sorted([CAP, "future-thing"])


# ------------------------------------------------------------------ the node's view

def _k(label: str) -> str:
    return key_to_text(label.encode().ljust(32, b"."))


def test_node_state_takes_caps_from_member_records():
    s = NodeState()
    s.me = {"key": _k("ME"), "name": "me"}
    for net in ("one", "two"):
        s.apply({"t": "network", "network": {"name": net}})
    rec = {"name": "bob", "key": _k("BOB"), "ip": "100.64.0.3", "online": True, "role": "member"}
    s.apply({"t": "members", "network": "one", "members": [{**rec, "caps": [CAP, "Not A Cap"]}]})
    s.apply({"t": "members", "network": "two", "members": [{**rec, "caps": [CAP]}]})
    (bob,) = s.peers().values()
    assert bob.caps == (CAP,) and bob.to_json()["caps"] == [CAP]
    # one network's record without it (stale, or an older server): the peer does not get it
    s.apply({"t": "members", "network": "two", "members": [rec]})
    (bob,) = s.peers().values()
    assert bob.caps == ()


def test_peer_table_checksum_free_holds_capable_members_only():
    dp = DataPlane(crypto.generate_private_key())
    keys = {n: crypto.public_key(crypto.generate_private_key()) for n in ("able", "plain", "claimer", "static")}

    def peer(n: str, ip: str, caps=()) -> Peer:
        return Peer(n, keys[n], base64.b64encode(keys[n]).decode(), ip, True, caps=caps)

    free = dp.table.checksum_free     # one object for good: the stacks hold it
    members = {keys["able"]: peer("able", "100.64.0.1", (CAP,)), keys["plain"]: peer("plain", "100.64.0.2"),
               keys["claimer"]: peer("claimer", "100.64.0.9", (CAP,))}
    dp.update_peers(members)
    assert free == {socket.inet_aton("100.64.0.1"), socket.inet_aton("100.64.0.9")}
    # a static WireGuard peer (a stock wireguard-go) never is, even at an address a member claims
    dp.add_static_peer(keys["static"], name="static", endpoint=("127.0.0.1", 9), allowed_ips=["100.64.0.9/32"])
    assert free == {socket.inet_aton("100.64.0.1")}
    # whatever the table routes an address to decides: free only when that is a capable member
    dp.update_peers(members)
    nine = dp.table.by_vip[socket.inet_aton("100.64.0.9")]
    assert (socket.inet_aton("100.64.0.9") in free) == (nine.path is not None and nine.name == "claimer")
    # the capability withdrawn, or the member gone: out
    dp.update_peers({keys["able"]: peer("able", "100.64.0.1"), keys["plain"]: peer("plain", "100.64.0.2", (CAP,))})
    assert free == {socket.inet_aton("100.64.0.2")} and dp.table.checksum_free is free
    dp.update_peers({})
    assert free == set()
    dp.close()


# ------------------------------------------------------------------ the node's hello

def test_hello_falls_back_without_caps_for_a_server_that_refuses_them(tmp_path, monkeypatch):
    """A server older than capabilities refuses the unknown field (its schema has no ``caps``):
    the node says hello again without it, on the same connection, and is connected."""
    from tests.unit.control.test_control_reconnect import ScriptedServer

    old_hello = {k: v for k, v in messages.REQUEST_SCHEMA["hello"].items() if k != "caps"}
    monkeypatch.setitem(messages.REQUEST_SCHEMA, "hello", old_hello)

    class OldServer(ScriptedServer):
        """Checks each request with the schema of a server that knows no capabilities."""

        def __init__(self):
            super().__init__()
            self.hellos: list[dict] = []

        async def _conn(self, reader, writer):
            self.accepted.append(asyncio.get_running_loop().time())
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
        client.hello_extra["caps"] = [CAP]
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            await wait_async(lambda: client.connected, 10.0, "the node connected to the old server",
                             on_fail=lambda: f"{client.state}: {client.last_error}")
            hellos = [h for h in srv.hellos if h["t"] == "hello"]
            assert [h.get("caps") for h in hellos] == [[CAP], None] and len(srv.accepted) == 1
            assert client.hello_extra["caps"] == [CAP]    # kept: a newer server gets it next time
        finally:
            task.cancel()
            srv.close()
    asyncio.run(main())


# ------------------------------------------------------------------ a userspace gateway

def test_userspace_gateway_answers_capable_members_without_checksums():
    """Its per-LAN-host stacks and its UDP replies leave the checksum to the tunnel toward members
    in the data plane's set, and compute it for everyone else."""
    from overlay.netstack import wire
    from overlay.node.gateway import Gateway

    able, other = socket.inet_aton("100.64.0.5"), socket.inet_aton("100.64.0.6")
    free: set[bytes] = {able}

    async def main():
        sent: list[bytes] = []
        gw = Gateway(sent.extend, mtu=1380, checksum_free=free)
        try:
            for member in (able, other):
                gw._udp_back((socket.inet_ntoa(member), 5000, "192.168.1.7", 53), b"answer")
            to_able, to_other = sent
            assert to_able[26:28] == b"\0\0"      # UDP checksum field: none
            ip = wire.parse_ipv4(to_other)
            assert wire.parse_udp(ip).data == b"answer" and to_other[26:28] != b"\0\0"
            driver = gw._stack_for("192.168.1.7", 0.0)
            assert driver is not None and driver.stack.checksum_free is free
        finally:
            gw.close()
    asyncio.run(main())
