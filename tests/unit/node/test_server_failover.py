"""Several mediation servers of one deployment (issue 19): the ``--server A,B`` parser, the
server-choice state machine (sans-I/O, an injected clock and jitter), the key pinning across the
list, and the node's view surviving a move to another server (snapshots re-sent, nothing dropped
in between). The real failover between two servers: tests/process/test_server_failover_process.py."""

from __future__ import annotations

import pytest

from overlay import crypto
from overlay.node.config import ConfigError, validate
from overlay.node.home import Home, ServerKeyChanged
from overlay.node.prefs import Prefs
from overlay.node.server_choice import ServerChoice
from overlay.node.server_list import MAX_SERVERS, parse_servers, server_text
from overlay.node.settings import SettingsError, UpOptions, resolve
from overlay.node.state import NodeState


# ---------------------------------------------------------------------------- parsing
def test_parse_one_or_several_servers_as_written():
    assert parse_servers("a.example:7777") == ("a.example:7777",)
    assert parse_servers(" a.example:7777 , 10.0.0.2:7000,[2001:db8::7]:7777 ") == (
        "a.example:7777", "10.0.0.2:7000", "[2001:db8::7]:7777")
    assert parse_servers(["a:1", "b:2,c:3"]) == ("a:1", "b:2", "c:3")   # config.toml's list
    assert parse_servers("::1:7000") == ("::1:7000",)    # unbracketed, as --server always took it
    assert server_text(parse_servers("a:1, b:2")) == "a:1,b:2"


@pytest.mark.parametrize("text, why", [
    ("a:1,,b:2", "entry #2 of the server list is empty"),
    ("a:1,", "entry #2 of the server list is empty"),
    ("", "no server address"),
    ("a:1,b", "'b': expected HOST:PORT"),
    ("a:1,b:x", "'b:x': port must be a number"),
    ("a:1,b:70000", "'b:70000': expected HOST:PORT"),
    ("a:1,b:+7", "'b:+7': the port must be digits only"),
    ("a:1,2001:db8::1", "an IPv6 address goes in brackets"),
    ("[nope]:7", "[nope] is not an IPv6 address"),
    ("a b:1", "is not a host name or IP address"),
    ("a:1,A:1", "'A:1' is listed twice (as 'a:1')"),
    (",".join(f"h{i}:1" for i in range(MAX_SERVERS + 1)), f"at most {MAX_SERVERS}"),
])
def test_malformed_lists_say_why(text, why):
    with pytest.raises(ValueError) as e:
        parse_servers(text)
    assert why in str(e.value), str(e.value)


def test_settings_and_config_take_a_list(tmp_path):
    last = Prefs(tmp_path / "home")
    s = resolve(UpOptions(server="a.example:1, b.example:2", name="n1"), {}, last)
    assert s.server == "a.example:1,b.example:2"
    s = resolve(UpOptions(name="n1"), {"server": ["a.example:1", "[::1]:2"]}, last)
    assert s.server == "a.example:1,[::1]:2"
    with pytest.raises(SettingsError, match="entry #2 of the server list is empty"):
        resolve(UpOptions(server="a:1,,b:2", name="n1"), {}, last)
    last.remember(server="a.example:1,b.example:2", name="n1")        # as the daemon remembers it
    assert resolve(UpOptions(), {}, Prefs(tmp_path / "home")).server == "a.example:1,b.example:2"
    assert validate({"server": ["a:1", "b:2"]}, "c.toml")
    with pytest.raises(ConfigError, match=r'c.toml: server = \[.*expected "HOST:PORT" or a list of them'):
        validate({"server": ["a:1", "a:1"]}, "c.toml")
    with pytest.raises(ConfigError, match="expected \"HOST:PORT\" or a list"):
        validate({"server": []}, "c.toml")


# ---------------------------------------------------------------------------- the state machine
def _choice(*servers, **kw) -> ServerChoice:
    return ServerChoice(servers, jitter=lambda lo, hi: 1.0, **kw)   # no jitter: exact waits


def test_one_server_keeps_the_old_backoff():
    c = _choice("a:1")
    assert [c.ended(t, established=False) for t in range(7)] == [0.5, 1, 2, 4, 8, 16, 30]
    c.connected(10.0)
    assert c.ended(11.0, established=True) == 0.5          # an outage starts its back-off afresh
    assert c.ended(12.0, established=False) == 1.0
    assert c.ended(13.0, established=False, fatal=True) == 30.0   # a wrong key: slowly
    assert c.current == "a:1" and c.switch_count == 0


