"""Userspace IPv4 / ICMP / UDP / TCP stack, sans-I/O, with asyncio stream glue.

Layering follows smoltcp: ``wire`` parses and emits packets, ``tcp`` / ``udp`` hold socket
state machines, ``stack`` dispatches packets for one IPv4 address, ``asyncio_glue`` drives a
stack on an event loop and offers asyncio-style streams.
"""

from .events import (
    Closed,
    Connected,
    ConnectionRefused,
    ConnectionRequest,
    DatagramReceived,
    DataReceived,
    EndOfStream,
    Event,
    IncomingConnection,
    PortRefused,
    Reset,
    TimedOut,
    Writable,
)
from .stack import Stack
from .tcp import TcpConfig, TcpConnection, TcpState
from .udp import UdpSocket
from .wire import WireError

__all__ = [
    "Closed",
    "Connected",
    "ConnectionRefused",
    "ConnectionRequest",
    "DatagramReceived",
    "DataReceived",
    "EndOfStream",
    "Event",
    "IncomingConnection",
    "PortRefused",
    "Reset",
    "Stack",
    "TcpConfig",
    "TcpConnection",
    "TcpState",
    "TimedOut",
    "UdpSocket",
    "WireError",
    "Writable",
]
