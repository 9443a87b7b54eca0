"""asyncio glue of the mediation server: TCP control port + UDP port with the same number.

Thin by design: each TCP connection is a ``Channel`` (Noise XX + framing) feeding validated
requests into the sans-I/O ``Mediator``; its ``outgoing`` events are written to whichever
connections are online. Bounds: handshake deadline, idle deadline, per-connection request rate,
write-buffer cap (a node that does not read is dropped and resyncs when it reconnects).
Connections are capped per source address and in total, below the descriptor limit (raised to
its hard limit at start); under pressure the unauthenticated and the idle strangers are shed
first (overlay/server/admission.py). Every line one connection can trigger is rate limited.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import resource
import socket
import time
from pathlib import Path

from overlay import crypto
from overlay.control import identity_proof, passwords
from overlay.control.channel import Channel, Handshaked, Message, ProtocolError
from overlay.control.messages import RequestError, error, key_from_text, key_to_text, ok, validate_request
from overlay.nat import stun
from overlay.nat.candidate import format_addr
from overlay.ratelog import LogLimiter
from overlay.relay import frames
from overlay.relay.server import DEFAULT_RATE, RelayServer, relay_secret
from overlay.server import datadir, fanout
from overlay.server.admission import DEFAULT_MAX_CONNS, DEFAULT_PER_SOURCE, Admission, max_conns_for
from overlay.server.mediator import DEFAULT_IDENTITY_BITS, DEFAULT_NEW_NODES_PER_HOUR, DEFAULT_POOL, Mediator
from overlay.server.store import Store, StoreHooks
from overlay.server.turn_credentials import TurnSettings, node_id
from overlay.tokenbucket import TokenBucket

log = logging.getLogger("overlay.server")

HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 45.0            # nodes ping every 15 s
RATE = 20.0                    # requests per second per connection, sustained
BURST = 60.0
ABUSE_LIMIT = 200              # refused requests before the connection is closed
MAX_WRITE_BUFFER = 4 * 1024 * 1024
ACCEPT_BATCH = 32              # connections accepted per loop turn
FD_SLACK = 32                  # descriptors of shed connections not closed yet (see _accept_ready)
ACCEPT_PAUSE = 0.5             # after accept() itself fails (EMFILE, ENOBUFS ...)
TURN_EVENTS = 16_000           # events held for the end of a loop turn at most (then delivered at once)
LISTEN_BACKLOG = 4096          # every node reconnects at once after a restart (the kernel caps it: somaxconn)


def load_or_create_key(path: Path) -> bytes:
    if path.exists():
        key = bytes.fromhex(path.read_text().strip())
        if len(key) != 32:
            raise SystemExit(f"{path}: not a 32-byte hex key")
        return key
    key = crypto.generate_private_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


class ControlConnection(asyncio.Protocol):
    def __init__(self, server: "MediationServer"):
        self.server = server
        self.channel = Channel(initiator=False, static_private=server.private_key)
        self.transport: asyncio.Transport | None = None
        self.key: bytes | None = None      # authenticated node key
        self.registered = False            # hello accepted
        self.last_rx = self.opened = time.monotonic()
        self.requests = TokenBucket(RATE, BURST, self.opened)   # requests per connection (relay frames free)
        self.refused = 0
        self.peer = self.source = "?"
        self.closed = False
        self._queue: asyncio.Queue | None = None  # serialises requests that await (password hashing)
        self._worker: asyncio.Task | None = None

    # ------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.source = peer[0] if peer else "?"
        server = self.server
        admitted, victims = server.admission.admit(self, self.source, server.still_stranger)
        for v in victims:
            server.rlog.log(log, logging.INFO, "%s: shed to admit a new connection (%d connections)",
                            v.peer, len(server.admission))
            v.close(error(None, "busy", "server busy: connection shed for a newcomer"))
            v.transport.abort()
        if not admitted:
            server.rlog.log(log, logging.WARNING, "%s: refused: connection limit reached (%d in total, "
                            "at most %d per address)", self.peer, len(server.admission),
                            server.admission.per_source)
            self.closed = True
            transport.abort()
            return
        server.connections.add(self)
        self._queue = asyncio.Queue(maxsize=16)
        self._worker = asyncio.get_running_loop().create_task(self._work())

    def data_received(self, data: bytes):
        self.last_rx = time.monotonic()
        try:
            self.channel.receive_data(data)
            while (ev := self.channel.next_event()) is not None:
                if isinstance(ev, Handshaked):
                    self.key = ev.remote_static
                elif isinstance(ev, Message):
                    self._on_message(ev.body)
        except ProtocolError as e:
            self.server.rlog.log(log, logging.INFO, "%s: protocol error: %s", self.peer, e)
            self.close(error(None, "protocol", str(e)) if self.channel.established else None)
            return
        except Exception:  # a bug must cost one connection, never the server
            self.server.rlog.log(log, logging.ERROR, "%s: internal error on input", self.peer, exc_info=True)
            self.close(error(None, "internal", "internal server error") if self.channel.established else None)
            return
        self.flush()

    def connection_lost(self, exc):
        self.closed = True
        self.server.socket_closed()
        self.server.admission.closed(self)
        self.server.connections.discard(self)
        if self._worker:
            self._worker.cancel()
        self.server.unregister(self)

    # ------------------------------------------------------------ requests
    def _on_message(self, body: dict) -> None:
        now = time.monotonic()
        rid = body.get("id") if isinstance(body.get("id"), int) else None
        if body.get("t") == "relay" and self.registered:
            self.server.relay_over_tcp(self, body)  # byte-capped by the relay, never answered
            return
        if not self.requests.take(now):
            self._refuse(error(rid, "rate_limited", "too many requests; slow down"))
            return
        try:
            msg = validate_request(body)
        except RequestError as e:
            self._refuse(error(rid, e.code, e.message))
            return
        if not self.registered and msg["t"] != "hello":
            self._refuse(error(rid, "hello_first", "send hello before any other request"))
            return
        try:
            self._queue.put_nowait(msg)
        except asyncio.QueueFull:
            self._refuse(error(rid, "rate_limited", "too many requests in flight; slow down"))

    def _refuse(self, reply: dict) -> None:
        self.refused += 1
        self.send(reply)
        if self.refused > ABUSE_LIMIT:
            self.close(error(None, "abuse", "too many refused requests; closing"))

    async def _work(self) -> None:
        while True:
            msg = await self._queue.get()
            try:
                reply = await self.server.dispatch(self, msg)
            except RequestError as e:
                reply = error(msg["id"], e.code, e.message)
            except Exception:  # a bug must not take the server down
                self.server.rlog.log(log, logging.ERROR, "internal error handling %s", msg.get("t"), exc_info=True)
                reply = error(msg["id"], "internal", "internal server error")
            if self.closed:
                return
            self.send(reply)
            self.server.deliver(self)   # this reply and the events it caused, written at the turn's end

    # ------------------------------------------------------------ output
    def send(self, msg: dict) -> None:
        if self.closed or not self.channel.established:
            return
        try:
            self.channel.send(msg)
        except ProtocolError as e:
            self.server.rlog.log(log, logging.ERROR, "cannot send %s: %s", msg.get("t"), e)

    def send_encoded(self, data: bytes) -> None:
        if not self.closed and self.channel.established:
            self.channel.send_encoded(data)

    def flush(self) -> None:
        if self.closed or self.transport is None:
            return
        data = self.channel.data_to_send()
        if data:
            if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
                self.server.rlog.log(log, logging.WARNING, "%s: not reading its messages; dropping the connection",
                                     self.peer)
                self.transport.abort()
                return
            self.transport.write(data)

    def close(self, final: dict | None = None) -> None:
        if self.closed:
            return
        if final is not None:
            self.send(final)
        self.flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class MediationServer:
    def __init__(self, data_dir: Path, host: str | list[str], port: int, pool: str = DEFAULT_POOL,
                 relay_rate: float = DEFAULT_RATE, stun_alt_ip: str | None = None,
                 max_conns: int = DEFAULT_MAX_CONNS, per_source: int = DEFAULT_PER_SOURCE,
                 identity_bits: int = DEFAULT_IDENTITY_BITS, new_nodes_per_hour: int = DEFAULT_NEW_NODES_PER_HOUR,
                 turn: TurnSettings | None = None, store: StoreHooks | None = None,
                 relay_address: str | None = None):
        self.data_dir = Path(data_dir)
        # this instance's relay as nodes reach it (``--relay-address``; default: the address each
        # node's control connection reached): other instances hand it to their nodes (``pg_sync``)
        self.relay_addr = relay_address
        self.turn = turn        # a TURN server whose credentials the nodes get (``turn_credentials``)
        datadir.secure(self.data_dir)
        self.private_key = load_or_create_key(self.data_dir / "server.key")
        self.public_key = crypto.public_key(self.private_key)
        if store is None:                   # the default: SQLite in the data directory
            datadir.create_private(self.data_dir / "overlay.db")
            store = Store(self.data_dir / "overlay.db")
            datadir.secure(self.data_dir)   # the -wal and -shm files SQLite just created
        self.store = store                  # or a PgStore, opened by run_server
        self.sync = None                    # with PostgreSQL: the other instances (overlay/server/pg_sync.py)
        self.mediator = Mediator(self.store, pool, identity_bits=identity_bits, new_nodes_per_hour=new_nodes_per_hour)
        self._peer_cache: dict[bytes, tuple[float, set[bytes]]] = {}
        self.relay = RelayServer(self._may_relay, rate=relay_rate, secret=relay_secret(self.private_key))
        self.mediator.udp_addr_of = self._udp_addr_of
        # one or more listen addresses (e.g. 0.0.0.0 and ::), all on one port; IPv6 sockets are
        # IPv6 only, so an IPv4 and an IPv6 address (wildcards included) can both be given
        self.hosts = [host] if isinstance(host, str) else list(host)
        self.host, self.port = self.hosts[0], port
        self.connections: set[ControlConnection] = set()
        self.admission = Admission(max_conns, per_source)
        self.rlog = LogLimiter()
        self.closing = False
        self.sessions: dict[bytes, ControlConnection] = {}
        self._arriving: dict[bytes, list[dict]] = {}   # hello being stored: events held for the node
        self._hash_slots = asyncio.Semaphore(2)
        self._listener: socket.socket | None = None
        self._listeners: list[socket.socket] = []
        self._open_sockets = 0         # accepted and not closed yet (shed ones close a loop turn later)
        self._accept_paused = False
        self._udp = None
        self._stun_extra: list = []
        self.stun_ports: list[int] = []
        self.stun_alt_ip = stun_alt_ip
        self.udp_transport: asyncio.DatagramTransport | None = None
        self.udp_transport6: asyncio.DatagramTransport | None = None   # relay over IPv6
        self._reaper: asyncio.Task | None = None
        self._dirty: set[ControlConnection] = set()   # written to at the end of this loop turn
        self._turn_end: asyncio.Handle | None = None
        self._presence_timer: asyncio.TimerHandle | None = None   # held presence changes (presence.py)
        self._presence_at = 0.0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host in self.hosts:
            listener = _tcp_listener(host, self.port)
            self._listeners.append(listener)
            self.port = listener.getsockname()[1]   # port 0: every address gets the first one's
            loop.add_reader(listener.fileno(), lambda s=listener: self._accept_ready(s))
        self._listener = self._listeners[0]
        # With a second STUN address the wildcard socket and one bound to that address share the
        # port (SO_REUSEADDR): requests to the alternate IP must be answered *from* it, or every
        # filtering NAT drops the answer.
        reuse = bool(self.stun_alt_ip)
        for host in self.hosts:
            tr, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), sock=_udp_socket(host, self.port, reuse))
            if host == self.hosts[0]:
                self._udp = tr
            else:
                self._stun_extra.append(tr)
        if self.stun_alt_ip:
            tr, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self, relay=False), sock=_udp_socket(self.stun_alt_ip, self.port, True))
            self._stun_extra.append(tr)
        self.stun_ports = [self.port]
        # Two more STUN-only ports: a node compares the mappings its NAT gives it toward three
        # destinations to learn whether they vary by destination and whether ports run in sequence.
        for extra in (self.port + 1, self.port + 2):
            try:
                for host in self.hosts:
                    tr, _ = await loop.create_datagram_endpoint(
                        lambda: _UdpProtocol(self, relay=False), sock=_udp_socket(host, extra, False))
                    self._stun_extra.append(tr)
            except OSError as e:
                log.warning("STUN port %d unavailable (%s): NAT classification will be coarser", extra, e)
                continue
            self.stun_ports.append(extra)
        self._reaper = loop.create_task(self._reap())
        log.info("mediation server on %s (tcp+udp), key %s", self.listening(), key_to_text(self.public_key))

    def listening(self) -> str:
        return ", ".join(format_addr((h, self.port)) for h in self.hosts)

    def udp_addresses(self, conn: "ControlConnection") -> list[str]:
        """The server's UDP endpoints a node may use, for the hello reply: every listen address
        that is not a wildcard, and the address the node's control connection reached (so a node
        learns the server's address in the other family, for STUN over IPv6 or IPv4)."""
        out = [format_addr((h, self.port)) for h in self.hosts if h not in ("0.0.0.0", "::", "")]
        here = conn.transport.get_extra_info("sockname") if conn.transport is not None else None
        if here and (text := format_addr((here[0], self.port))) not in out:
            out.append(text)
        return out

    def relay_address(self, conn: "ControlConnection") -> str | None:
        """This instance's relay (UDP) as ``conn``'s node reaches it: ``--relay-address``, else the
        address its control connection reached, on the UDP port (announced with its hello to the
        other instances, which hand it to their nodes in its member record)."""
        if self.relay_addr:
            return self.relay_addr
        here = conn.transport.get_extra_info("sockname") if conn.transport is not None else None
        return format_addr((here[0], self.port)) if here else None

    def send_udp(self, data: bytes, addr: tuple) -> None:
        """A relay datagram out of the socket of ``addr``'s family (a node may be on either)."""
        tr = self.udp_transport6 if ":" in addr[0] else self.udp_transport
        if tr is not None:
            tr.sendto(data, addr)

    async def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        self.closing = True
        if self._presence_timer is not None:
            self._presence_timer.cancel()
        if self._listener:
            self._pause_accept()
            for listener in self._listeners:
                listener.close()
        for c in list(self.connections):
            c.close()
        await asyncio.sleep(0)  # let connection_lost run while the store is still open
        if self._udp:
            self._udp.close()
        for tr in self._stun_extra:
            tr.close()
        if self.sync is not None:
            await self.sync.close()
        await self.store.aclose()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            self.relay.expire(now)
            self.mediator.expire(time.time())
            if self.sync is not None:
                try:
                    await self.sync.check_liveness()
                except Exception as e:     # the database away for a moment: next second
                    self.rlog.log(log, logging.WARNING, "instance liveness check failed: %s", e)
            for c in list(self.connections):
                if not c.registered and now - c.opened > HANDSHAKE_TIMEOUT:
                    self.rlog.log(log, logging.INFO, "%s: no hello within %.0f s; closing", c.peer, HANDSHAKE_TIMEOUT)
                    c.close()
                    c.transport.abort()
                elif c.registered and now - c.last_rx > IDLE_TIMEOUT:
                    self.rlog.log(log, logging.INFO, "%s: silent for %.0f s; closing", c.peer, now - c.last_rx)
                    c.close()
                    c.transport.abort()

    # ------------------------------------------------------------ accepting
    # Our own accept loop rather than loop.create_server: asyncio accepts up to its backlog per
    # turn before any connection_made runs, and a shed connection's descriptor is closed a turn
    # later, so at the descriptor limit it would fail accept() (a traceback each time) however
    # early the server sheds. Here accepting stops while max_conns + FD_SLACK sockets are open
    # and resumes as closed ones are released; new connections wait in the kernel's backlog.
    def _accept_ready(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            if self._open_sockets >= self.admission.max_conns + FD_SLACK:
                self._pause_accept()
                return
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:     # out of descriptors or memory: pause instead of spinning
                self.rlog.log(log, logging.ERROR, "cannot accept connections: %s; pausing %.1f s",
                              e.strerror or e, ACCEPT_PAUSE)
                self._pause_accept()
                loop.call_later(ACCEPT_PAUSE, self._resume_accept)
                return
            self._open_sockets += 1
            sock.setblocking(False)
            loop.create_task(self._connect_accepted(sock))

    async def _connect_accepted(self, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: ControlConnection(self), sock)
        except OSError:
            sock.close()
            self.socket_closed()

    def socket_closed(self) -> None:
        self._open_sockets -= 1
        if self._accept_paused and self._open_sockets < self.admission.max_conns + FD_SLACK:
            self._resume_accept()

    def _pause_accept(self) -> None:
        if not self._accept_paused and self._listener is not None:
            for listener in self._listeners:
                asyncio.get_running_loop().remove_reader(listener.fileno())
            self._accept_paused = True

    def _resume_accept(self) -> None:
        if self._accept_paused and not self.closing and self._listener is not None:
            self._accept_paused = False
            for listener in self._listeners:
                asyncio.get_running_loop().add_reader(listener.fileno(), lambda s=listener: self._accept_ready(s))

    # ------------------------------------------------------------ glue to the mediator
    async def dispatch(self, conn: ControlConnection, msg: dict) -> dict:
        m = self.mediator
        now = time.time()
        t = msg["t"]
        if t == "hello":
            if conn.registered:
                raise RequestError("bad_request", "hello already received")
            old = self.sessions.get(conn.key)
            if old is not None and old is not conn:
                old.close(error(None, "replaced", "this node connected again from elsewhere"))
                self.unregister(old)
            # events for this node while its hello is being stored (other requests, departures,
            # other instances) wait for its session, after what the hello itself caused
            self._arriving[conn.key] = []
            try:
                reply = await self._apply(conn, msg, lambda: m.hello(conn.key, msg, now, source=conn.source))
            finally:
                held = self._arriving.pop(conn.key, [])
            reply["udp_token"] = base64.b64encode(self.relay.token_for(conn.key)).decode()
            reply["udp_port"] = self.port
            reply["stun_ports"] = self.stun_ports
            if self.stun_alt_ip:
                reply["stun_alt_ip"] = self.stun_alt_ip
            reply["udp_addrs"] = self.udp_addresses(conn)
            if self.turn is not None:
                reply["turn"] = self.turn.credentials(node_id(conn.key), now)
            conn.registered = True
            self.admission.registered(conn, bool(reply["networks"]) or not self.still_stranger(conn))
            self.sessions[conn.key] = conn
            key = conn.key
            self.relay.tcp_sinks[key] = lambda src, payload, c=conn: self._tcp_deliver(c, src, payload)
            m.outgoing.extend((key, ev) for ev in held)
            self.rlog.log(log, logging.INFO, "%s: node %s (%s) online", conn.peer, reply["name"], reply["ip"])
            return reply
        if t != "ping":
            self.admission.touch(conn)
        if t == "turn":     # fresh TURN credentials (the node asks at half their lifetime)
            return ok(msg["id"], turn=self.turn.credentials(node_id(conn.key), now) if self.turn else None)
        try:
            return await self._dispatch(conn, msg, now)
        finally:
            if t in ("create", "join", "leave"):
                self.admission.registered(conn, not self.still_stranger(conn))
            self.membership_changed(t)

    def still_stranger(self, conn: ControlConnection) -> bool:
        """Said hello (or not even that) but belongs to no network and waits to join none."""
        key = conn.key
        return key is None or not (self.store.networks_of(key) or self.store.pending_networks_of(key))

    async def _dispatch(self, conn: ControlConnection, msg: dict, now: float) -> dict:
        m = self.mediator
        t = msg["t"]
        if t == "create":
            m.create_precheck(conn.key, msg, now)
            await self._check_proof(conn, msg, now)
            async with self._hash_slots:
                h = await asyncio.to_thread(passwords.hash_password, msg["password"])
            return await self._apply(conn, msg, lambda: m.handle(conn.key, msg, time.time(), password_hash=h), h)
        if t == "admin" and msg["action"] == "password":
            m.admin_precheck(conn.key, msg)
            async with self._hash_slots:
                h = await asyncio.to_thread(passwords.hash_password, msg["password"])
            return await self._apply(conn, msg, lambda: m.handle(conn.key, msg, time.time(), password_hash=h))
        if t == "join":
            stored = m.join_precheck(conn.key, msg, now)
            await self._check_proof(conn, msg, now)
            async with self._hash_slots:
                good = await asyncio.to_thread(passwords.verify_password, stored, msg["password"])
            if not good and (delay := m.failure_delay(msg["network"], time.time())):
                await asyncio.sleep(delay)      # a network under guessing: failures answer slowly
            if not good:
                return m.handle(conn.key, msg, time.time(), password_ok=good)
            return await self._apply(conn, msg, lambda: m.handle(conn.key, msg, time.time(), password_ok=good))
        return await self._apply(conn, msg, lambda: m.handle(conn.key, msg, now))

    async def _apply(self, conn: ControlConnection, msg: dict, handle, password_hash: bytes | None = None) -> dict:
        """Run the mediator on ``msg`` between the store's hooks: ``prepare`` (what the database
        decides across server instances), ``undo`` if the mediator refuses, ``flush`` before the
        reply (its changes are stored). SQLite's hooks return at once without yielding."""
        now = time.time()
        claim = await self.store.prepare(self.mediator, conn.key, msg, now, password_hash)
        out = self.mediator.outgoing
        before = len(out)
        try:
            reply = handle()
        except RequestError:
            await self.store.undo(claim)
            raise
        if self.sync is not None:
            self.sync.accepted(conn.key, msg, now, reply, password_hash, conn.source,
                               relay=self.relay_address(conn) if msg["t"] == "hello" else None)
        # the events this request caused wait for its flush: nobody hears of a change before it is
        # stored, and the requester gets its reply first (as when nothing yields here, with SQLite)
        caused = [out.pop() for _ in range(len(out) - before)][::-1]
        await self.store.flush()
        out.extend(caused)
        return reply

    def membership_changed(self, t: str) -> None:
        if t in ("create", "join", "leave", "admin"):
            # who may relay to whom may have changed (a ban, a kick, a type, hub or gateway change,
            # a new member): the relay must not forward on an old answer
            self._peer_cache.clear()

    async def _check_proof(self, conn: ControlConnection, msg: dict, now: float) -> None:
        """A new node's proof of work on its key, checked off the loop (one 8 MiB scrypt)."""
        proof = self.mediator.proof_to_check(conn.key, msg, now)
        if proof is not None:
            async with self._hash_slots:
                good = await asyncio.to_thread(identity_proof.check, conn.key, proof, self.mediator.identity_bits)
            self.mediator.proof_checked(conn.key, good, time.time())

    def unregister(self, conn: ControlConnection) -> None:
        if self.closing:
            return
        if conn.key is not None and self.sessions.get(conn.key) is conn:
            del self.sessions[conn.key]
            self.relay.tcp_sinks.pop(conn.key, None)
            self._peer_cache.pop(conn.key, None)
            if self.sync is None:
                self.mediator.disconnect(conn.key, time.time())
            elif not self.sync.online_elsewhere(conn.key):   # not moved to another instance
                self.mediator.disconnect(conn.key, time.time())
                self.sync.bye(conn.key, time.time())
            self.rlog.log(log, logging.INFO, "%s: node offline", conn.peer)
            self.deliver()

    # ------------------------------------------------------------ relay
    def _udp_addr_of(self, key: bytes) -> tuple | None:
        """The address a node registered at our relay from (its server-reflexive address, for its
        candidates); not for a node online on another instance (its registration here, for a pair
        relayed through us, shows its mapping toward us, not toward its own server)."""
        if self.sync is not None and self.sync.online_elsewhere(key):
            return None
        return self.relay.udp_address(key)

    def _may_relay(self, src: bytes, dst: bytes) -> bool:
        """Relay only between nodes that may reach each other (network types); cached for a few seconds per
        source, and forgotten at every membership or network-type change (``dispatch``). With several
        instances, only pairs with at least one end connected here: a node of another instance
        registers here for its peers on this instance (overlay/node/server_path.py), and this relay
        serves no pair of other instances' nodes."""
        if self.sync is not None and src not in self.sessions and dst not in self.sessions:
            return False
        now = time.monotonic()
        hit = self._peer_cache.get(src)
        if hit is None or now - hit[0] > 5.0:
            if len(self._peer_cache) > 100_000:
                self._peer_cache.clear()
            hit = self._peer_cache[src] = (now, self.mediator.reachable_peers(src))
        return dst in hit[1]

    def relay_over_tcp(self, conn: ControlConnection, body: dict) -> None:
        """A node without UDP sends relay payloads on its control connection."""
        try:
            dst = key_from_text(body["to"])
            payload = base64.b64decode(body["data"], validate=True)
        except (KeyError, TypeError, ValueError):
            return
        if not payload or len(payload) > frames.MAX_PAYLOAD:
            return
        out: list = []
        self.relay.forward(conn.key, dst, payload, time.monotonic(), out)
        for data, addr in out:
            self.send_udp(data, addr)

    def _tcp_deliver(self, conn: ControlConnection, src: bytes, payload: bytes) -> None:
        conn.send({"t": "relay", "from": key_to_text(src), "data": base64.b64encode(payload).decode()})
        conn.flush()

    def deliver(self, conn: ControlConnection | None = None) -> None:
        """Deliver the mediator's events (and flush ``conn``) at the end of this loop turn: every
        request handled in the turn is batched, so a member gets one message per network and
        turn however many presence changes concern it, and one write (overlay/server/fanout.py)."""
        if conn is not None:
            self._dirty.add(conn)
        if len(self.mediator.outgoing) > TURN_EVENTS:   # a storm: memory stays bounded
            self._deliver_now()
        if self._turn_end is None:
            self._turn_end = asyncio.get_running_loop().call_soon(self._end_turn)

    def _end_turn(self) -> None:
        self._turn_end = None
        self._deliver_now()
        self.mediator.end_turn()
        self._schedule_presence()

    def _schedule_presence(self) -> None:
        """Wake up when the mediator's held presence changes are due (overlay/server/presence.py)."""
        due = self.mediator.presence.due()
        if due is None or self.closing or (self._presence_timer is not None and self._presence_at <= due):
            return
        if self._presence_timer is not None:
            self._presence_timer.cancel()
        self._presence_at = due
        self._presence_timer = asyncio.get_running_loop().call_later(max(0.0, due - time.time()),
                                                                    self._flush_presence)

    def _flush_presence(self) -> None:
        self._presence_timer = None
        self.mediator.flush_presence(time.time())
        self.deliver()
        self._schedule_presence()

    def _deliver_now(self) -> None:
        out = self.mediator.outgoing
        if out:
            batches = fanout.coalesce(out)
            out.clear()
            enc = fanout.Encoder()
            for key, msgs in batches.items():
                c = self.sessions.get(key)
                if c is None:
                    held = self._arriving.get(key)   # its hello is being stored: sent after the reply
                    if held is not None:
                        held.extend(msgs)
                    continue
                for msg in msgs:
                    try:
                        c.send_encoded(enc.encode(msg))
                    except (ProtocolError, ValueError, TypeError) as e:
                        self.rlog.log(log, logging.ERROR, "cannot send %s: %s", msg.get("t"), e)
                self._dirty.add(c)
        dirty, self._dirty = self._dirty, set()
        for c in dirty:
            c.flush()


def _tcp_listener(host: str, port: int) -> socket.socket:
    """The control port's listening socket (same address rules as the UDP socket beside it)."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ":" in host:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(LISTEN_BACKLOG)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def _udp_socket(host: str, port: int, reuse: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if ":" in host:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


class _UdpProtocol(asyncio.DatagramProtocol):
    """The server's UDP port: STUN Binding for anyone, relay frames for registered nodes."""

    def __init__(self, server: MediationServer, relay: bool = True):
        self.server = server
        self.relay = relay
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        if self.relay:
            if transport.get_extra_info("socket").family == socket.AF_INET6:
                self.server.udp_transport6 = self.server.udp_transport6 or transport
            else:
                self.server.udp_transport = self.server.udp_transport or transport

    def datagram_received(self, data, addr):
        addr = addr[:2]
        if self.relay and frames.is_relay(data):
            for out, dst in self.server.relay.receive(data, addr, time.monotonic()):
                self.server.send_udp(out, dst)
        elif stun.is_stun(data):
            reply = stun.binding_response(data, addr)
            if reply is not None:
                self.transport.sendto(reply, addr)

    def error_received(self, exc):  # ICMP errors for departed nodes: nothing to do
        pass


def redact_url(url: str) -> str:
    """A database URL without its password, for logs."""
    head, sep, tail = url.partition("://")
    if "@" in tail.split("/")[0]:
        cred, _, rest = tail.partition("@")
        user = cred.split(":")[0]
        return f"{head}{sep}{user}@{rest}"
    return url


def raise_nofile_limit() -> int:
    """Raise the soft descriptor limit to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft if soft != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return want
    except (ValueError, OSError):
        return soft


async def run_server(data_dir: Path, host: str | list[str], port: int, pool: str = DEFAULT_POOL,
                     relay_rate: float = DEFAULT_RATE, stun_alt_ip: str | None = None,
                     max_conns: int = DEFAULT_MAX_CONNS, per_source: int = DEFAULT_PER_SOURCE,
                     identity_bits: int = DEFAULT_IDENTITY_BITS,
                     new_nodes_per_hour: int = DEFAULT_NEW_NODES_PER_HOUR, turn: TurnSettings | None = None,
                     database: str | None = None, relay_address: str | None = None) -> None:
    nofile = raise_nofile_limit()
    cap = max_conns_for(nofile, max_conns)
    if cap < max_conns:
        log.info("descriptor limit %d allows %d control connections, not %d (raise `ulimit -Hn`)",
                 nofile, cap, max_conns)
    loop = asyncio.get_running_loop()
    limiter = LogLimiter()

    def exception_handler(loop, context):
        # e.g. accept() failing for want of descriptors: one traceback per kind and second at most
        if limiter.allow(str(context.get("message")), time.monotonic())[0]:
            loop.default_exception_handler(context)
    loop.set_exception_handler(exception_handler)
    store = None
    if database is not None:
        from overlay.server.store_pg import PgStore
        try:
            store = await PgStore.open(database)
        except Exception as e:      # refused, unknown database, authentication: say so and stop
            raise SystemExit(f"cannot open database {redact_url(database)}: {type(e).__name__}: {e}") from None
        log.info("database %s (schema version %d)", redact_url(database), store.schema_version)
    try:
        server = MediationServer(data_dir, host, port, pool, relay_rate, stun_alt_ip, cap, per_source,
                                 identity_bits, new_nodes_per_hour, turn, store=store, relay_address=relay_address)
    except BaseException:
        if store is not None:
            await store.aclose()
        raise
    if store is not None:
        from overlay.server.pg_sync import InstanceSync
        server.sync = InstanceSync(server, store)
        server.mediator.relay_of = server.sync.relay_of   # peers on other instances: their relay
        await server.sync.start()
    await server.start()
    print(f"overlay server listening on {server.listening()} (tcp+udp)", flush=True)
    print(f"server key {key_to_text(server.public_key)}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()
