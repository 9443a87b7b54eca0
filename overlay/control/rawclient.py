"""A minimal asyncio client of the control protocol, for tests, benchmarks and load generation.

The node daemon uses ``overlay.node.control_client`` (reconnects, TOFU, pings); this one just
connects, says hello and records every message with its arrival time, so a harness can simulate
many nodes or speak the protocol directly.
"""

from __future__ import annotations

import asyncio
import time

from overlay import crypto
from overlay.control import identity_proof
from overlay.control.channel import Channel, Message
from overlay.control.messages import PROTOCOL_VERSION


class RawClient:
    def __init__(self, name: str, private_key: bytes):
        self.name, self.key = name, private_key
        self.events: list[tuple[float, dict]] = []
        self.hello: dict | None = None
        self._waiters: list[tuple[object, asyncio.Future]] = []
        self._next_id = 1
        self.task: asyncio.Task | None = None
        self.proof: str | None = None     # of work on the key, computed when the server asks one

    async def with_proof(self, msg: dict) -> dict:
        """``msg`` (a create or join) with the identity proof the hello reply asks for, if any."""
        bits = (self.hello or {}).get("identity_work") or 0
        if msg.get("t") not in ("create", "join") or not bits or "proof" in msg:
            return msg
        if self.proof is None:
            self.proof = await asyncio.to_thread(identity_proof.solve, crypto.public_key(self.key), bits)
        return {**msg, "proof": self.proof}

    async def connect(self, host: str, port: int, hello: bool = True) -> "RawClient":
        self.reader, self.writer = await asyncio.open_connection(host, port)
        self.ch = Channel(initiator=True, static_private=self.key)
        self.writer.write(self.ch.data_to_send())
        while not self.ch.established:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("closed during handshake")
            self.ch.receive_data(data)
            while self.ch.next_event():
                pass
            self.writer.write(self.ch.data_to_send())
        self.task = asyncio.get_running_loop().create_task(self._read())
        if hello:
            self.hello = await self.request({"t": "hello", "name": self.name, "version": PROTOCOL_VERSION})
        return self

    async def _read(self) -> None:
        while data := await self.reader.read(65536):
            self.ch.receive_data(data)
            while (ev := self.ch.next_event()) is not None:
                if isinstance(ev, Message):
                    now = time.monotonic()
                    self.events.append((now, ev.body))
                    if len(self.events) > 10000:
                        del self.events[:5000]
                    for cond, fut in list(self._waiters):
                        if not fut.done() and cond(ev.body):
                            fut.set_result(ev.body)

    def send(self, msg: dict) -> None:
        self.ch.send(msg)
        self.writer.write(self.ch.data_to_send())

    async def request(self, msg: dict, timeout: float = 20.0) -> dict:
        msg = await self.with_proof(msg)
        rid = self._next_id
        self._next_id += 1
        fut = self.expect(lambda m: m.get("id") == rid and m.get("t") in ("ok", "error"))
        self.send({**msg, "id": rid})
        return await asyncio.wait_for(fut, timeout)

    def expect(self, cond) -> asyncio.Future:
        """A future for the first message (from now on) matching ``cond``."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((cond, fut))
        fut.add_done_callback(lambda f: self._waiters.remove((cond, fut)))
        return fut

    async def wait_for(self, cond, timeout: float = 30.0) -> dict:
        return await asyncio.wait_for(self.expect(cond), timeout)

    def close(self) -> None:
        if self.task:
            self.task.cancel()
        self.writer.close()
