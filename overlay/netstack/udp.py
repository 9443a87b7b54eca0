"""UDP sockets of the userspace stack: bound ports whose datagrams arrive as stack events."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .wire import MAX_UDP_PAYLOAD

if TYPE_CHECKING:
    from .stack import Stack


class UdpSocket:
    """A bound UDP port. Inbound datagrams become ``DatagramReceived`` events; at most
    ``max_queued`` of them wait in the event queue at a time (later ones are dropped, as UDP may)."""

    def __init__(self, stack: Stack, port: int, max_queued: int = 256):
        self._stack = stack
        self.port = port
        self.max_queued = max_queued
        self.queued = 0  # DatagramReceived events not yet taken by next_event()
        self.dropped = 0
        self.closed = False

    max_datagram = MAX_UDP_PAYLOAD  # larger than the MTU is sent as IP fragments

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        """Queue one datagram to ``addr`` (IP fragments if it does not fit the MTU); OSError
        EMSGSIZE beyond 65,507 bytes, as from a Linux UDP socket."""
        if self.closed:
            raise OSError("UDP socket is closed")
        if len(data) > MAX_UDP_PAYLOAD:
            raise OSError(errno.EMSGSIZE, f"UDP payload of {len(data)} bytes exceeds {MAX_UDP_PAYLOAD} (the IPv4 maximum)")
        self._stack._emit_udp(self.port, addr, data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stack._udp_unbind(self)

    def __repr__(self) -> str:
        return f"<UdpSocket port {self.port}{' closed' if self.closed else ''}>"
