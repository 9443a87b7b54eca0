"""Events a Device hands to the node through ``Device.next_event()``."""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple


class PacketReceived(NamedTuple):
    """An authenticated inner packet (IPv4/IPv6 trimmed of padding; other inner types as sent)."""

    public_key: bytes
    packet: bytes


class HandshakeCompleted(NamedTuple):
    """A new session is usable both ways (initiator: response received; responder: first data)."""

    public_key: bytes


class EndpointChanged(NamedTuple):
    """An authenticated packet arrived from a new address, and the peer now lives there (roaming)."""

    public_key: bytes
    addr: Hashable


class PeerUnreachable(NamedTuple):
    """Handshakes went unanswered for REKEY_ATTEMPT_TIME (90 s); staged packets were dropped."""

    public_key: bytes


Event = PacketReceived | HandshakeCompleted | EndpointChanged | PeerUnreachable
