"""NAT traversal cores, all sans-I/O: feed datagrams and ``now``, collect datagrams and timers.

- ``stun``: RFC 8489 Binding codec, the server's ``binding_response`` and a client transaction.
- ``disco``: Ping / Pong / CallMeMaybe sealed with NaCl box between node keys.
- ``classify``: NAT mapping behaviour and port prediction from STUN observations (``NatProbe``).
- ``traversal``: the per-peer path state machine (``PeerPath``).
- ``birthday``: birthday-paradox punching between an easy and a random-port symmetric NAT.
- ``seqpunch``: predicted windows on both sides at once, for two sequential symmetric NATs.
- ``candidate``: addresses and candidates shared by the above.
- ``portmap``: port mapping on the router (``pcp``, ``natpmp`` on ``mapclient``; ``upnp``).

One UDP socket per node carries several protocols; ``classify_datagram`` tells them apart, the
same function for the node's socket (``overlay.node.dataplane``) and the simulator's: WireGuard
(type byte 1..5, 5 being the plaintext transport, then three zero bytes), relay framing
(``overlay.relay.frames.MAGIC``, "OVR\\x01"), discovery (``disco.MAGIC``, "OVD\\x01"), the
router's port-mapping answers (from its PCP / NAT-PMP port) and STUN (``stun.is_stun``).
"""

from __future__ import annotations

from overlay.relay.frames import MAGIC as RELAY_MAGIC

from .candidate import Addr, Candidate
from .classify import NatProbe, NatReport, Observation
from .disco import MAGIC as DISCO_MAGIC
from .disco import CallMeMaybe, DiscoCodec, DiscoError, Ping, Pong, is_disco
from .mapclient import PORT as PORTMAP_PORT
from .stun import StunError, StunTransaction, binding_response, is_stun
from .traversal import PathChanged, PeerPath, TraversalConfig

WIREGUARD, RELAY, DISCO, PORTMAP, STUN, OTHER = "wireguard", "relay", "disco", "portmap", "stun", "other"


def classify_datagram(datagram: bytes | memoryview, addr: Addr | None = None,
                      portmap_gateway: str | None = None) -> str:
    """Which protocol a datagram on the shared socket belongs to. ``portmap_gateway``: the router
    we ask for a port mapping, if any; its answers come from ``addr`` (that IP, port 5351). No
    allocation on the WireGuard path (the hot one)."""
    if len(datagram) < 4:
        return OTHER
    if 1 <= datagram[0] <= 5 and datagram[1] == 0 and datagram[2] == 0 and datagram[3] == 0:
        return WIREGUARD
    head = datagram[:4]
    if head == RELAY_MAGIC:
        return RELAY
    if head == DISCO_MAGIC:
        return DISCO
    if portmap_gateway is not None and addr is not None and addr[1] == PORTMAP_PORT and addr[0] == portmap_gateway:
        return PORTMAP
    if is_stun(datagram):
        return STUN
    return OTHER


__all__ = [
    "Addr", "Candidate", "NatProbe", "NatReport", "Observation", "CallMeMaybe", "DiscoCodec",
    "DiscoError", "Ping", "Pong", "is_disco", "StunError", "StunTransaction", "binding_response", "is_stun",
    "PathChanged", "PeerPath", "TraversalConfig", "classify_datagram", "WIREGUARD", "RELAY", "DISCO", "PORTMAP",
    "STUN", "OTHER",
]
