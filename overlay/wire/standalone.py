"""A one-peer WireGuard endpoint (Device + UdpSocket) that answers ping: the conformance harness.

    python -m overlay.wire.standalone --key PRIV --peer PUB --listen 10.0.0.2:51821 \
        --endpoint 10.0.0.1:51820 --address 10.100.0.2 [--initiate] [--ping 10.100.0.1]

It speaks WireGuard to a stock peer (wireguard-go, the kernel module) and, inside the tunnel,
answers ICMP echo requests to ``--address`` with a minimal IPv4/ICMP responder (the userspace
TCP/IP stack replaces it in the node). Events and, on SIGTERM, final counters are printed as JSON
lines on stdout so a test can watch the protocol from outside. Keys are base64, as ``wg`` uses.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import signal
import struct
import sys
from typing import cast

from overlay.hostport import parse_hostport
from overlay.io.udp import UdpSocket, bind_udp
from overlay.wire.device import Device
from overlay.wire.events import EndpointChanged, HandshakeCompleted, PacketReceived, PeerUnreachable
from overlay.wire.messages import is_wireguard

_ICMP_ECHO_REQUEST = 8
_ICMP_ECHO_REPLY = 0


def internet_checksum(data: bytes) -> int:
    """RFC 1071 checksum; the big-integer modulo folds the one's-complement sum at C speed."""
    if len(data) & 1:
        data += b"\0"
    return ~(int.from_bytes(data, "big") % 0xFFFF) & 0xFFFF


def checksum_ok(data: bytes) -> bool:
    """True if ``data`` including its checksum field sums to one's-complement zero."""
    if len(data) & 1:
        data += b"\0"
    return int.from_bytes(data, "big") % 0xFFFF == 0


def ipv4_icmp(src: bytes, dst: bytes, icmp_type: int, ident: int, seq: int, payload: bytes) -> bytes:
    icmp = bytearray(struct.pack(">BBHHH", icmp_type, 0, 0, ident, seq) + payload)
    struct.pack_into(">H", icmp, 2, internet_checksum(bytes(icmp)))
    header = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0, src, dst))
    struct.pack_into(">H", header, 10, internet_checksum(bytes(header)))
    return bytes(header + icmp)


def parse_echo(packet: bytes, address: bytes) -> tuple[int, bytes, int, int, bytes] | None:
    """(ICMP type, source, ident, seq, payload) of an echo request/reply to ``address``, else None."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1 or packet[16:20] != address:
        return None
    ihl = (packet[0] & 15) * 4
    total = struct.unpack_from(">H", packet, 2)[0]
    if ihl < 20 or total > len(packet) or total < ihl + 8 or not checksum_ok(packet[:ihl]):
        return None
    icmp = packet[ihl:total]
    if not checksum_ok(icmp) or icmp[0] not in (_ICMP_ECHO_REQUEST, _ICMP_ECHO_REPLY) or icmp[1] != 0:
        return None
    ident, seq = struct.unpack_from(">HH", icmp, 4)
    return icmp[0], packet[12:16], ident, seq, icmp[8:]


class Harness:
    def __init__(self, args: argparse.Namespace, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.address = ipaddress.IPv4Address(args.address).packed
        self.peer = base64.b64decode(args.peer)
        self.device = Device(base64.b64decode(args.key))
        self.device.add_peer(
            self.peer,
            endpoint=parse_hostport(args.endpoint) if args.endpoint else None,
            persistent_keepalive=args.persistent_keepalive,
        )
        self.device.force_under_load = args.under_load
        self.ping_target = ipaddress.IPv4Address(args.ping).packed if args.ping else None
        self.ping_seq = 0
        self.echo_replies_sent = 0
        self.echo_replies_received = 0
        self.udp = UdpSocket(bind_udp(*parse_hostport(args.listen, allow_zero=True)), self.on_datagram, on_batch=self.flush, loop=loop)
        self.timer: asyncio.TimerHandle | None = None
        if args.initiate:
            self.device.initiate_handshake(self.peer, loop.time())
        self.flush()
        if self.ping_target:
            loop.call_later(0.2, self.ping)

    def print(self, **event) -> None:
        print(json.dumps(event), flush=True)

    def on_datagram(self, data: memoryview, addr) -> None:
        if is_wireguard(data):
            self.device.receive(data, addr, self.loop.time())

    def ping(self) -> None:
        self.ping_seq += 1
        assert self.ping_target is not None   # ping runs only with a target (for mypy)
        packet = ipv4_icmp(self.address, self.ping_target, _ICMP_ECHO_REQUEST, 0x4F56, self.ping_seq, b"overlay-ping")
        self.device.send(self.peer, packet, self.loop.time())
        self.flush()
        self.loop.call_later(1.0, self.ping)

    def flush(self) -> None:
        """After any input: answer packets, report events, send datagrams, re-arm the timer."""
        dev, now = self.device, self.loop.time()
        while (event := dev.next_event()) is not None:
            if isinstance(event, PacketReceived):
                self.on_packet(event.packet, now)
            elif isinstance(event, HandshakeCompleted):
                self.print(event="handshake-completed")
            elif isinstance(event, EndpointChanged):
                self.print(event="endpoint-changed", addr=list(cast(tuple, event.addr)))
            elif isinstance(event, PeerUnreachable):
                self.print(event="peer-unreachable")
        self.udp.send_batch(dev.datagrams_to_send())
        if self.timer is not None:
            self.timer.cancel()
        deadline = dev.get_timer()
        self.timer = None if deadline is None else self.loop.call_at(max(deadline, now), self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        self.device.handle_timer(self.loop.time())
        self.flush()

    def on_packet(self, packet: bytes, now: float) -> None:
        echo = parse_echo(packet, self.address)
        if echo is None:
            return
        kind, source, ident, seq, payload = echo
        if kind == _ICMP_ECHO_REQUEST:
            self.device.send(self.peer, ipv4_icmp(self.address, source, _ICMP_ECHO_REPLY, ident, seq, payload), now)
            self.echo_replies_sent += 1
        else:
            self.echo_replies_received += 1
            self.print(event="echo-reply", seq=seq)

    def report(self) -> None:
        stats = dict(self.device.peer_stats(self.peer))
        stats["endpoint"] = list(stats["endpoint"]) if stats["endpoint"] else None
        self.print(
            event="stats", device=self.device.stats, peer=stats, udp=self.udp.stats,
            echo_replies_sent=self.echo_replies_sent, echo_replies_received=self.echo_replies_received,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", required=True, help="our private key, base64")
    parser.add_argument("--peer", required=True, help="the peer's public key, base64")
    parser.add_argument("--listen", required=True, help="local UDP host:port")
    parser.add_argument("--endpoint", help="the peer's UDP host:port (else learnt from its handshake)")
    parser.add_argument("--address", required=True, help="our IPv4 address inside the tunnel")
    parser.add_argument("--persistent-keepalive", type=float, default=None)
    parser.add_argument("--initiate", action="store_true", help="send a handshake initiation at start")
    parser.add_argument("--under-load", action="store_true", help="demand cookies (mac2) from every handshake")
    parser.add_argument("--ping", help="inner IPv4 address to send an echo request to every second")
    args = parser.parse_args(argv)

    loop = asyncio.new_event_loop()
    harness = Harness(args, loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    harness.print(event="listening", addr=list(cast(tuple, harness.udp.local_address)))
    try:
        loop.run_forever()
    finally:
        harness.report()
        harness.udp.close()
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