def test_a_lost_session_moves_on_and_a_round_of_failures_waits():
    c = _choice("a:1", "b:2", "c:3")
    c.connected(0.0)
    assert c.in_use == "a:1"
    assert c.ended(5.0, established=True, why="lost") == 0.5      # a died: next server after 0.5 s
    assert c.current == "b:2" and c.in_use is None
    assert c.ended(6.0, established=False) == 0.0                  # b refused: c at once
    assert c.current == "c:3"
    assert c.ended(6.1, established=False) == 0.0                  # c refused: a at once
    assert c.current == "a:1"
    assert c.ended(6.2, established=False) == 1.0                  # the whole round failed: wait
    assert c.current == "b:2"                                      # and start the round again at b
    assert [c.ended(7.0, established=False) for _ in range(3)] == [0.0, 0.0, 2.0]
    c.connected(9.0)                                               # b is back
    assert c.in_use == "b:2" and c.backoff == 0.5
    assert [(s.old, s.new) for s in c.switches][:3] == [("a:1", "b:2"), ("b:2", "c:3"), ("c:3", "a:1")]
    assert c.switches[0].at == 5.0 and c.switches[0].why == "lost"


def test_first_server_down_at_start_uses_the_second():
    c = _choice("a:1", "b:2")
    assert c.current == "a:1"
    assert c.ended(0.0, established=False) == 0.0
    assert c.current == "b:2"
    c.connected(0.1)
    assert c.in_use == "b:2"


def test_fatal_everywhere_waits_long_fatal_somewhere_does_not():
    c = _choice("a:1", "b:2")
    assert c.ended(0, established=False, fatal=True) == 0.0
    assert c.ended(0, established=False, fatal=True) == 30.0       # both showed a wrong key
    assert c.ended(1, established=False, fatal=True) == 0.0
    assert c.ended(1, established=False, fatal=False) == 0.5       # one was merely down: back off


def test_backoff_is_bounded_and_jittered():
    waits = []
    c = ServerChoice(("a:1", "b:2"), jitter=lambda lo, hi: hi)
    for _ in range(40):
        waits.append(c.ended(0, established=False))
    assert max(waits) == 30.0 * 1.5 and min(w for w in waits if w) == 0.75


# ---------------------------------------------------------------------------- keys
def test_servers_listed_together_share_one_key(tmp_path):
    home = Home(tmp_path / "h")
    k1, k2 = (crypto.public_key(crypto.generate_private_key()) for _ in range(2))
    group = ("a:1", "b:2")
    assert home.check_server_key("a:1", k1, group) is True          # first contact: trust on first use
    assert home.check_server_key("a:1", k1, group) is False
    with pytest.raises(ServerKeyChanged, match="share one key: copy server.key"):
        home.check_server_key("b:2", k2, group)                     # b shows another key: refused
    assert home.check_server_key("b:2", k1, group) is True          # the deployment's key: pinned
    with pytest.raises(ServerKeyChanged, match="pins"):
        home.check_server_key("a:1", k2, group)                     # a pinned key still wins
    # a server alone (no list) is trust on first use as before
    assert home.check_server_key("c:3", k2) is True


# ---------------------------------------------------------------------------- the view across a move
def _member(name, key, ip, online=True):
    return {"name": name, "key": key, "ip": ip, "online": online, "role": "member"}


def test_a_new_session_keeps_peers_until_its_snapshots_are_in():
    st = NodeState()
    st.me = {"key": "ME"}
    st.apply({"t": "network", "network": {"name": "n", "type": "mesh"}})
    st.apply({"t": "members", "network": "n", "members": [_member("me", "ME", "100.64.0.1"),
                                                          _member("bob", "Qk9C", "100.64.0.2"),
                                                          _member("carl", "Q0FS", "100.64.0.3")]})
    st.apply({"t": "network", "network": {"name": "old", "type": "mesh"}})
    st.apply({"t": "members", "network": "old", "members": [_member("dan", "REFO", "100.64.0.4")]})
    before = set(st.peers())
    st.begin_resync()
    # the new server's snapshot arrives piece by piece: nobody is dropped on the way
    st.apply({"t": "network", "network": {"name": "n", "type": "mesh"}})
    assert set(st.peers()) == before
    st.apply({"t": "members", "network": "n", "members": [_member("bob", "Qk9C", "100.64.0.2")]})
    assert set(st.peers()) == before
    assert st.end_resync() is True          # carl left meanwhile, and "old" is gone
    assert set(st.networks) == {"n"}
    assert sorted(p.name for p in st.peers().values()) == ["bob"]
    st.begin_resync()
    st.apply({"t": "network", "network": {"name": "n", "type": "mesh"}})
    st.apply({"t": "members", "network": "n", "members": [_member("bob", "Qk9C", "100.64.0.2")]})
    assert st.end_resync() is False


