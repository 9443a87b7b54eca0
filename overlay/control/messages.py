"""Control-protocol messages: names, bounds and validation shared by server and node.

Every message is a JSON object with a type ``t``. Requests from a node carry an integer ``id``;
the server answers each with ``{"t": "ok", "id": ...}`` or
``{"t": "error", "id": ..., "code": ..., "message": ...}``. Everything else the server sends is
an event without ``id``. ``validate_request`` checks a decoded request against the schema below
so the server core only ever sees well-typed, bounded input.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re

from overlay.control.resync import MAX_SYNC_NETWORKS, valid_sync

PROTOCOL_VERSION = 1

MAX_NAME = 32
MAX_PASSWORD = 256
MAX_CHAT = 1000
CHAT_HISTORY = 100
MEMBER_BATCH = 200  # members per "members" event, so every frame stays far below 64 KiB

_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")


class RequestError(Exception):
    """A request the server refuses; ``code`` is stable (scripts match on it)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def normalize_name(name: object, what: str = "name") -> str:
    """Names of nodes and networks are DNS labels (they resolve as ``peer`` and ``peer.network``)."""
    if not isinstance(name, str):
        raise RequestError("bad_request", f"{what} must be a string")
    n = name.strip().lower()
    if not _NAME_RE.match(n):
        raise RequestError(
            "invalid_name",
            f"invalid {what} {name[:40]!r}: use 1-{MAX_NAME} letters, digits or '-', "
            "starting and ending with a letter or digit",
        )
    return n


def key_to_text(key: bytes) -> str:
    return base64.b64encode(key).decode()


