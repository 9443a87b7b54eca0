"""ICMP echo through the tunnel, for ``overlay ping``: the real end-to-end round trip.

Requests are built here from our virtual IP to the peer's; the peer's userspace stack (or kernel,
in TUN mode) answers. Replies are picked out of the inbound packet stream before it reaches the
local stack (``intercept``); everything else passes through untouched.
"""

from __future__ import annotations

import asyncio
import os
import socket

from overlay.netstack.wire import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, PROTO_ICMP, build_icmp, build_ipv4

MAX_OUTSTANDING = 64


class Pinger:
    def __init__(self) -> None:
        self.ident = int.from_bytes(os.urandom(2), "big")
        self._seq = 0
        self._waiting: dict[int, asyncio.Future] = {}

    def request(self, src: str, dst: str, payload: bytes = b"overlay ping") -> tuple[int, bytes]:
        self._seq = (self._seq + 1) & 0xFFFF
        icmp = build_icmp(ICMP_ECHO_REQUEST, 0, self.ident << 16 | self._seq, payload)
        return self._seq, build_ipv4(socket.inet_aton(src), socket.inet_aton(dst), PROTO_ICMP, icmp)

    def wait(self, seq: int) -> asyncio.Future:
        if len(self._waiting) >= MAX_OUTSTANDING:
            raise RuntimeError("too many pings in flight")
        fut = asyncio.get_running_loop().create_future()
        self._waiting[seq] = fut
        fut.add_done_callback(lambda f: self._waiting.pop(seq, None))
        return fut

    def intercept(self, packets: list[bytes]) -> list[bytes]:
        """Resolve waiting pings from ``packets``; return the packets that are not our replies."""
        if not self._waiting:
            return packets
        rest = []
        for p in packets:
            ihl = (p[0] & 0x0F) * 4
            if (len(p) >= ihl + 8 and p[9] == PROTO_ICMP and p[ihl] == ICMP_ECHO_REPLY
                    and int.from_bytes(p[ihl + 4:ihl + 6], "big") == self.ident):
                fut = self._waiting.get(int.from_bytes(p[ihl + 6:ihl + 8], "big"))
                if fut is not None and not fut.done():
                    fut.set_result(None)
                continue
            rest.append(p)
        return rest