# ---------------------------------------------------------------------------- the real client, two servers
def test_control_client_moves_to_the_next_server_and_says_hello_again(tmp_path, monkeypatch):
    """The real ControlClient against two scripted servers of one deployment (one key): the first
    ends every session; the client moves to the second, says hello there, and reports both."""
    import asyncio

    from polling import wait_async

    from overlay.node import control_client
    from overlay.node.control_client import ControlClient
    from tests.unit.control.test_control_reconnect import ScriptedServer

    monkeypatch.setattr(control_client, "PING_INTERVAL", 0.3)

    async def main():
        first = ScriptedServer(close_on_ping=True)       # dies at the first ping after the hello
        second = ScriptedServer()
        second.key = first.key                           # one deployment, one key
        p1, p2 = await first.start(), await second.start()
        synced: list[str] = []
        client = ControlClient(Home(tmp_path / "home"), f"127.0.0.1:{p1}, 127.0.0.1:{p2}", "n1",
                               crypto.generate_private_key())
        client.on_synced = lambda: synced.append(client.server)
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            await wait_async(lambda: client.connected and client.server == f"127.0.0.1:{p2}", 5.0,
                             "connected to the second server")
            first.close()
            await wait_async(lambda: synced == [f"127.0.0.1:{p2}"], 5.0, "its snapshots in")
            assert first.accepted and second.accepted
            st = client.servers_status()
            assert [s["in_use"] for s in st] == [False, True] and st[0]["error"], st
            assert client.server_list == f"127.0.0.1:{p1},127.0.0.1:{p2}"
            assert client.choice.switch_count == 1
            pins = (tmp_path / "home" / "known_servers").read_text()
            assert f"127.0.0.1:{p1} " in pins and f"127.0.0.1:{p2} " in pins
        finally:
            task.cancel()
            second.close()

    asyncio.run(main())


def test_a_server_that_stops_answering_is_left_for_the_next(tmp_path, monkeypatch):
    """Death without a closed connection (a frozen host): the keepalive goes unanswered within
    REQUEST_TIMEOUT and the client moves to the second server."""
    import asyncio

    from polling import wait_async

    from overlay.control.channel import Channel, Message
    from overlay.node import control_client
    from overlay.node.control_client import ControlClient
    from tests.unit.control.test_control_reconnect import ScriptedServer

    monkeypatch.setattr(control_client, "PING_INTERVAL", 0.2)
    monkeypatch.setattr(control_client, "REQUEST_TIMEOUT", 0.5)

    class Mute:
        """Answers the hello, then nothing (the connection stays open)."""
        def __init__(self, key):
            self.key, self.writers = key, []

        async def start(self) -> int:
            self._srv = await asyncio.start_server(self._conn, "127.0.0.1", 0)
            return self._srv.sockets[0].getsockname()[1]

        async def _conn(self, reader, writer):
            self.writers.append(writer)
            ch = Channel(initiator=False, static_private=self.key)
            while data := await reader.read(65536):
                ch.receive_data(data)
                while (ev := ch.next_event()) is not None:
                    if isinstance(ev, Message) and ev.body.get("t") == "hello":
                        ch.send({"t": "ok", "id": ev.body["id"], "name": ev.body["name"], "ip": "100.64.0.1"})
                writer.write(ch.data_to_send())

        def close(self):
            self._srv.close()
            for w in self.writers:
                w.close()

    async def main():
        second = ScriptedServer()
        first = Mute(second.key)
        p1, p2 = await first.start(), await second.start()
        client = ControlClient(Home(tmp_path / "home"), f"127.0.0.1:{p1},127.0.0.1:{p2}", "n1",
                               crypto.generate_private_key())
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            await wait_async(lambda: client.connected and client.server == f"127.0.0.1:{p2}", 10.0,
                             "moved to the second server")
            assert "did not answer" in client.errors[f"127.0.0.1:{p1}"]
        finally:
            task.cancel()
            first.close()
            second.close()

    asyncio.run(main())
