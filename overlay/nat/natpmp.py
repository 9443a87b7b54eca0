"""NAT-PMP (RFC 6886) mapping of the node's UDP port on its router (sans-I/O).

The protocol is two 12-byte requests to the default gateway's UDP port 5351, so it is written
here rather than taken from a library (the Python NAT-PMP packages on PyPI are unmaintained;
miniupnpc's bindings speak UPnP IGD only). Sent from the node's own socket: the mapping's
internal port is that socket's port, and the answers arrive there (told apart by their source,
gateway:5351, and from PCP's by their version byte 0; ``portmap`` routes them).

1. External address request (opcode 0), retransmitted after 0.25, 0.5, 1, 2 s (RFC 6886 allows
   up to 9 tries; 4 keep a router without NAT-PMP from costing more than 4 datagrams).
2. UDP mapping request (opcode 1) for our port, suggesting the same external port, lifetime
   ``lifetime``; renewed at half the lifetime the router granted.
3. ``delete`` on exit: a mapping request with lifetime 0 (best effort, sent once).

No answer: ``answered`` False, asked again after ``retry_after``. An error result (a router
without a public address answers "network failure", RFC 6886 3.5): ``error`` says which, and the
same back-off applies. Retransmission, back-off and the mapping's state: ``mapclient``.
"""

from __future__ import annotations

import struct

from .mapclient import ADDRESS, FAILED, HELD, IDLE, MAPPED, MAPPING, PORT, GatewayClient

RESULTS = {1: "unsupported version", 2: "not authorized / refused", 3: "network failure (no public address)",
           4: "out of resources", 5: "unsupported opcode"}

__all__ = ["NatPmp", "PORT", "RESULTS", "IDLE", "ADDRESS", "MAPPING", "MAPPED", "FAILED", "HELD",
           "default_gateway", "request_address", "request_map_udp"]


def request_address() -> bytes:
    return b"\x00\x00"


def request_map_udp(internal: int, external: int, lifetime: int) -> bytes:
    return struct.pack("!BBHHHI", 0, 1, 0, internal, external, lifetime)


class NatPmp(GatewayClient):
    """``may_map`` False: stop after the external address answer (state ``HELD``: the router
    speaks NAT-PMP) until ``allow_mapping``; the port-mapping coordinator holds NAT-PMP back
    while a preferred protocol is still being asked."""

    protocol = "nat_pmp"

    def __init__(self, gateway: str, internal_port: int, now: float, *, lifetime: int = 7200,
                 rto: float = 0.25, tries: int = 4, retry_after: float = 300.0, may_map: bool = True):
        super().__init__(gateway, internal_port, now, lifetime=lifetime, rto=rto, tries=tries,
                         retry_after=retry_after)
        self.may_map = may_map

    def allow_mapping(self, now: float) -> None:
        self.may_map = True
        if self.state == HELD:
            self._map(now)

    def _map(self, now: float) -> None:
        self.state = MAPPING
        self._send(request_map_udp(self.internal_port, self.external_port or self.internal_port,
                                   self.lifetime), now)

    def handle_timer(self, now: float) -> None:
        if self._next is None or now < self._next:
            return
        if self.state in (IDLE, FAILED):
            self.state = ADDRESS
            self._send(request_address(), now)
        elif self.state == MAPPED:          # renew at half the granted lifetime
            self._map(now)
        else:
            self._retransmit_or_give_up(now)

    def receive(self, data: bytes, now: float) -> bool:
        """A datagram from the gateway's port 5351; True if it answered one of our requests."""
        if len(data) < 8 or data[0] != 0 or data[1] not in (128, 129):
            return False
        op, result = data[1], struct.unpack("!H", data[2:4])[0]
        if op == 128 and self.state == ADDRESS and len(data) >= 12:
            self.answered = True
            if result:
                self._fail(now, RESULTS.get(result, f"result {result}"))
                return True
            self.external_ip = ".".join(str(b) for b in data[8:12])
            if self.may_map:
                self._map(now)
            else:
                self.state, self._next = HELD, None
            return True
        if op == 129 and self.state == MAPPING and len(data) >= 16:
            internal, external, lifetime = struct.unpack("!HHI", data[8:16])
            if internal != self.internal_port:
                return False
            self.answered = True
            if result or external == 0 or lifetime == 0:
                self._fail(now, RESULTS.get(result, f"result {result}") if result else "no port granted")
                return True
            self._granted(None, external, lifetime, now)
            return True
        return False

    def delete(self) -> list[tuple[bytes, tuple[str, int]]]:
        """The datagram that removes our mapping (send once, on exit); empty if none is held."""
        if self.mapped is None:
            return []
        return [(request_map_udp(self.internal_port, 0, 0), self.gateway)]


def default_gateway(route_file: str = "/proc/net/route") -> str | None:
    """The IPv4 default gateway from the kernel's routing table, or None."""
    try:
        with open(route_file) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if len(parts) >= 4 and parts[1] == "00000000" and int(parts[3], 16) & 2:
                    gw = int(parts[2], 16)
                    return ".".join(str((gw >> s) & 0xFF) for s in (0, 8, 16, 24))
    except (OSError, ValueError):
        pass
    return None
