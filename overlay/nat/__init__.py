"""NAT traversal cores, all sans-I/O: feed datagrams and ``now``, collect datagrams and timers.

- ``stun``: RFC 8489 Binding codec, the server's ``binding_response`` and a client transaction.
- ``disco``: Ping / Pong / CallMeMaybe sealed with NaCl box between node keys.
- ``classify``: NAT mapping behaviour and port prediction from STUN observations (``NatProbe``).
- ``traversal``: the per-peer path state machine (``PeerPath``).
- ``birthday``: birthday-paradox punching between an easy and a random-port symmetric NAT.
- ``seqpunch``: predicted windows on both sides at once, for two sequential symmetric NATs.
- ``candidate``: addresses and candidates shared by the above.
- ``portmap``: port mapping on the router (``pcp``, ``natpmp`` on ``mapclient``; ``upnp``).

One UDP socket per node carries three protocols; ``classify_datagram`` tells them apart:
WireGuard (type byte 1..4 then three zero bytes), STUN (``stun.is_stun``) and discovery
(``disco.MAGIC``, "OVD\\x01").
"""

from __future__ import annotations

from .candidate import Addr, Candidate
from .classify import NatProbe, NatReport, Observation
from .disco import CallMeMaybe, DiscoCodec, DiscoError, Ping, Pong, is_disco
from .stun import StunError, StunTransaction, binding_response, is_stun
from .traversal import PathChanged, PeerPath, TraversalConfig

WIREGUARD, STUN, DISCO, OTHER = "wireguard", "stun", "disco", "other"


def classify_datagram(datagram: bytes) -> str:
    """Which protocol a datagram on the shared socket belongs to."""
    if len(datagram) >= 4 and 1 <= datagram[0] <= 4 and datagram[1:4] == b"\x00\x00\x00":
        return WIREGUARD
    if is_disco(datagram):
        return DISCO
    if is_stun(datagram):
        return STUN
    return OTHER


__all__ = [
    "Addr", "Candidate", "NatProbe", "NatReport", "Observation", "CallMeMaybe", "DiscoCodec",
    "DiscoError", "Ping", "Pong", "is_disco", "StunError", "StunTransaction", "binding_response", "is_stun",
    "PathChanged", "PeerPath", "TraversalConfig", "classify_datagram", "WIREGUARD", "STUN", "DISCO", "OTHER",
]
