"""The TAP edge, sans-I/O: Ethernet frames on the device side, plain IP or frames on the tunnel side.

What crosses the tunnel:
- IPv4 always travels as a plain IP packet, unicast or broadcast or multicast, so TUN nodes,
  userspace nodes and stock WireGuard peers understand what a TAP node sends. Frames arriving at
  a TAP node are rebuilt from the packet: destination our MAC (or the broadcast / IPv4 multicast
  MAC), source the sending peer's MAC.
- ARP never needs to leave the node for an overlay address: every node's MAC is derived from its
  public key (``node_mac``), so a request for a peer's virtual IP is answered here, whatever kind
  of node the peer is. Requests for addresses outside the pool (set by hand on a TAP member) go
  to the TAP members as frames.
- Every other EtherType (IPX 0x8137, 802.3 raw and 802.2 LLC frames whose type field is a length,
  IPv6, VLAN tags...) travels as an Ethernet frame inside the tunnel, with the inner type byte
  ``L2_FRAME`` in front (its high nibble is neither 4 nor 6, so it is never mistaken for IP):
  unicast to the TAP member owning the destination MAC, broadcast and multicast to all of them.

A peer's frame is written to our device only if its source MAC is that peer's, its destination is
us or a group address, it is not IPv4 (which must come plain, through cryptokey routing), and an
ARP inside it is Ethernet/IPv4 ARP from that MAC that does not claim an overlay address other than
the peer's own. Frames the kernel would take for IPv4 or ARP under another guise are refused too:
- every VLAN-tagged frame (TPID 0x8100, 0x88a8, 0x9100, 0x9200, 0x9300), whatever its VLAN ID. Linux
  strips a tag with VLAN ID 0 (802.1p priority tagging), at any depth, and handles what is inside as
  untagged, so a tagged IPv4 packet would skip cryptokey routing, ``--only-shared`` and the gateway
  rules, and a tagged ARP the check above. Tags are refused outright rather than looked through:
  peeling them the way the kernel does (and a VLAN device on ``ovl0`` taking non-zero IDs) is more
  code to get wrong, and nothing that belongs on the overlay needs them;
- 802.3 frames whose LLC is SNAP (DSAP 0xAA) carrying IPv4, ARP, IPv6 or a VLAN TPID (Linux delivers
  none of them to its IP stack today; no program needs them either);
- IPv6 (0x86dd, also behind SNAP) when the node runs ``--only-shared``: the filter judges IPv4, and
  the kernel would answer peers on its IPv6 link-local address on any port.
Everything else passes, so IPX (Ethernet II 0x8137, 802.2 LLC, raw 802.3, SNAP) works as on a LAN.
RARP (0x8035) and the other EtherTypes reach only packet sockets: Linux has no RARP handler, and
MPLS and PPPoE need configuration a node does not have.
"""

from __future__ import annotations

import hashlib
import ipaddress

L2_FRAME = 0x1E
"""First byte of an inner packet that carries an Ethernet frame (high nibble 1: not IPv4/IPv6)."""
L2_PREFIX = bytes([L2_FRAME])
ETH_HEADER = 14
ETH_IPV4 = b"\x08\x00"
ETH_ARP = b"\x08\x06"
ETH_IPV6 = b"\x86\xdd"
VLAN_TPIDS = frozenset({0x8100, 0x88A8, 0x9100, 0x9200, 0x9300})
"""802.1Q, 802.1ad and the older vendor QinQ tags: a frame from a peer starting with one is refused."""
_SNAP_REFUSED = VLAN_TPIDS | {0x0800, 0x0806, 0x86DD}
_ARP_ETHER_IPV4 = bytes.fromhex("08000604")   # protocol IPv4, hlen 6, plen 4 (after the hardware type)
BROADCAST_MAC = b"\xff" * 6
GATEWAY_MAC = b"\x02\x00\x5e\x00\x00\x01"
"""Source MAC of IPv4 from addresses that are no node's (routed by a static WireGuard peer)."""
_ARP_HEAD = bytes.fromhex("0001080006040002")   # Ethernet, IPv4, hlen 6, plen 4, op reply
_ARP_REQUEST = b"\x00\x01"

