"""The node's connection to the mediation server (asyncio glue around ``Channel``).

Connects directly or through an HTTP CONNECT / SOCKS5 proxy (python-socks), checks the server's
key against the pin in ``known_servers`` (trust on first use), says hello, then runs requests and
delivers server events. On any failure it reconnects with exponential backoff and jitter; a
pinned-key mismatch or a refused hello keeps retrying slowly so a fixed config is picked up
without restarting the daemon. Given several servers of one deployment (``--server A,B``), it
moves to the next when its server's session ends or an attempt fails, waiting only once every
server failed (``server_choice.ServerChoice``); the new server answers the hello with the node's
stored virtual IP and fresh snapshots of its networks, and a ping round trip right after the hello
tells the daemon when those snapshots are complete (``on_synced``), so it can drop what the server
no longer lists without tearing tunnels down in between. A node the server has not stored yet proves work on its key when
the hello reply asks for it (``identity_work``): computed off the loop as soon as the hello is
answered, cached in the home beside the key, and sent with the first create or join.
"""

from __future__ import annotations

import asyncio
from collections import deque
import logging
import socket
from typing import Awaitable, Callable

from overlay.hostport import parse_hostport  # noqa: F401  (re-exported: callers import it from here)
from overlay import crypto
from overlay.control import identity_proof
from overlay.control.channel import Channel, Handshaked, Message, ProtocolError
from overlay.control.messages import PROTOCOL_VERSION, RequestError
from overlay.node.home import Home, ServerKeyChanged
from overlay.node.server_choice import BACKOFF_MAX, BACKOFF_MIN, FATAL_RETRY, ServerChoice  # noqa: F401
from overlay.node.server_list import parse_servers, server_text

log = logging.getLogger("overlay.node")

PING_INTERVAL = 15.0
REQUEST_TIMEOUT = 20.0
CONNECT_TIMEOUT = 10.0


class NotConnected(Exception):
    pass


