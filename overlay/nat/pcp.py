"""PCP (RFC 6887) MAP of the node's UDP port on its router (sans-I/O), the successor of NAT-PMP.

Sent, like NAT-PMP, from the node's own socket to the default gateway's UDP port 5351 (the two
protocols share the port; the first byte, version 2 for PCP and 0 for NAT-PMP, tells the answers
apart). One request: MAP for UDP, our internal port, suggesting the same external port, lifetime
``lifetime``; answered by the granted external address, port and lifetime, renewed at half that
lifetime with the same nonce, deleted on exit with lifetime 0.

Checks on an answer: length (a MAP response is 60 bytes), version, the R bit and opcode, the
12-byte nonce of our mapping (an answer with another nonce is not ours: ignored), protocol UDP and
our internal port, an IPv4 external address. Result codes are named (``RESULTS``). A NAT-PMP-only
router answers a version-2 request with "unsupported version" in NAT-PMP format (version 0,
result 1; RFC 6887 section 9): ``nat_pmp_only`` is then True, the caller falls back to NAT-PMP.

Retransmission and back-off: ``mapclient.GatewayClient``. Not implemented: PEER and ANNOUNCE
opcodes, options (THIRD_PARTY, PREFER_FAILURE, FILTER), IPv6, and the epoch check that detects
a router that rebooted (the renewal at half the lifetime restores a lost mapping instead).
"""

from __future__ import annotations

import ipaddress
import os
import struct

from .mapclient import FAILED, IDLE, MAPPED, MAPPING, PORT, GatewayClient

VERSION = 2
OP_MAP = 1
UDP = 17
HEADER = struct.Struct("!BBHI16s")         # request: version, R|opcode, reserved, lifetime, client IP
RESPONSE = struct.Struct("!BBBBII12x")     # version, R|opcode, reserved, result, lifetime, epoch, reserved
MAP = struct.Struct("!12sB3xHH16s")        # nonce, protocol, reserved, internal port, external port, address
RESPONSE_LEN = RESPONSE.size + MAP.size    # 60

RESULTS = {
    1: "UNSUPP_VERSION", 2: "NOT_AUTHORIZED", 3: "MALFORMED_REQUEST", 4: "UNSUPP_OPCODE",
    5: "UNSUPP_OPTION", 6: "MALFORMED_OPTION", 7: "NETWORK_FAILURE", 8: "NO_RESOURCES",
    9: "UNSUPP_PROTOCOL", 10: "USER_EX_QUOTA", 11: "CANNOT_PROVIDE_EXTERNAL", 12: "ADDRESS_MISMATCH",
    13: "EXCESSIVE_REMOTE_PEERS",
}
_MEANING = {
    1: "the router speaks another version", 2: "refused by the router's policy",
    7: "the router has no public address", 8: "the router could not create the mapping",
    11: "the router cannot give that external address",
    12: "another NAT between this node and the router changed our address",
}

__all__ = ["Pcp", "PORT", "RESULTS", "request_map", "result_text", "IDLE", "MAPPING", "MAPPED", "FAILED"]


def mapped_v4(ip: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{ip}").packed


def request_map(client_ip: str, nonce: bytes, internal: int, external: int, lifetime: int,
                external_ip: str = "0.0.0.0") -> bytes:
    return (HEADER.pack(VERSION, OP_MAP, 0, lifetime, mapped_v4(client_ip))
            + MAP.pack(nonce, UDP, internal, external, mapped_v4(external_ip)))


def result_text(code: int) -> str:
    name = RESULTS.get(code, f"result {code}")
    return f"{name}: {_MEANING[code]}" if code in _MEANING else name


class Pcp(GatewayClient):
    protocol = "pcp"

    def __init__(self, gateway: str, client_ip: str, internal_port: int, now: float, *,
                 lifetime: int = 7200, rto: float = 0.25, tries: int = 4, retry_after: float = 300.0,
                 nonce: bytes | None = None):
        super().__init__(gateway, internal_port, now, lifetime=lifetime, rto=rto, tries=tries,
                         retry_after=retry_after)
        self.client_ip = client_ip
        self.nonce = nonce or os.urandom(12)
        self.nat_pmp_only = False
        self.ignored = 0            # answers from the gateway that were not for us (nonce, port...)

    def _request(self, lifetime: int) -> bytes:
        port = self.external_port or self.internal_port
        return request_map(self.client_ip, self.nonce, self.internal_port, port, lifetime,
                           self.external_ip or "0.0.0.0")

    def handle_timer(self, now: float) -> None:
        if self._next is None or now < self._next:
            return
        if self.state in (IDLE, FAILED, MAPPED):   # first request, retry, or renewal at half life
            self.state = MAPPING
            self._send(self._request(self.lifetime), now)
        else:
            self._retransmit_or_give_up(now)

    def receive(self, data: bytes, now: float) -> bool:
        """A datagram from the gateway's port 5351; True if it answered our request."""
        if self.state != MAPPING or len(data) < 4:
            return False
        if data[0] == 0:      # a NAT-PMP server: only its "unsupported version" answer is for us
            if len(data) >= 8 and data[1] in (0, 128, 128 + OP_MAP) and struct.unpack("!H", data[2:4])[0] == 1:
                self.answered, self.nat_pmp_only = True, True
                self._fail(now, "router speaks NAT-PMP, not PCP (UNSUPP_VERSION)")
                return True
            return False
        if data[0] != VERSION or data[1] != 0x80 | OP_MAP:
            if data[0] != VERSION and len(data) >= 4 and data[1] & 0x80 and data[3] == 1:
                self.answered = True      # another PCP version answered UNSUPP_VERSION
                self._fail(now, f"router speaks PCP version {data[0]} (UNSUPP_VERSION)")
                return True
            return False
        if len(data) < RESPONSE_LEN:
            self.ignored += 1
            return False
        _, _, _, result, lifetime, _epoch = RESPONSE.unpack_from(data)
        nonce, proto, internal, external, addr = MAP.unpack_from(data, RESPONSE.size)
        if nonce != self.nonce or proto != UDP or internal != self.internal_port:
            self.ignored += 1
            return False
        self.answered = True
        if result:
            self._fail(now, result_text(result))
            return True
        ip = ipaddress.IPv6Address(addr).ipv4_mapped
        if external == 0 or lifetime == 0 or ip is None or ip.is_unspecified:
            self._fail(now, "no IPv4 address or port granted")
            return True
        self._granted(str(ip), external, lifetime, now)
        return True

    def delete(self) -> list[tuple[bytes, tuple[str, int]]]:
        """The datagram that removes our mapping (send once, on exit); empty if none is held."""
        if self.mapped is None:
            return []
        return [(self._request(0), self.gateway)]