# what from_device() asks the caller to do with a frame
SEND_IP = 0     # payload: an IPv4 packet for the data plane to route (unicast, broadcast or multicast)
REPLY = 1       # payload: a frame to write back to our own device (an ARP answer)
FLOOD = 2       # payload: a frame for every TAP member
UNICAST = 3     # payload: a frame for the TAP member ``key``
DROP = 4


def node_mac(public_key: bytes) -> bytes:
    """A node's stable, locally administered unicast MAC, derived from its public key."""
    h = hashlib.blake2s(public_key, digest_size=6, person=b"ovl-mac").digest()
    return bytes([(h[0] & 0xFC) | 0x02]) + h[1:]


def fmt_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def ipv4_group_mac(dst: bytes) -> bytes:
    """The Ethernet destination for an IPv4 destination that is not a unicast address."""
    if 224 <= dst[0] <= 239:
        return b"\x01\x00\x5e" + bytes([dst[1] & 0x7F, dst[2], dst[3]])
    return BROADCAST_MAC


class TapEdge:
    def __init__(self, mac: bytes, pool: ipaddress.IPv4Network | None = None, refuse_ipv6: bool = False):
        self.mac = mac
        self.refuse_ipv6 = refuse_ipv6   # --only-shared: no IPv6 from peers (see the module docstring)
        self.ip: bytes = b""
        self.pool = pool
        self.pool_broadcast = b"\xff\xff\xff\xff"
        self.mac_of_ip: dict[bytes, bytes] = {}       # every peer's virtual IP -> its MAC
        self.key_of_mac: dict[bytes, bytes] = {}      # TAP members' MAC -> key
        self.mac_of_key: dict[bytes, bytes] = {}
        self._hdr_to_me: dict[bytes, bytes] = {}      # peer IP -> 14-byte header "to us, from it, IPv4"
        self.routes: list[ipaddress.IPv4Network] = []  # prefixes reached through peers (gateways)
        self.stats = {"arp_answered": 0, "dropped": 0, "bad_frames": 0}

    def set_address(self, ip: str, pool: ipaddress.IPv4Network | None) -> None:
        self.ip = ipaddress.IPv4Address(ip).packed
        self.pool = pool
        self.pool_broadcast = pool.broadcast_address.packed if pool is not None else b"\xff\xff\xff\xff"

    def set_peers(self, peers) -> None:
        """``peers``: (key, virtual IP as 4 bytes, is_tap) for every peer."""
        self.mac_of_ip.clear()
        self.key_of_mac.clear()
        self.mac_of_key.clear()
        self._hdr_to_me.clear()
        for key, vip, tap in peers:
            mac = node_mac(key)
            self.mac_of_key[key] = mac
            self.mac_of_ip[vip] = mac
            self._hdr_to_me[vip] = self.mac + mac + ETH_IPV4
            if tap:
                self.key_of_mac[mac] = key

    def _in_pool(self, addr: bytes) -> bool:
        return self.pool is not None and ipaddress.IPv4Address(addr) in self.pool

    # ------------------------------------------------------------------ device -> tunnel
    def from_device(self, frame: bytes) -> tuple[int, bytes, bytes | None]:
        n = len(frame)
        if n < ETH_HEADER:
            return DROP, frame, None
        etype = frame[12:14]
        if etype == ETH_IPV4:
            pkt = frame[ETH_HEADER:]
            if len(pkt) < 20:
                return DROP, frame, None
            total = (pkt[2] << 8) | pkt[3]
            if total < len(pkt):
                pkt = pkt[:total]   # Ethernet padding
            return SEND_IP, pkt, None
        if etype == ETH_ARP:
            return self._arp(frame)
        dst = frame[:6]
        if dst[0] & 1:
            return FLOOD, frame, None
        key = self.key_of_mac.get(dst)
        if key is not None:
            return UNICAST, frame, key
        self.stats["dropped"] += 1
        return DROP, frame, None

    def _arp(self, frame: bytes) -> tuple[int, bytes, bytes | None]:
        if len(frame) < 42:
            return DROP, frame, None
        sha, spa, tpa = frame[22:28], frame[28:32], frame[38:42]
        if frame[20:22] == _ARP_REQUEST:
            if tpa == self.ip or tpa == spa:
                return DROP, frame, None   # our own probes and gratuitous announcements
            mac = self.mac_of_ip.get(tpa)
            if mac is not None:
                self.stats["arp_answered"] += 1
                return REPLY, sha + mac + ETH_ARP + _ARP_HEAD + mac + tpa + sha + spa, None
            if self._in_pool(tpa):
                return DROP, frame, None   # an overlay address nobody holds
            if self.routes and any(ipaddress.IPv4Address(tpa) in n for n in self.routes):
                self.stats["arp_answered"] += 1   # a host behind a gateway peer: we are its router
                return REPLY, sha + GATEWAY_MAC + ETH_ARP + _ARP_HEAD + GATEWAY_MAC + tpa + sha + spa, None
        dst = frame[:6]
        if dst[0] & 1:
            return FLOOD, frame, None
        key = self.key_of_mac.get(dst)
        return (UNICAST, frame, key) if key is not None else (DROP, frame, None)

    # ------------------------------------------------------------------ tunnel -> device
    def header_for(self, packet: bytes) -> bytes:
        """The Ethernet header that delivers a peer's IPv4 ``packet`` to our device. The source MAC
        is the sender's (cryptokey routing vouched for the source address); a source that is no
        node (behind a static WireGuard peer) appears behind ``GATEWAY_MAC``."""
        src, dst = packet[12:16], packet[16:20]
        if dst == self.ip:
            hdr = self._hdr_to_me.get(src)
            if hdr is not None:
                return hdr
            return self.mac + GATEWAY_MAC + ETH_IPV4
        if dst[0] < 224 and dst != self.pool_broadcast:
            # unicast to a host of our LAN: this node is a gateway and its kernel forwards it
            return self.mac + self.mac_of_ip.get(src, GATEWAY_MAC) + ETH_IPV4
        return ipv4_group_mac(dst) + self.mac_of_ip.get(src, GATEWAY_MAC) + ETH_IPV4

    def admit_frame(self, key: bytes, frame: bytes) -> bool:
        """May this frame from peer ``key`` be written to our device? (see the module docstring)"""
        if self._admit(key, frame):
            return True
        self.stats["bad_frames"] += 1
        return False

    def _admit(self, key: bytes, frame: bytes) -> bool:
        if len(frame) < ETH_HEADER or frame[6:12] != self.mac_of_key.get(key):
            return False
        dst = frame[:6]
        if not (dst[0] & 1) and dst != self.mac:
            return False
        etype = (frame[12] << 8) | frame[13]
        if etype < 0x0600:   # 802.3: a length, then 802.2 LLC (or raw IPX)
            if len(frame) > ETH_HEADER and frame[14] & 0xFE == 0xAA:   # SNAP: an EtherType inside
                return len(frame) >= 22 and ((frame[20] << 8) | frame[21]) not in _SNAP_REFUSED
            return True
        if etype == 0x0800 or etype in VLAN_TPIDS:
            return False
        if etype == 0x0806:
            return (len(frame) >= 42 and frame[16:20] == _ARP_ETHER_IPV4 and frame[22:28] == frame[6:12]
                    and (not self._in_pool(frame[28:32]) or self.mac_of_ip.get(frame[28:32]) == frame[6:12]))
        return not (etype == 0x86DD and self.refuse_ipv6)
