"""What the two gateway port-mapping protocols on UDP 5351 share (sans-I/O): NAT-PMP
(``natpmp``) and PCP (``pcp``) both send one small request at a time to the default gateway,
retransmit it on a doubling timer, give up after a few tries, ask again after a back-off, hold a
mapping with a lifetime renewed at half, and delete it on exit with lifetime 0.

``GatewayClient`` keeps that state; a subclass builds the requests and parses the answers.

Retransmission: after ``rto``, 2 ``rto``, 4 ``rto``... (0.25, 0.5, 1, 2 s by default), ``tries``
datagrams in all, so a router that speaks neither protocol costs 4 datagrams and 3.75 s before
``answered`` is False. (RFC 6887's own schedule starts at 3 s; the gateway is one hop away, and a
quick verdict lets the node fall back to another protocol.) No answer or an error: the
client asks again after ``retry_after`` seconds.

Renewal at half the granted lifetime, but never sooner than ``RENEW_FLOOR`` after the answer: a
router granting a few seconds (hostile, or broken; RFC 6887 asks servers for at least two
minutes) would otherwise have the node renew, and re-advertise a changed port, every second.
Such a mapping is short-lived: it may lapse before the renewal, which then maps it again.
"""

from __future__ import annotations

PORT = 5351  # NAT-PMP and PCP servers both listen here (the version byte tells them apart)
RENEW_FLOOR = 60.0  # seconds: the earliest renewal after a grant, whatever lifetime it gave

IDLE, ADDRESS, MAPPING, MAPPED, FAILED, HELD = "idle", "address", "mapping", "mapped", "failed", "held"


class GatewayClient:
    """Retransmission, back-off and the mapping's public face; subclasses speak the protocol."""

    protocol = "?"

    def __init__(self, gateway: str, internal_port: int, now: float, *, lifetime: int,
                 rto: float = 0.25, tries: int = 4, retry_after: float = 300.0):
        self.gateway = (gateway, PORT)
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.rto, self.tries, self.retry_after = rto, tries, retry_after
        self.state = IDLE
        self.answered: bool | None = None     # None: no answer yet, nor given up
        self.external_ip: str | None = None
        self.external_port: int | None = None
        self.error: str | None = None
        self.changed = False                  # the mapped address changed; the caller resets it
        self.short_lived = False              # the last grant's lifetime ends before RENEW_FLOOR
        self._out: list[tuple[bytes, tuple[str, int]]] = []
        self._req = b""
        self._sent = 0
        self._next: float | None = now

    @property
    def mapped(self) -> tuple[str, int] | None:
        # kept while a renewal is in flight: only a failure or a refusal takes it away
        if self.state in (MAPPED, MAPPING) and self.external_ip and self.external_port:
            return (self.external_ip, self.external_port)
        return None

    def _send(self, req: bytes, now: float) -> None:
        self._req, self._sent = req, 0
        self._transmit(now)

    def _transmit(self, now: float) -> None:
        self._out.append((self._req, self.gateway))
        self._next = now + self.rto * (2 ** self._sent)
        self._sent += 1

    def _retransmit_or_give_up(self, now: float) -> None:
        if self._sent < self.tries:
            self._transmit(now)
            return
        if self.answered is None:
            self.answered = False
        self._fail(now)

    def _fail(self, now: float, error: str | None = None) -> None:
        if error is not None:
            self.error = error
        if self.external_port is not None:
            self.changed = True
        self.state = FAILED
        self.external_port = None
        self._next = now + self.retry_after

    def _granted(self, external_ip: str | None, external_port: int, lifetime: int, now: float) -> None:
        if external_port != self.external_port or (external_ip and external_ip != self.external_ip):
            self.changed = True
        if external_ip:
            self.external_ip = external_ip
        self.answered = True
        self.error = None
        self.external_port = external_port
        self.state = MAPPED
        self.short_lived = lifetime / 2 < RENEW_FLOOR
        self._next = now + max(lifetime / 2, RENEW_FLOOR)

    def hold_off(self, now: float | None) -> None:
        """Stop asking (``now`` None: another protocol holds the mapping), or, when ``now`` is
        given and nothing is scheduled, ask again ``retry_after`` from now."""
        if now is None:
            self._next = None
        elif self._next is None:
            self._next = now + self.retry_after

    def get_timer(self) -> float | None:
        return self._next

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        out, self._out = self._out, []
        return out

    def summary(self) -> dict:
        m = self.mapped
        return {"answered": self.answered, "external_ip": self.external_ip,
                "mapped": f"{m[0]}:{m[1]}" if m else None, "error": self.error}
