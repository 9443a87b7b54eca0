"""NAT-PMP (RFC 6886) mapping of the node's UDP port on its router (sans-I/O).

The protocol is two 12-byte requests to the default gateway's UDP port 5351, so it is written
here rather than taken from a library (the Python NAT-PMP packages on PyPI are unmaintained;
miniupnpc's bindings speak UPnP IGD only). Sent from the node's own socket: the mapping's
internal port is that socket's port, and the answers arrive there (told apart by their source,
gateway:5351).

1. External address request (opcode 0), retransmitted after 0.25, 0.5, 1, 2 s (RFC 6886 allows
   up to 9 tries; 4 keep a router without NAT-PMP from costing more than 4 datagrams).
2. UDP mapping request (opcode 1) for our port, suggesting the same external port, lifetime
   ``lifetime``; renewed at half the lifetime the router granted.
3. ``delete`` on exit: a mapping request with lifetime 0 (best effort, sent once).

No answer: ``answered`` False, asked again after ``retry_after``. An error result (a router
without a public address answers "network failure", RFC 6886 3.5): ``error`` says which, and the
same back-off applies.
"""

from __future__ import annotations

import struct

PORT = 5351
RESULTS = {1: "unsupported version", 2: "not authorized / refused", 3: "network failure (no public address)",
           4: "out of resources", 5: "unsupported opcode"}

IDLE, ADDRESS, MAPPING, MAPPED, FAILED = "idle", "address", "mapping", "mapped", "failed"


def request_address() -> bytes:
    return b"\x00\x00"


def request_map_udp(internal: int, external: int, lifetime: int) -> bytes:
    return struct.pack("!BBHHHI", 0, 1, 0, internal, external, lifetime)


class NatPmp:
    def __init__(self, gateway: str, internal_port: int, now: float, *, lifetime: int = 7200,
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
        self._out: list[tuple[bytes, tuple[str, int]]] = []
        self._req = b""
        self._sent = 0
        self._next: float | None = now

    @property
    def mapped(self) -> tuple[str, int] | None:
        if self.state == MAPPED and self.external_ip and self.external_port:
            return (self.external_ip, self.external_port)
        return None

    def _send(self, req: bytes, now: float) -> None:
        self._req, self._sent = req, 0
        self._transmit(now)

    def _transmit(self, now: float) -> None:
        self._out.append((self._req, self.gateway))
        self._next = now + self.rto * (2 ** self._sent)
        self._sent += 1

    def get_timer(self) -> float | None:
        return self._next

    def handle_timer(self, now: float) -> None:
        if self._next is None or now < self._next:
            return
        if self.state in (IDLE, FAILED):
            self.state = ADDRESS
            self._send(request_address(), now)
        elif self.state == MAPPED:          # renew at half the granted lifetime
            self.state = MAPPING
            self._send(request_map_udp(self.internal_port, self.external_port or self.internal_port,
                                       self.lifetime), now)
        elif self._sent < self.tries:
            self._transmit(now)
        else:
            if self.state == ADDRESS:
                self.answered = False
            self._fail(now)

    def _fail(self, now: float) -> None:
        if self.external_port is not None:
            self.changed = True
        self.state = FAILED
        self.external_port = None
        self._next = now + self.retry_after

    def receive(self, data: bytes, now: float) -> bool:
        """A datagram from the gateway's port 5351; True if it answered one of our requests."""
        if len(data) < 8 or data[0] != 0 or data[1] not in (128, 129):
            return False
        op, result = data[1], struct.unpack("!H", data[2:4])[0]
        if op == 128 and self.state == ADDRESS and len(data) >= 12:
            self.answered = True
            if result:
                self.error = RESULTS.get(result, f"result {result}")
                self._fail(now)
                return True
            self.external_ip = ".".join(str(b) for b in data[8:12])
            self.state = MAPPING
            self._send(request_map_udp(self.internal_port, self.internal_port, self.lifetime), now)
            return True
        if op == 129 and self.state == MAPPING and len(data) >= 16:
            internal, external, lifetime = struct.unpack("!HHI", data[8:16])
            if internal != self.internal_port:
                return False
            self.answered = True
            if result or external == 0 or lifetime == 0:
                self.error = RESULTS.get(result, f"result {result}") if result else "no port granted"
                self._fail(now)
                return True
            if external != self.external_port:
                self.changed = True
            self.error = None
            self.external_port = external
            self.state = MAPPED
            self._next = now + lifetime / 2
            return True
        return False

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        out, self._out = self._out, []
        return out

    def delete(self) -> list[tuple[bytes, tuple[str, int]]]:
        """The datagram that removes our mapping (send once, on exit); empty if none is held."""
        if self.mapped is None:
            return []
        return [(request_map_udp(self.internal_port, 0, 0), self.gateway)]

    def summary(self) -> dict:
        m = self.mapped
        return {"answered": self.answered, "external_ip": self.external_ip,
                "mapped": f"{m[0]}:{m[1]}" if m else None, "error": self.error}


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
