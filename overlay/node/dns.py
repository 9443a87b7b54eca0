"""The node's DNS answers for its peers (sans-I/O): a names table and one query in, one answer out.

Names (all case-insensitive, of online peers and of this node itself):

- ``NAME.NET`` for every network NET the node shares with NAME (``reaches``: a spoke does not see
  spokes), and the same under ``SUFFIX`` (``NAME.NET.overlay.internal``);
- bare ``NAME`` (and ``NAME.overlay.internal``) when one node alone has that name among them;
- PTR for every such virtual IP (``D.C.B.A.in-addr.arpa``) -> ``NAME.NET.overlay.internal``.

``overlay.internal``: ``.internal`` is reserved by ICANN (2024) for private use and will never be
delegated in the root, so no real domain is shadowed; the extra label keeps clear of other private
uses of it (cloud VM names), and one routing domain (``~overlay.internal``) covers every network.

Answers: A for a name of the table; AAAA (and any other type) for such a name: NOERROR with no
record; a name under one of our zones (a network, the suffix, the pool's reverse addresses) that
is no peer: NXDOMAIN; anything else: REFUSED. The node never forwards: it is no resolver for
other names (and never an open one).

``parse_query`` bounds what it accepts: 512 bytes over UDP unless the query carries EDNS (then
``MAX_EDNS_QUERY``), one question, names of at most 255 bytes with at most ``MAX_POINTERS``
compression pointers, each pointing backwards. Anything else is ``Malformed`` (the caller drops
and counts it; nothing is sent back).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

SUFFIX = "overlay.internal"
TTL = 5                 # seconds: answers follow membership, renames and presence at once
MAX_UDP_QUERY = 512     # RFC 1035; larger only with EDNS
MAX_EDNS_QUERY = 1232   # the EDNS payload size of DNS flag day 2020; also our advertised size
MAX_TCP_QUERY = 4096
MAX_POINTERS = 8
MAX_ADDITIONAL = 2
RATE, BURST = 2000.0, 500.0   # queries per second per source (one resolver speaks for every local program)

QTYPE_A, QTYPE_PTR, QTYPE_AAAA, QTYPE_OPT, QTYPE_ANY = 1, 12, 28, 41, 255
CLASS_IN = 1
NOERROR, FORMERR, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 3, 4, 5
_HEADER = struct.Struct("!HHHHHH")
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")   # a name that is no DNS label (a static peer's) is left out
_OPT = struct.pack("!BHHIH", 0, QTYPE_OPT, MAX_EDNS_QUERY, 0, 0)


class Malformed(ValueError):
    """A datagram that is no acceptable query: dropped and counted, never answered."""


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str            # lower case, without the final dot
    qtype: int
    qclass: int
    question: bytes      # the question as sent (name in the client's case, type, class)
    edns: bool


def _read_name(data: bytes, pos: int) -> tuple[str, int]:
    """The name at ``pos`` and the offset after it (after the first pointer, if any)."""
    labels: list[str] = []
    end = None
    hops = 0
    length = 0
    while True:
        if pos >= len(data):
            raise Malformed("name runs past the end")
        n = data[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise Malformed("truncated pointer")
            target = ((n & 0x3F) << 8) | data[pos + 1]
            hops += 1
            if hops > MAX_POINTERS or target >= pos:
                raise Malformed("bad compression pointer")
            if end is None:
                end = pos + 2
            pos = target
            continue
        if n & 0xC0:
            raise Malformed("bad label type")
        pos += 1
        if n == 0:
            break
        label = data[pos:pos + n]
        if len(label) < n:
            raise Malformed("label runs past the end")
        length += n + 1
        if length > 254:
            raise Malformed("name longer than 255 bytes")
        try:
            labels.append(label.decode("ascii").lower())
        except UnicodeDecodeError:
            raise Malformed("non-ASCII label") from None
        pos += n
    return ".".join(labels), end if end is not None else pos


def parse_query(data: bytes, tcp: bool = False) -> Query:
    """One DNS query, or ``Malformed``."""
    if len(data) > (MAX_TCP_QUERY if tcp else MAX_EDNS_QUERY):
        raise Malformed("oversized")
    if len(data) < _HEADER.size:
        raise Malformed("short header")
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(data)
    if flags & 0x8000:
        raise Malformed("a response, not a query")
    if qd != 1 or an or ns or ar > MAX_ADDITIONAL:
        raise Malformed("not exactly one question")
    name, pos = _read_name(data, _HEADER.size)
    if pos + 4 > len(data):
        raise Malformed("truncated question")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    question = data[_HEADER.size:pos + 4]
    pos += 4
    edns = False
    for _ in range(ar):
        _, pos = _read_name(data, pos)
        if pos + 10 > len(data):
            raise Malformed("truncated record")
        rtype, _, _, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10 + rdlen
        if pos > len(data):
            raise Malformed("truncated record data")
        edns = edns or rtype == QTYPE_OPT
    if not tcp and len(data) > MAX_UDP_QUERY and not edns:
        raise Malformed("over 512 bytes without EDNS")
    return Query(qid, flags, name, qtype, qclass, question, edns)


def _encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.split("."):
        out.append(len(label))
        out += label.encode("ascii")
    out.append(0)
    return bytes(out)


def reverse_name(ip: str) -> str:
    return ipaddress.IPv4Address(ip).reverse_pointer


class Names:
    """The names table: name -> virtual IP, reverse name -> full name, and the zones we answer for."""

    def __init__(self, forward: dict[str, str], reverse: dict[str, str], zones: Iterable[str],
                 pool: ipaddress.IPv4Network | None = None):
        self.forward = forward
        self.reverse = reverse
        self.zones = frozenset(zones)
        self.pool = pool

    @classmethod
    def build(cls, peers: Iterable[dict], me: dict | None = None, networks: Iterable[str] = (),
              pool: ipaddress.IPv4Network | None = None) -> Names:
        """From the daemon's peers (``{name, ip, online, networks}``; offline ones are left out),
        this node (``me``: name, ip, networks) and the names of its networks."""
        entries = [p for p in peers if p.get("online") and p.get("ip") and _LABEL.fullmatch(p["name"])]
        if me and me.get("ip") and me.get("name"):
            entries.append({"name": me["name"], "ip": me["ip"], "networks": list(me.get("networks", ()))})
        forward: dict[str, str] = {}
        reverse: dict[str, str] = {}
        owners: dict[str, set[str]] = {}
        for p in entries:
            name, ip = p["name"].lower(), p["ip"]
            owners.setdefault(name, set()).add(ip)
            nets = sorted(p["networks"])
            for net in nets:
                forward[f"{name}.{net}"] = ip
                forward[f"{name}.{net}.{SUFFIX}"] = ip
            reverse.setdefault(reverse_name(ip), f"{name}.{nets[0]}.{SUFFIX}" if nets else f"{name}.{SUFFIX}")
        for name, ips in owners.items():
            if len(ips) == 1:       # a bare name only when it is unambiguous
                forward[name] = forward[f"{name}.{SUFFIX}"] = next(iter(ips))
        zones = {n.lower() for n in networks}
        return cls(forward, reverse, zones | {f"{n}.{SUFFIX}" for n in zones} | {SUFFIX}, pool)

    def names(self) -> list[str]:
        """The names answered (without the suffixed copies), for ``overlay status``."""
        return sorted(n for n in self.forward if not n.endswith("." + SUFFIX))

    def lookup(self, name: str, qtype: int) -> tuple[int, bytes | None]:
        """(rcode, record data or None) and whether the record is A or PTR follows from qtype."""
        if name.endswith(".in-addr.arpa"):
            target = self.reverse.get(name)
            if target is not None:
                return NOERROR, _encode_name(target) if qtype in (QTYPE_PTR, QTYPE_ANY) else None
            return (NXDOMAIN if self._in_pool(name) else REFUSED), None
        ip = self.forward.get(name)
        if ip is not None:
            return NOERROR, ipaddress.IPv4Address(ip).packed if qtype in (QTYPE_A, QTYPE_ANY) else None
        if name in self.zones:
            return NOERROR, None            # a zone's apex exists (an NXDOMAIN would hide its names)
        if any(name.endswith("." + z) for z in self.zones):
            return NXDOMAIN, None
        return REFUSED, None

    def _in_pool(self, name: str) -> bool:
        parts = name[:-len(".in-addr.arpa")].split(".")
        if self.pool is None or len(parts) != 4:
            return False
        try:
            return ipaddress.IPv4Address(".".join(reversed(parts))) in self.pool
        except ValueError:
            return False


EMPTY = Names({}, {}, ())


def answer(q: Query, names: Names) -> bytes:
    """The response to ``q`` from ``names`` (at most ~600 bytes: one question, one record)."""
    opcode = (q.flags >> 11) & 0xF
    rd = q.flags & 0x0100
    if opcode != 0:
        rcode, rdata = NOTIMP, None
    elif q.qclass != CLASS_IN:
        rcode, rdata = REFUSED, None
    else:
        rcode, rdata = names.lookup(q.name, q.qtype)
    aa = 0x0400 if rcode in (NOERROR, NXDOMAIN) else 0
    flags = 0x8000 | (opcode << 11) | aa | rd | rcode
    records = b""
    if rdata is not None:
        rtype = QTYPE_PTR if q.name.endswith(".in-addr.arpa") else QTYPE_A
        records = struct.pack("!HHHIH", 0xC00C, rtype, CLASS_IN, TTL, len(rdata)) + rdata
    out = _HEADER.pack(q.id, flags, 1, 1 if records else 0, 0, 1 if q.edns else 0) + q.question + records
    return out + _OPT if q.edns else out


class Responder:
    """Queries in, answers out, with bounded cost: a token bucket per source (``RateLimiter``: a
    bounded table), and counters of what was answered and dropped. ``names`` is called for the
    current table (the daemon rebuilds it when its state changes); ``local(source)`` says whether
    a source is this machine: others (peers reaching the overlay address) are refused, since the
    table shows every network of this node, not only the ones shared with them."""

    def __init__(self, names, local=lambda source: True, rate: float = RATE, burst: float = BURST):
        from overlay.wire.ratelimit import RateLimiter
        self.names = names
        self.local = local
        self.limiter = RateLimiter(rate, burst)
        self.stats = {"answered": 0, "refused": 0, "malformed": 0, "rate_limited": 0, "foreign": 0}

    def handle(self, data: bytes, source, now: float, tcp: bool = False) -> bytes | None:
        if not self.limiter.allow(source, now):
            self.stats["rate_limited"] += 1
            return None
        try:
            q = parse_query(data, tcp)
        except Malformed:
            self.stats["malformed"] += 1
            return None
        if not self.local(source):
            self.stats["foreign"] += 1
            return answer(q, EMPTY)
        out = answer(q, self.names())
        self.stats["refused" if out[3] & 0xF == REFUSED else "answered"] += 1
        return out