def key_from_text(text: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ValueError("not a base64 key") from None
    if len(key) != 32:
        raise ValueError("a key is 32 bytes")
    return key


# type -> {field: (python type, required)}
_STR, _INT, _BOOL = str, int, bool
REQUEST_SCHEMA: dict[str, dict[str, tuple[type, bool]]] = {
    "hello": {"name": (_STR, True), "version": (_INT, True), "iface": (_STR, False),
              "routes": (list, False),   # subnets this node offers as a gateway (--advertise-routes)
              "caps": (list, False),     # what its data plane accepts (CAP_* below)
              "sync": (dict, False)},    # network -> digest of the members it holds (overlay/control/resync.py)
    "ping": {},
    # proof: of work on a new node's key, when the hello reply asks one (overlay/control/identity_proof.py)
    "create": {"network": (_STR, True), "password": (_STR, True),
               "approval": (_BOOL, False), "max_members": (_INT, False), "proof": (_STR, False)},
    "join": {"network": (_STR, True), "password": (_STR, True), "proof": (_STR, False)},
    "leave": {"network": (_STR, True)},
    "chat": {"network": (_STR, True), "text": (_STR, True)},
    "history": {"network": (_STR, True)},
    "members": {"network": (_STR, True)},
    "admin": {"network": (_STR, True), "action": (_STR, True),
              "target": (_STR, False), "value": (_INT, False), "password": (_STR, False),
              "prefix": (_STR, False)},
    "rename": {"name": (_STR, True)},
    "presence": {"network": (_STR, True), "online": (_BOOL, True)},  # go offline in one network
    # data plane introduction (see overlay/node/dataplane.py)
    "endpoints": {"candidates": (list, True), "nat": (dict, False)},
    "punch": {"peer": (_STR, True)},
    "relay": {"to": (_STR, True), "data": (_STR, True)},   # fire and forget: no reply
    "turn": {},     # fresh TURN credentials (overlay/server/turn_credentials.py), when the server has one
}

# Capabilities a node states in its hello; the server hands them to its peers with its member
# record (``caps``, only while it is online). Unknown ones are passed on as they are (bounded), so
# a new capability needs no new server; a node ignores those it does not know. Absent: none.
CAP_NO_INNER_CHECKSUM = "no-inner-csum"
"""Send this node inner TCP/UDP packets without computed checksums (field 0): every packet is
authenticated by the tunnel, and the node never hands one unchanged to a kernel that would verify it."""
MAX_CAPS = 8
_CAP_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def parse_caps(raw: object) -> tuple[str, ...]:
    """Capabilities from a hello or a member record: the well-formed ones, sorted, at most MAX_CAPS."""
    if not isinstance(raw, list):
        return ()
    return tuple(sorted({c for c in raw[:MAX_CAPS] if isinstance(c, str) and _CAP_RE.match(c)}))


MAX_CANDIDATES = 16
CANDIDATE_KINDS = {"lan", "srflx", "magic", "predicted", "peer"}
MAX_RELAY_B64 = 4096

ADMIN_ACTIONS = {
    "lock", "unlock", "approval-on", "approval-off", "pending", "approve", "reject",
    "kick", "ban", "unban", "limit", "delete", "transfer", "password",
    "type", "hub-on", "hub-off", "gateway", "routes", "route-approve", "route-remove",
    "encryption-on", "encryption-off",
}
ADMIN_NEEDS_TARGET = {"approve", "reject", "kick", "ban", "unban", "transfer", "type", "hub-on", "hub-off",
                      "gateway", "route-approve", "route-remove"}
MAX_ROUTES = 16   # subnets one node may advertise
# mesh: everyone reaches everyone; hub-and-spoke: spokes reach only hubs; gateway: members reach only
# the gateway member (whose LAN they use). The server hands each node only the peers it may reach.
NETWORK_TYPES = ("mesh", "hub-and-spoke", "gateway")


def parse_route(text: object) -> ipaddress.IPv4Network:
    """A subnet a gateway member offers, like ``192.168.1.0/24``; ValueError with the fix."""
    if not isinstance(text, str) or len(text) > 18:
        raise ValueError("a route is an IPv4 subnet like 192.168.1.0/24")
    try:
        net = ipaddress.IPv4Network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 subnet like 192.168.1.0/24") from None
    if "/" not in text:
        raise ValueError(f"{text!r}: give the prefix length, like {text.strip()}/32")
    if str(net) != text.strip():
        raise ValueError(f"{text!r} has host bits set: use {net}")
    if net.prefixlen < 8 or net.is_loopback or net.is_multicast or net.is_reserved or net.overlaps(
            ipaddress.IPv4Network("0.0.0.0/8")):
        raise ValueError(f"{text!r} cannot be a route (at most a /8, no loopback, multicast or reserved addresses)")
    return net


def _encodable(obj, depth: int = 0) -> bool:
    """Every string inside is valid Unicode (JSON allows lone surrogates; UTF-8 and SQLite do not)."""
    if depth > 8:
        return False
    if isinstance(obj, str):
        try:
            obj.encode()
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(obj, dict):
        return all(_encodable(k, depth + 1) and _encodable(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_encodable(v, depth + 1) for v in obj)
    return True


def validate_request(msg: dict) -> dict:
    """Return ``msg`` if it is a well-formed request, else raise RequestError."""
    if not _encodable(msg):
        raise RequestError("bad_request", "request contains invalid Unicode or is nested too deeply")
    t = msg.get("t")
    rid = msg.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**53:
        raise RequestError("bad_request", "request without a valid integer id")
    if not isinstance(t, str):
        raise RequestError("bad_request", "request without a type")
    schema = REQUEST_SCHEMA.get(t)
    if schema is None:
        raise RequestError("unknown_type", f"unknown request type {t[:32]!r}")
    for field, (typ, required) in schema.items():
        if field not in msg:
            if required:
                raise RequestError("bad_request", f"{t}: missing field {field!r}")
            continue
        v = msg[field]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise RequestError("bad_request", f"{t}: field {field!r} must be {typ.__name__}")
    extra = set(msg) - set(schema) - {"t", "id"}
    if extra:
        raise RequestError("bad_request", f"{t}: unexpected field(s) {sorted(extra)[:5]}")
    if "proof" in msg and len(msg["proof"]) > 64:
        raise RequestError("bad_request", "proof too long")
    if "password" in msg and not 1 <= len(msg["password"]) <= MAX_PASSWORD:
        raise RequestError("bad_request", f"password must be 1-{MAX_PASSWORD} characters")
    if t == "chat" and not 1 <= len(msg["text"]) <= MAX_CHAT:
        raise RequestError("bad_request", f"chat text must be 1-{MAX_CHAT} characters")
    if t == "admin":
        if msg["action"] not in ADMIN_ACTIONS:
            raise RequestError("bad_request", f"unknown admin action {msg['action'][:32]!r}")
        if msg["action"] in ADMIN_NEEDS_TARGET and "target" not in msg:
            raise RequestError("bad_request", f"admin {msg['action']} needs a member name")
        if (msg["action"] == "password") != ("password" in msg):
            raise RequestError("bad_request", "admin password (and only it) takes a new password")
        if (msg["action"] in ("route-approve", "route-remove")) != ("prefix" in msg):
            raise RequestError("bad_request", "admin route-approve / route-remove (and only they) take a prefix")
        if "prefix" in msg:
            try:
                parse_route(msg["prefix"])
            except ValueError as e:
                raise RequestError("bad_request", str(e)) from None
        if msg["action"] == "type" and msg["target"] not in NETWORK_TYPES:
            raise RequestError("bad_request", f"network type must be one of {', '.join(NETWORK_TYPES)}")
        if msg["action"] == "limit" and not 0 <= msg.get("value", -1) <= 65535:
            raise RequestError("bad_request", "limit needs a member count 0-65535 (0 = no limit)")
        if msg["action"] == "password" and msg.get("value", 0) not in (0, 1):
            raise RequestError("bad_request", "admin password: value is 1 to remove the members, else 0")
    if t == "hello" and "routes" in msg:
        if len(msg["routes"]) > MAX_ROUTES:
            raise RequestError("bad_request", f"at most {MAX_ROUTES} routes")
        for r in msg["routes"]:
            try:
                parse_route(r)
            except ValueError as e:
                raise RequestError("bad_request", str(e)) from None
    if t == "hello" and "caps" in msg and (len(msg["caps"]) > MAX_CAPS or len(parse_caps(msg["caps"])) != len(msg["caps"])):
        raise RequestError("bad_request", f"caps: at most {MAX_CAPS} distinct names of 1-32 letters, digits or '-'")
    if t == "hello" and "sync" in msg and not valid_sync(msg["sync"]):
        raise RequestError("bad_request", f"sync: at most {MAX_SYNC_NETWORKS} network names to digests")
    if t == "endpoints":
        cands = msg["candidates"]
        if len(cands) > MAX_CANDIDATES:
            raise RequestError("bad_request", f"at most {MAX_CANDIDATES} candidates")
        for c in cands:
            if (not isinstance(c, dict) or set(c) != {"addr", "kind"} or not isinstance(c["addr"], str)
                    or len(c["addr"]) > 64 or not isinstance(c["kind"], str) or c["kind"] not in CANDIDATE_KINDS):
                raise RequestError("bad_request", "a candidate is {addr: 'ip:port', kind: lan|srflx|magic|predicted|peer}")
        if len(json.dumps(msg.get("nat", {}))) > 1024:
            raise RequestError("bad_request", "nat description too large")
    if t in ("punch", "relay"):
        field_ = "peer" if t == "punch" else "to"
        try:
            key_from_text(msg[field_])
        except ValueError:
            raise RequestError("bad_request", f"{t}: {field_} must be a base64 node key") from None
    if t == "relay" and len(msg["data"]) > MAX_RELAY_B64:
        raise RequestError("bad_request", "relay payload too large")
    if "max_members" in msg and not 0 <= msg["max_members"] <= 65535:
        raise RequestError("bad_request", "max_members must be 0-65535 (0 = no limit)")
    return msg


def ok(rid: int, **fields) -> dict:
    return {"t": "ok", "id": rid, **fields}


def error(rid: int | None, code: str, message: str) -> dict:
    return {"t": "error", "id": rid, "code": code, "message": message}
