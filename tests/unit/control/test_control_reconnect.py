"""The node's control connection after the server goes away (issues 9.6 and 9.7).

A scripted server (the real Noise channel over loopback TCP) ends sessions on cue; the real
``ControlClient`` reconnects to it. Connection times are what the server saw.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from polling import wait_async

from overlay import crypto
from overlay.control.channel import Channel, Message
from overlay.node import control_client
from overlay.node.control_client import ControlClient
from overlay.node.home import Home


class ScriptedServer:
    """Answers hello; then ``on_hello`` or ``on_ping`` returns True to close the connection (EOF)."""

    def __init__(self, close_after_hello: bool = False, close_on_ping: bool = False):
        self.key = crypto.generate_private_key()
        self.close_after_hello = close_after_hello
        self.close_on_ping = close_on_ping
        self.accepted: list[float] = []
        self.closed: list[float] = []

    async def start(self) -> int:
        self._srv = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self._srv.sockets[0].getsockname()[1]

    async def _conn(self, reader, writer):
        self.accepted.append(time.monotonic())
        ch = Channel(initiator=False, static_private=self.key)
        try:
            while data := await reader.read(65536):
                ch.receive_data(data)
                close = False
                while (ev := ch.next_event()) is not None:
                    if not isinstance(ev, Message):
                        continue
                    t, rid = ev.body.get("t"), ev.body.get("id")
                    if t == "hello":
                        ch.send({"t": "ok", "id": rid, "name": ev.body["name"], "ip": "100.64.0.1"})
                        close = close or self.close_after_hello
                    elif t == "ping":
                        if self.close_on_ping:
                            close = True    # the ping stays unanswered: only the EOF tells the node
                        else:
                            ch.send({"t": "ok", "id": rid})
                writer.write(ch.data_to_send())
                if close:
                    await writer.drain()
                    self.closed.append(time.monotonic())
                    break
        finally:
            writer.close()

    def close(self):
        self._srv.close()


def _client(tmp_path, port) -> ControlClient:
    return ControlClient(Home(tmp_path / "home"), f"127.0.0.1:{port}", "n1", crypto.generate_private_key())


def test_eof_fails_the_request_in_flight_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(control_client, "PING_INTERVAL", 0.3)
    assert control_client.REQUEST_TIMEOUT >= 20   # what a lost EOF would cost

    async def main():
        srv = ScriptedServer(close_on_ping=True)
        port = await srv.start()
        client = _client(tmp_path, port)
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            # the first session ends with EOF while its ping is in flight; the node must notice
            # at once and reconnect (its back-off starts afresh after an established session)
            # (a bounded wait well below REQUEST_TIMEOUT: a lost EOF would wait that out)
            await wait_async(lambda: len(srv.accepted) >= 2, 5.0, "a reconnect within 5 s of the EOF")
            assert client.retry_delays[0] <= control_client.BACKOFF_MIN * 1.5   # the first back-off step
        finally:
            task.cancel()
            srv.close()

    asyncio.run(main())


@pytest.mark.slow
def test_backoff_resets_after_an_established_session(tmp_path):
    async def main():
        srv = ScriptedServer(close_after_hello=True)   # the server "restarts" right after every hello
        port = await srv.start()
        client = _client(tmp_path, port)
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            await wait_async(lambda: len(srv.accepted) >= 7, 15.0, "7 sessions",
                             on_fail=lambda: f"only {len(srv.accepted)}: the back-off kept growing")
            # BACKOFF_MIN with jitter each time: at most 0.75 s (before: 0.5, 1, 2, 4, 8 s ... doubled)
            delays = list(client.retry_delays)
            assert len(delays) >= 6 and max(delays) <= control_client.BACKOFF_MIN * 1.5, delays
            assert client.connects >= 6
        finally:
            task.cancel()
            srv.close()

    asyncio.run(main())
