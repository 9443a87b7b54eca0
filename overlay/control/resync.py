"""Resynchronisation without the snapshot: what server and node share to agree on a network's members.

A node that comes back (a new session after a server restart, a lost connection, a move to
another server of the deployment) usually holds exactly the member records the server would send
it, but for their presence. So its hello carries, per network, a ``digest`` of what it holds
(``sync``: network -> digest); where the server's digest of the same view matches, the server
sends the network's info and one ``presence`` event instead of the records (overlay/server/
mediator.py): the members' presence as a bitmap over the members sorted by key, and the online
members' interface kinds and capabilities as a few groups with their own bitmaps. A mismatch, a
network that is not a mesh, or a node that sends no ``sync`` gets the full snapshot as before.

The digest covers what does not change with presence: per member its key, name, virtual IP,
role, kind and approved gateway routes (``routes`` and ``withdrawn`` together), sorted by key.
It leaves out ``online``, ``iface`` and ``caps`` (the ``presence`` event carries them) and which
approved routes a gateway currently advertises (the server sends the full record of every member
with approved routes after the ``presence`` event).

The same ``presence`` event carries presence changes in a storm: when many members of a big
network change within a short time, the server sends the members that understand it (their hello
had ``sync``) one such event per network and window rather than one record per change.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Iterable, Sequence

DIGEST_CHARS = 24            # base64 of 16 bytes of SHA-256
MAX_SYNC_NETWORKS = 64       # networks a hello may list (a node is in at most 64)
MAX_PRESENCE_GROUPS = 16     # distinct (iface, caps) combinations in one presence event


def stable_line(key: str, name: str, ip: str, role: str, kind: str | None, routes: Iterable[str]) -> str:
    """One member's part of the digest (``routes``: its approved routes, live or withdrawn)."""
    return f"{key}\t{name}\t{ip}\t{role}\t{kind or ''}\t{','.join(sorted(set(routes)))}\n"


def digest(lines: Iterable[tuple[str, str]]) -> str:
    """The digest of a network's members: ``(key, stable_line)`` pairs in any order."""
    h = hashlib.sha256()
    for _key, line in sorted(lines):
        h.update(line.encode())
    return base64.b64encode(h.digest()[:16]).decode()


def record_line(rec: dict) -> str:
    """``stable_line`` of a member record as the server sends it."""
    routes = list(rec.get("routes") or ()) + list(rec.get("withdrawn") or ())
    return stable_line(rec["key"], rec["name"], rec["ip"], rec["role"], rec.get("kind"), routes)


def encode_bits(flags: Sequence[bool]) -> str:
    """A bitmap (first flag in the top bit of the first byte), base64."""
    out = bytearray((len(flags) + 7) // 8)
    for i, f in enumerate(flags):
        if f:
            out[i >> 3] |= 0x80 >> (i & 7)
    return base64.b64encode(bytes(out)).decode()


def decode_bits(text: object, n: int) -> list[bool] | None:
    """The first ``n`` flags of a bitmap from ``encode_bits``; None if it is not one of that size."""
    if not isinstance(text, str) or len(text) > 4 * ((n + 7) // 8 + 2) // 3 + 4:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        return None
    if len(raw) != (n + 7) // 8:
        return None
    return [bool(raw[i >> 3] & (0x80 >> (i & 7))) for i in range(n)]


def valid_sync(raw: object) -> bool:
    """A hello's ``sync`` field: at most MAX_SYNC_NETWORKS network names to digests (strings)."""
    return (isinstance(raw, dict) and len(raw) <= MAX_SYNC_NETWORKS
            and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 64
                    for k, v in raw.items()))
