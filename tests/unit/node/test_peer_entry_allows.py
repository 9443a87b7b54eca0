"""Cryptokey routing in: ``PeerEntry.allows`` with its single-address shortcut, computed when the
prefixes are set, follows every new assignment."""

from __future__ import annotations

import ipaddress
import socket

from overlay.node.peers import PeerEntry


def ip(text: str) -> bytes:
    return socket.inet_aton(text)


def test_allows_follows_every_assignment_of_the_prefixes():
    e = PeerEntry(b"k" * 32, "m", "100.64.0.2", None)
    assert e.allows(ip("100.64.0.2")) and not e.allows(ip("100.64.0.3"))
    e.allowed = [ipaddress.IPv4Network("100.64.0.2/32"), ipaddress.IPv4Network("192.168.1.0/24")]
    assert e.allows(ip("100.64.0.2")) and e.allows(ip("192.168.1.77")) and not e.allows(ip("192.168.2.1"))
    e.allowed = [ipaddress.IPv4Network("100.64.0.9/32")]       # back to one address, another one
    assert e.allows(ip("100.64.0.9")) and not e.allows(ip("100.64.0.2")) and not e.allows(ip("192.168.1.77"))
    e.allowed = [ipaddress.IPv4Network("10.0.0.0/8")]          # one prefix, not one address
    assert e.allows(ip("10.1.2.3")) and not e.allows(ip("11.0.0.1"))
    assert e.allowed == [ipaddress.IPv4Network("10.0.0.0/8")]


def test_a_static_peer_with_prefixes():
    nets = [ipaddress.IPv4Network("10.9.0.0/16"), ipaddress.IPv4Network("10.8.0.1/32")]
    e = PeerEntry(b"s" * 32, "s", "10.9.0.0", None, nets)
    assert e.allows(ip("10.9.200.1")) and e.allows(ip("10.8.0.1")) and not e.allows(ip("10.8.0.2"))