class ControlClient:
    def __init__(self, home: Home, server: str, name: str, private_key: bytes, *,
                 via_proxy: str | None = None,
                 on_event: Callable[[dict], None] = lambda ev: None,
                 on_reset: Callable[[], None] = lambda: None,
                 on_session: Callable[[dict], Awaitable[None] | None] = lambda hello: None,
                 on_synced: Callable[[], None] = lambda: None):
        self.home = home
        self.servers = parse_servers(server)          # one or several: "A:P,B:P"
        self.server_list = server_text(self.servers)  # as remembered
        self.choice = ServerChoice(self.servers, backoff_min=BACKOFF_MIN, backoff_max=BACKOFF_MAX,
                                   fatal_retry=FATAL_RETRY)
        self.errors: dict[str, str | None] = dict.fromkeys(self.servers)   # each server's last failure
        self.server = self.servers[0]                 # the server in use, or tried next
        self.host, self.port = parse_hostport(self.server)
        self.server_ip: str | None = None
        self.name = name
        self.hello_extra: dict = {}   # more hello fields (the kernel interface kind)
        # the member lists this node holds, per network (hello ``sync``: overlay/control/resync.py);
        # None: the node asks for full snapshots, as a node from before resynchronisation
        self.hello_sync: Callable[[], dict] | None = None
        self.private_key = private_key
        self.via_proxy = via_proxy
        self.on_event = on_event
        self.on_reset = on_reset
        self.on_session = on_session
        self.on_synced = on_synced
        self.state = "connecting"
        self.last_error: str | None = None
        self._retry = asyncio.Event()
        self.hello: dict | None = None
        self.server_key: bytes | None = None
        self._channel: Channel | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 1
        self.connects = 0
        self.retry_delays: deque[float] = deque(maxlen=16)   # the last waits before reconnecting
        self._proof: asyncio.Future | None = None     # identity proof for a server that asks one
        self._proof_bits = 0

    # ------------------------------------------------------------------ public
    @property
    def connected(self) -> bool:
        return self.state == "connected"

    async def request(self, msg: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
        if not self.connected:
            raise NotConnected(f"not connected to the server {self.server} ({self.last_error or self.state})")
        if msg.get("t") in ("create", "join") and self._proof is not None:
            msg = {**msg, "proof": await asyncio.shield(self._proof)}
            if not self.connected:
                raise NotConnected(f"lost the server {self.server} while proving work on this node's key")
        return await self._request(msg, timeout)

    def post(self, msg: dict) -> None:
        """Send without waiting for the answer (an error answer is logged); dropped if offline."""
        ch = self._channel
        if ch is None or not ch.established or self._writer is None:
            return
        if msg.get("t") != "relay":  # relay frames are never answered and carry id 0
            msg = {**msg, "id": self._next_id}
            self._next_id += 1
        try:
            ch.send(msg)
        except ProtocolError as e:
            log.warning("cannot send %s: %s", msg.get("t"), e)
            return
        self._writer.write(ch.data_to_send())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            fatal = False
            connects = self.connects
            self._use(self.choice.current)
            try:
                await self._session()   # returns only by raising why the session ended
            except ServerKeyChanged as e:
                fatal = True
                self._fail(str(e), level=logging.ERROR)
            except RequestError as e:  # hello refused
                fatal = True
                self._fail(f"server refused this node: {e.message}", level=logging.ERROR)
            except (OSError, asyncio.TimeoutError, ProtocolError, ConnectionError, NotConnected) as e:
                self._fail(self._describe(e))
            except Exception as e:  # python-socks errors and anything unexpected: keep the daemon alive
                self._fail(f"{type(e).__name__}: {e}")
            self.errors[self.server] = self.last_error
            # a session was established: this outage starts its back-off afresh (on the next server)
            established = self.connects != connects
            delay = self.choice.ended(loop.time(), established=established, fatal=fatal, why=self.last_error or "")
            if self.choice.current != self.server:
                log.log(logging.INFO if established else logging.DEBUG, "moving from server %s to %s%s", self.server,
                        self.choice.current, f" in {delay:.1f} s" if delay else "")
            self.retry_delays.append(delay)
            if not delay:
                continue
            self._retry.clear()
            try:
                await asyncio.wait_for(self._retry.wait(), delay)
            except asyncio.TimeoutError:
                pass

    def _use(self, server: str) -> None:
        """Connect to ``server`` (of ``servers``) from now on."""
        if server != self.server:
            self.server = server
            self.host, self.port = parse_hostport(server)
            self.server_ip = None

    def servers_status(self) -> list[dict]:
        """Each server of the list: its address, whether it is the one in use, its last failure."""
        return [{"address": s, "in_use": s == self.server and self.connected, "error": self.errors.get(s)}
                for s in self.servers]

    def retry_now(self) -> None:
        """Skip the wait before the next connection attempt (after `overlay forget-server`)."""
        self._retry.set()

    def _describe(self, e: BaseException) -> str:
        """A connection failure in words, with what to check."""
        where = f"{self.host}:{self.port}"
        if self.via_proxy:
            where += f" through {self.via_proxy.split('@')[-1]}"
        if isinstance(e, ConnectionRefusedError):
            return f"cannot reach the server at {where}: connection refused (is `overlay server` running there?)"
        if isinstance(e, socket.gaierror):
            return f"cannot resolve {self.host!r} (check --server)"
        if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
            return f"no answer from the server at {where} within {CONNECT_TIMEOUT:g} s (firewall, wrong address?)"
        if isinstance(e, OSError) and e.strerror:
            return f"cannot reach the server at {where}: {e.strerror.lower()}"
        return f"lost the server at {where}: {e}" if str(e) else f"lost the server at {where} ({type(e).__name__})"

    def _fail(self, message: str, level: int = logging.WARNING) -> None:
        self.state = "error" if level >= logging.ERROR else "connecting"
        if message != self.errors.get(self.server):     # once per server and cause (several take turns)
            log.log(level, "server %s: %s", self.server, message)
        self.last_error = message

    # ------------------------------------------------------------------ one session
    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.via_proxy:
            from python_socks.async_.asyncio import Proxy
            proxy = Proxy.from_url(self.via_proxy)
            sock = await proxy.connect(dest_host=self.host, dest_port=self.port, timeout=CONNECT_TIMEOUT)
            return await asyncio.open_connection(sock=sock)
        return await asyncio.wait_for(asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT)

    async def _session(self) -> None:
        reader, writer = await self._open()
        self._writer = writer
        # the server's address this connection reached (its UDP port is there too); through a
        # proxy only the proxy's is known, and the name is resolved again for UDP
        peer = None if self.via_proxy else writer.get_extra_info("peername")
        self.server_ip = peer[0] if peer else None
        ch = self._channel = Channel(initiator=True, static_private=self.private_key)
        reader_task = None
        try:
            writer.write(ch.data_to_send())
            # handshake: read until established
            while not ch.established:
                data = await asyncio.wait_for(reader.read(65536), CONNECT_TIMEOUT)
                if not data:
                    raise ConnectionError("server closed the connection during the handshake")
                ch.receive_data(data)
                while (ev := ch.next_event()) is not None:
                    if isinstance(ev, Handshaked):
                        if self.home.check_server_key(self.server, ev.remote_static, self.servers):
                            log.info("pinned the key of server %s (first contact)", self.server)
                        self.server_key = ev.remote_static
                    else:
                        self._dispatch(ev)
                writer.write(ch.data_to_send())
            reader_task = asyncio.get_running_loop().create_task(self._read_loop(reader))
            self.state = "hello"
            self.on_reset()  # the server answers hello with fresh snapshots of our networks
            hello = await self._hello()
            self.hello = hello
            self._prove(hello)
            self.state = "connected"
            self.last_error = None
            self.errors[self.server] = None
            self.connects += 1
            self.choice.connected(asyncio.get_running_loop().time())
            log.info("connected to %s as %s (%s)", self.server, hello["name"],
                     hello["ip"] or "no address before its first network")
            r = self.on_session(hello)
            if asyncio.iscoroutine(r):
                await r
            # the server sent the snapshots of our networks before it answers this (one connection's
            # requests are answered in order): now the daemon may drop what it no longer lists
            await self._request({"t": "ping"}, REQUEST_TIMEOUT)
            self.on_synced()
            while True:
                done, _ = await asyncio.wait({reader_task}, timeout=PING_INTERVAL)
                if done:
                    reader_task.result()  # raises why the connection ended
                    raise ConnectionError("server closed the connection")
                await self._request({"t": "ping"}, REQUEST_TIMEOUT)
        finally:
            if self.state == "connected":
                self.state = "connecting"
            if reader_task is not None:
                reader_task.cancel()
            self._fail_pending("connection to the server was lost")
            self._channel = None
            writer.close()

    async def _hello(self) -> dict:
        msg = {"t": "hello", "name": self.name, "version": PROTOCOL_VERSION, **self.hello_extra}
        if self.hello_sync is not None:
            msg["sync"] = self.hello_sync()
        while True:
            try:
                return await self._request(msg, REQUEST_TIMEOUT)
            except RequestError as e:
                # a server older than capabilities or resynchronisation refuses the field: hello
                # again without it (its peers then treat this node as one without capabilities,
                # which every node handles; it sends full snapshots)
                unknown = [f for f in ("caps", "sync") if f in msg and f"'{f}'" in e.message]
                if e.code != "bad_request" or "unexpected field" not in e.message or not unknown:
                    raise
            for f in unknown:
                log.info("server %s does not know %s: hello without them", self.server,
                         {"caps": "node capabilities", "sync": "resynchronisation"}[f])
                del msg[f]

    def _prove(self, hello: dict) -> None:
        """Start the proof of work the server asks of a node it has not stored (once per key and
        difficulty: the result is cached in the home)."""
        bits = hello.get("identity_work") or 0
        if not isinstance(bits, int) or not 0 < bits <= identity_proof.MAX_BITS or hello.get("ip") is not None:
            return
        p = self._proof
        if p is not None and self._proof_bits >= bits and (
                not p.done() or (not p.cancelled() and p.exception() is None)):
            return                      # under way, or done: reused
        log.info("proving work on this node's key for the server (%d bits, once)", bits)
        self._proof_bits = bits
        self._proof = asyncio.ensure_future(asyncio.to_thread(
            identity_proof.load_or_solve, self.home.path / identity_proof.FILE,
            crypto.public_key(self.private_key), bits))

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(NotConnected(why))

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("server closed the connection")
                ch = self._channel
                ch.receive_data(data)
                while (ev := ch.next_event()) is not None:
                    self._dispatch(ev)
        except (OSError, ProtocolError) as e:   # ConnectionError is an OSError
            # requests in flight (a ping, hello) fail now instead of waiting out their timeout, and
            # so do those made from now on
            self._channel = None
            self._fail_pending(f"connection to the server was lost: {e}")
            raise

    def _dispatch(self, ev) -> None:
        if not isinstance(ev, Message):
            return
        body = ev.body
        t = body.get("t")
        if t in ("ok", "error"):
            fut = self._pending.pop(body.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(body)
            elif t == "error":
                log.warning("server: %s", body.get("message"))
            return
        try:
            self.on_event(body)
        except Exception:
            log.exception("handling server event %s", t)

    async def _request(self, msg: dict, timeout: float) -> dict:
        ch = self._channel
        if ch is None:
            raise NotConnected("not connected")
        rid = self._next_id
        self._next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        ch.send({**msg, "id": rid})
        self._writer.write(ch.data_to_send())
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(rid, None)
            raise NotConnected(f"the server did not answer within {timeout:.0f} s") from None
        if reply["t"] == "error":
            raise RequestError(reply.get("code", "error"), reply.get("message", "request refused"))
        return reply
