"""Events the stack hands to its user through ``Stack.next_event()``.

Per-connection events are coalesced (at most one pending ``DataReceived`` / ``Writable`` per
connection), so the event queue stays bounded by the number of connections; UDP datagrams are
bounded per socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tcp import TcpConnection
    from .udp import UdpSocket


@dataclass(slots=True)
class IncomingConnection:
    """A peer completed the handshake to a listened port; ``conn`` is ESTABLISHED."""

    conn: TcpConnection


@dataclass(slots=True)
class Connected:
    """Our active open (``Stack.connect``) completed."""

    conn: TcpConnection


@dataclass(slots=True)
class DataReceived:
    """``conn.recv()`` has bytes (or the end of stream) to return."""

    conn: TcpConnection


@dataclass(slots=True)
class Writable:
    """Send buffer space freed after ``conn.send()`` accepted less than it was offered."""

    conn: TcpConnection


@dataclass(slots=True)
class EndOfStream:
    """The peer sent FIN: once buffered data is read, ``conn.recv()`` returns b''."""

    conn: TcpConnection


@dataclass(slots=True)
class Closed:
    """Both directions finished cleanly (our FIN acknowledged and the peer's FIN received)."""

    conn: TcpConnection


@dataclass(slots=True)
class Reset:
    """The peer reset an established connection (or we aborted); unread data is discarded."""

    conn: TcpConnection


@dataclass(slots=True)
class ConnectionRefused:
    """Our SYN was refused: answered with RST (``unreachable`` False: nothing listens, or the port is
    not shared), or with ICMP port unreachable (``unreachable`` True: the port is open to us but the
    service behind it is not there, see ``Stack.listen(..., defer=True)``), or with another ICMP
    error (``icmp``: its type and code; host unreachable, time exceeded...: a gateway could not
    reach the LAN host behind it)."""

    conn: TcpConnection
    unreachable: bool = False
    icmp: tuple[int, int] | None = None


@dataclass(slots=True)
class ConnectionRequest:
    """A SYN to a port listened with ``defer=True``: answer with ``Stack.accept_request`` (the
    handshake goes on) or ``Stack.refuse_request`` (ICMP port unreachable)."""

    port: int
    remote: tuple[str, int]
    key: tuple[bytes, int, int]


@dataclass(slots=True)
class TimedOut:
    """The connection gave up after retransmissions (or keepalives) went unanswered."""

    conn: TcpConnection


@dataclass(slots=True)
class PortRefused:
    """We answered a SYN to a port nobody listens on with RST (tell the user: port not shared)."""

    port: int
    remote: tuple[str, int]


@dataclass(slots=True)
class DatagramReceived:
    """A UDP datagram for a bound socket."""

    socket: UdpSocket
    data: bytes
    addr: tuple[str, int]


Event = (
    IncomingConnection
    | Connected
    | DataReceived
    | Writable
    | EndOfStream
    | Closed
    | Reset
    | ConnectionRefused
    | ConnectionRequest
    | TimedOut
    | PortRefused
    | DatagramReceived
)
