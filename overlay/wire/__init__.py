"""WireGuard protocol core, sans-I/O: ``Device`` is what the node uses (see device.py)."""

from overlay.wire.device import Device
from overlay.wire.events import EndpointChanged, Event, HandshakeCompleted, PacketReceived, PeerUnreachable
from overlay.wire.messages import is_wireguard

__all__ = [
    "Device", "EndpointChanged", "Event", "HandshakeCompleted", "PacketReceived", "PeerUnreachable", "is_wireguard",
]
