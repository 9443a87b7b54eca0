"""The data plane's TURN path: relaying WireGuard datagrams through a TURN server (RFC 8656).

When the mediation server names a TURN server (``overlay server --turn``), it hands this node
time-limited credentials with its hello (``overlay.server.turn_credentials``). The TURN path is
the built-in relay's stand-in, modelled the same way: a peer without a direct path has the
endpoint ``RelayAddr(key)``; datagrams for it go through the TURN allocation when a channel to
that peer's relayed address is ready, else through the built-in relay as before. WireGuard stays
end to end: the TURN server carries ciphertext only.

The allocation is made lazily, the first time a peer falls back to the relay (or a peer publishes
its own relayed address: it cannot punch to us either). Our relayed address travels like our
candidates: in the ``nat`` object of our ``endpoints`` (key ``turn``), which the server hands the
peer with each introduction (``punch``). Each side then permits the other's relayed address and
binds a channel to it, so both allocations accept each other's datagrams: A -> TURN (A's
allocation) -> B's relayed address -> TURN -> B.

A failed allocation is tried again after 30 s, doubling to 10 min. Fresh credentials (the node
asks at half their lifetime) replace the allocation shortly before the old ones expire (a TURN
server refuses a Refresh with another username): the relayed address changes, is published
again, and peers re-bind.

A member could publish any address as its relayed one, and our allocation would then forward to
it what we send that member. So a peer's relayed address is only permitted on the TURN server's
own address or our own relayed address's IP (one TURN server relays for both; coturn with several
relay IPs is not supported); other addresses are counted (``foreign``) and ignored. Sans-I/O apart from the callables it is given, like ``ServerPath``.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

from overlay.nat import turn as turn_mod
from overlay.nat.candidate import Addr, format_addr, normalize
from overlay.nat.turn import TurnClient, TurnConfig, parse_turn_url
from overlay.ratelog import LogLimiter

log = logging.getLogger("overlay.dataplane")

RETRY_INITIAL = 30.0
RETRY_MAX = 600.0
ROTATE_BEFORE = 600.0   # a new allocation with fresh credentials this long before the old ones expire


class TurnPath:
    def __init__(self, *, now: Callable[[], float], out: list, schedule_flush: Callable[[], None],
                 on_relayed: Callable[[], None], config: TurnConfig | None = None):
        self.now, self.out, self.schedule_flush, self.on_relayed = now, out, schedule_flush, on_relayed
        self.config = config or TurnConfig()
        self.label: str | None = None          # "HOST:PORT" as the server named it (for status)
        self.server: Addr | None = None        # resolved
        self.creds: dict | None = None
        self.creds_deadline: float | None = None   # loop time the newest credentials expire
        self.client: TurnClient | None = None
        self.client_deadline: float | None = None  # loop time the client's credentials expire
        self.wanted = False                    # some peer needs a relay
        self.peer_addr: dict[bytes, Addr] = {}  # peer key -> its relayed address
        self.by_addr: dict[Addr, bytes] = {}
        self.published: Addr | None = None
        self.retry_at: float | None = None
        self.backoff = RETRY_INITIAL
        self.last_error: str | None = None
        self.allocations = 0
        self.conflicts = 0                     # a relayed address claimed by two peers (the first keeps it)
        self.unknown = 0                       # data from a relayed address no peer claims
        self.foreign = 0                       # a peer's relayed address not on our TURN server
        self.rlog = LogLimiter()

    # ------------------------------------------------------------------ configuration
    def configure(self, creds: dict | None) -> None:
        """The server's TURN credentials (from hello or a renewal), or None: no TURN server."""
        now = self.now()
        if not isinstance(creds, dict) or not all(isinstance(creds.get(k), str) for k in ("url", "username", "password")):
            self._stop(now)
            self.label = self.server = self.creds = None
            return
        try:
            host, port = parse_turn_url(creds["url"])
            infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
        except (ValueError, OSError) as e:
            log.warning("TURN server %s unusable: %s", creds.get("url"), e)
            return
        v4 = [i[4] for i in infos if i[0] == socket.AF_INET]
        server = normalize((v4 or [infos[0][4]])[0][:2])
        label = format_addr((host, port))
        if server != self.server:
            self._stop(now)
            self.server, self.label = server, label
        self.creds = creds
        expires = creds.get("expires")
        self.creds_deadline = now + (expires - time.time()) if isinstance(expires, int) else None
        if self.client is None:
            self.retry_at = None
            self.backoff = RETRY_INITIAL
        self.schedule_flush()

    @property
    def configured(self) -> bool:
        return self.server is not None and self.creds is not None

    def need(self) -> None:
        """A peer has no direct path: make sure an allocation is there."""
        if self.configured and not self.wanted:
            self.wanted = True
            self.schedule_flush()

    def set_peer(self, key: bytes, relayed: Addr | None) -> None:
        """The peer's relayed address as it published it (None: it has none)."""
        old = self.peer_addr.get(key)
        if relayed is not None:
            relayed = normalize(relayed)
        if old == relayed:
            return
        if relayed is not None and self.by_addr.get(relayed, key) != key:
            self.conflicts += 1
            return
        if old is not None:
            del self.peer_addr[key]
            self.by_addr.pop(old, None)
            if self.client is not None:
                self.client.forget(old)
        if relayed is not None:
            self.peer_addr[key] = relayed
            self.by_addr[relayed] = key
            if self.client is not None and self._plausible(relayed, count=True):
                self.client.permit(relayed, self.now())
            self.need()
        self.schedule_flush()

    def _plausible(self, addr: Addr, count: bool = False) -> bool:
        """Could ``addr`` be a relayed address on our TURN server (see the module doc)?"""
        ok = (self.server is not None and addr[0] == self.server[0]) or (
            self.published is not None and addr[0] == self.published[0])
        if not ok and count:
            self.foreign += 1
        return ok

    def forget_peer(self, key: bytes) -> None:
        self.set_peer(key, None)

    # ------------------------------------------------------------------ data
    def is_server(self, addr) -> bool:
        s = self.server
        return s is not None and addr[1] == s[1] and addr[0] == s[0]

    def active(self, key: bytes) -> bool:
        """Would datagrams for ``key`` go through the TURN server now?"""
        addr = self.peer_addr.get(key)
        return self.client is not None and addr is not None and self.client.ready(addr)

    def send(self, key: bytes, data: bytes, batch: list) -> bool:
        """``data`` for the peer ``key`` into ``batch`` through the allocation; False when the TURN
        path to it is not ready (the caller uses the built-in relay)."""
        c = self.client
        if c is None:
            return False
        addr = self.peer_addr.get(key)
        if addr is None:
            return False
        wrapped = c.wrap(addr, data)
        if wrapped is None:
            return False
        batch.append((wrapped, self.server))
        return True

    def receive(self, datagram: memoryview, now: float) -> tuple[bytes, bytes | memoryview] | None:
        """A datagram from the TURN server: (peer key, WireGuard packet) for relayed data."""
        c = self.client
        if c is None:
            return None
        got = c.receive(datagram, now)
        if c.has_output or c.state != turn_mod.ALLOCATED or self.published != c.relayed:
            self._drain(now)
        if got is None:
            return None
        key = self.by_addr.get(got[0])
        if key is None:
            self.unknown += 1
            return None
        return key, got[1]

    # ------------------------------------------------------------------ timers
    def timer(self) -> float | None:
        times = []
        if self.client is not None:
            if (t := self.client.get_timer()) is not None:
                times.append(t)
            if (rot := self.rotation_at()) is not None:
                times.append(rot)
        elif self.wanted and self.configured:
            times.append(self.retry_at if self.retry_at is not None else self.now())
        return min(times) if times else None

    def tick(self, now: float) -> None:
        if self.client is None:
            if self.wanted and self.configured and (self.retry_at is None or now >= self.retry_at):
                self._start(now)
            return
        rot = self.rotation_at()
        if rot is not None and now >= rot:
            log.info("TURN: new allocation with fresh credentials")
            self._stop(now)
            self._start(now)
            return
        t = self.client.get_timer()
        if t is not None and now >= t:
            self.client.handle_timer(now)
        self._drain(now)

    def rotation_at(self) -> float | None:
        c, creds = self.client, self.creds
        if c is None or creds is None or c.username == creds["username"] or self.client_deadline is None:
            return None
        return self.client_deadline - ROTATE_BEFORE

    def _start(self, now: float) -> None:
        assert self.server is not None and self.creds is not None
        self.client = TurnClient(self.server, self.creds["username"], self.creds["password"], config=self.config)
        self.client_deadline = self.creds_deadline
        self.allocations += 1
        for addr in self.peer_addr.values():
            if self._plausible(addr):
                self.client.permit(addr, now)
        self.client.start(now)
        self._drain(now)

    def _drain(self, now: float) -> None:
        c = self.client
        if c is None:
            return
        server = self.server
        for d in c.datagrams_to_send(now):
            self.out.append((d, server))
        if self.out:
            self.schedule_flush()
        if c.state == turn_mod.ALLOCATED and self.published != c.relayed:
            self.published = c.relayed
            self.backoff = RETRY_INITIAL
            for addr in self.peer_addr.values():     # those on our relayed IP, now that we know it
                if addr not in c.peers and self._plausible(addr, count=True):
                    c.permit(addr, now)
            log.info("TURN: relayed address %s on %s", format_addr(c.relayed), self.label)
            self.on_relayed()
        elif c.state == turn_mod.FAILED:
            self.last_error = c.error
            if self.rlog.allow("turn failed", now)[0]:
                log.warning("TURN server %s: %s (built-in relay meanwhile; trying again in %.0f s)",
                            self.label, c.error, self.backoff)
            self.client = None
            self.retry_at = now + self.backoff
            self.backoff = min(self.backoff * 2, RETRY_MAX)
            if self.published is not None:
                self.published = None
                self.on_relayed()

    def _stop(self, now: float) -> None:
        c = self.client
        if c is not None:
            c.close(now)
            for d in c.datagrams_to_send(now):
                self.out.append((d, self.server))
            self.schedule_flush()
        self.client = None
        if self.published is not None:
            self.published = None
            self.on_relayed()

    def close(self) -> list[tuple[bytes, Addr]]:
        """Deallocate (the node stops): the datagrams to send."""
        c, self.client = self.client, None
        if c is None or self.server is None:
            return []
        c.close(self.now())
        return [(d, self.server) for d in c.datagrams_to_send(self.now())]

    # ------------------------------------------------------------------ status
    def summary(self) -> dict | None:
        if not self.configured:
            return None
        c = self.client
        return {"server": self.label, "state": c.state if c is not None else ("waiting" if self.wanted else "idle"),
                "relayed": format_addr(c.relayed) if c is not None and c.relayed else None,
                "peers": len(self.peer_addr),
                "ready": sum(1 for a in self.peer_addr.values() if c is not None and c.ready(a)),
                "allocations": self.allocations, "error": self.last_error,
                "conflicts": self.conflicts, "unknown": self.unknown, "foreign": self.foreign,
                "stats": c.stats.as_dict() if c is not None else None}
