"""The mediation server's logic, sans-I/O: networks, membership, presence, chat, admin.

The asyncio glue (overlay/server/app.py) authenticates a connection (Noise XX), validates each
request (overlay/control/messages.py) and calls ``hello`` / ``handle`` / ``disconnect`` with the
node's public key and ``now``. Replies are returned; events for other nodes are appended to
``outgoing`` as ``(node_key, message)`` for the glue to deliver to whoever is online: it does so
once per event-loop turn (batched per member: overlay/server/fanout.py) and then calls
``end_turn``. A change is pushed only to the members it concerns, as a delta (one record); in a
big network's storm, presence changes are held for a window (overlay/server/presence.py: the glue
calls ``flush_presence`` when ``presence.due()`` comes). A returning node whose hello names the
digest of the member records it holds gets a presence bitmap instead of them
(overlay/control/resync.py).

Argon2id hashing is slow on purpose, so the glue does it off the event loop: it calls
``join_precheck`` (rate limits, existence) to get the stored hash, verifies the password in a
thread, and passes the verdict to ``handle`` as ``password_ok``; for ``create`` it passes the new
hash as ``password_hash``.

Identities: a hello stores nothing. A node is stored, and given its virtual IP (event
``address``), the first time it creates, joins or asks to join a network, and only with a proof of
work on its key (overlay/control/identity_proof.py; ``identity_bits``, checked by the glue off the
event loop between ``proof_to_check`` and ``proof_checked``), so throw-away identities cost their
maker; and at most ``new_nodes_per_hour`` new nodes per source address (an IPv6 /64) and hour, a
bound on stored state high enough for a crowd behind one NAT. Expiry policy (``expire``, run
hourly by the glue): a stored node that is in no network, owns none, is on no ban list and is
offline is forgotten ``NODE_TTL`` (30 days) after it was last seen, together with its pending
join requests; its address returns to the pool. Members stay until their network's owner removes
them or they leave.

Network types (``admin type``): in a mesh everyone reaches everyone; in a hub-and-spoke network
spokes reach only hubs (hubs reach everyone); in a gateway network members reach only the gateway
member (the owner unless one is named). A node is told only about the members it may reach, and
introductions (punch) and relaying happen only between such pairs.
"""

from __future__ import annotations

import base64
import ipaddress
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from overlay.control.messages import (
    MEMBER_BATCH, PROTOCOL_VERSION, RequestError, key_from_text, key_to_text, normalize_name, ok, parse_route,
)
from overlay.control.messages import parse_caps
from overlay.control.identity_proof import DEFAULT_BITS as DEFAULT_IDENTITY_BITS
from overlay.control import resync
from overlay.nat.candidate import format_addr
from overlay.server.presence import PresenceCoalescer
from overlay.server.store import Store
from overlay.server.vips import PoolExhausted, VipAllocator

FAILED_JOIN_WINDOW = 60.0
FAILED_JOINS_PER_NODE = 5         # failed joins per node key ...
FAILED_JOINS_PER_SOURCE = 20      # ... and per source address (an IPv6 /64) per window: refused beyond
FAILED_JOINS_PER_NETWORK = 20     # beyond this many per network and window, a failure's answer waits:
FAILED_JOIN_DELAY = 2.0           # slows guessing, never refuses the right password
MAX_PENDING = 100
MAX_NETWORKS_PER_NODE = 64
DEFAULT_POOL = "100.64.0.0/10"
DEFAULT_NEW_NODES_PER_HOUR = 256  # new identities stored per source address (IPv6: /64) ...
NEW_NODES_WINDOW = 3600.0         # ... per hour
NODE_TTL = 30 * 86400.0           # a node in no network is forgotten this long after last seen
EXPIRY_INTERVAL = 3600.0


@dataclass
class _Window:
    """Event timestamps in a sliding window (bounded by the limit it enforces)."""
    times: deque = field(default_factory=deque)
    length: float = FAILED_JOIN_WINDOW

    def add(self, now: float, bound: int) -> None:
        """Record an event, keeping the last ``bound`` (a count of ``bound`` means "at least")."""
        self.times.append(now)
        if len(self.times) > bound:
            self.times.popleft()

    def count(self, now: float) -> int:
        while self.times and self.times[0] <= now - self.length:
            self.times.popleft()
        return len(self.times)

    def retry_after(self, now: float) -> int:
        return max(1, int(self.times[0] + self.length - now + 0.999))


def source_bucket(address: str | None) -> str | None:
    """What per-address limits count by: an IPv4 address, or the /64 of an IPv6 address (one
    host usually holds a whole /64)."""
    if address is None or ":" not in address:
        return address
    try:
        return str(ipaddress.IPv6Network(f"{address.split('%')[0]}/64", strict=False))
    except ValueError:
        return address


def _count_in(table: dict, k, now: float, bound: int, length: float = FAILED_JOIN_WINDOW) -> None:
    """Record an event for ``k`` in ``table`` (a window per key; the table is bounded too)."""
    w = table.get(k)
    if w is None:
        if len(table) > 100_000:  # bound memory under a flood of distinct keys or addresses
            table.clear()
        w = table[k] = _Window(length=length)
    w.add(now, bound)


class Mediator:
    def __init__(self, store: Store, pool: str = DEFAULT_POOL, *, identity_bits: int = DEFAULT_IDENTITY_BITS,
                 new_nodes_per_hour: int = DEFAULT_NEW_NODES_PER_HOUR):
        self.store = store
        self.identity_bits = identity_bits
        self.new_nodes_per_hour = new_nodes_per_hour
        self.pool = ipaddress.IPv4Network(pool)
        if self.pool.num_addresses < 4:
            raise ValueError(f"address pool {pool} is too small")
        self.online: set[bytes] = set()
        self.away: dict[bytes, set[str]] = {}  # online node -> networks it went offline in (not persisted)
        self.outgoing: deque[tuple[bytes, dict]] = deque()
        self.endpoints: dict[bytes, dict] = {}   # key -> {"candidates": [...], "nat": {...}}
        self.iface: dict[bytes, str] = {}        # online node -> "tun" / "tap" (its kernel interface)
        self.advertised: dict[bytes, list[str]] = {}  # online node -> subnets it offers (--advertise-routes)
        self.caps: dict[bytes, list[str]] = {}   # online node -> capabilities from its hello (passed to peers)
        # the relay tells us which UDP address a node registered from (its server-reflexive address)
        self.udp_addr_of: Callable[[bytes], tuple | None] = lambda key: None
        # several instances (overlay/server/pg_sync.py): the relay address of the other instance a
        # node is online on (None: it is here, or offline); handed to members in its record
        self.relay_of: Callable[[bytes], str | None] = lambda key: None
        self._fail_node: dict[bytes, _Window] = {}
        self._fail_src: dict[str, _Window] = {}      # source address (IPv6: /64) -> failed joins
        self._fail_net: dict[str, _Window] = {}
        self.vips = VipAllocator(self.pool, self.store.used_vips())
        self._guests: dict[bytes, str] = {}          # online, not stored: key -> name from hello
        self._source: dict[bytes, str] = {}          # online: key -> source address (from the glue)
        self._proven: set[bytes] = set()             # guests whose identity proof checked
        self._new_per_source: dict[str, _Window] = {}
        self._next_expiry = float("-inf")
        # Snapshots built since the glue's last ``end_turn`` (one event-loop turn): network ->
        # (snapshot context, member -> record). When every node reconnects at once, the hellos of
        # one turn in one network share the store reads and the records (encoded once too:
        # overlay/server/fanout.py). A member's records are dropped when its state changes
        # (hello, disconnect, presence), everything on any request that writes to the store.
        self._turn: dict[str, tuple[tuple, dict[bytes, dict]]] = {}
        # Resynchronisation (overlay/control/resync.py): per network, the digest of its members'
        # stable records, their keys sorted as the presence bitmap orders them, and the members
        # with approved routes; kept across turns, dropped on any request that writes to the store
        self._digests: dict[str, tuple[str, list[bytes], list[bytes]]] = {}
        self.resync_ok: set[bytes] = set()           # online nodes whose hello had ``sync``
        self.presence = PresenceCoalescer()          # a big network's presence changes in a storm
        self.synced = 0                              # snapshots skipped (digest matched)

    # ------------------------------------------------------------------ the turn's snapshot cache
    def end_turn(self) -> None:
        """The glue delivered this turn's events: what was read from the store is read again."""
        self._turn.clear()

    def _store_changed(self) -> None:
        """Something was written to the store: no read of it is reused."""
        self._turn.clear()
        self._digests.clear()

    def _forget_records(self, key: bytes) -> None:
        for _ctx, records in self._turn.values():
            records.pop(key, None)

    # ------------------------------------------------------------------ helpers
    def _push(self, key: bytes, msg: dict) -> None:
        if key in self.online:
            self.outgoing.append((key, msg))

    def _push_members(self, network: str, msg: dict, exclude: bytes | None = None) -> None:
        for k in self.store.members(network):
            if k != exclude:
                self._push(k, msg)

    # ------------------------------------------------------------------ network types
    def _topology(self, net) -> tuple[str, frozenset, bytes | None]:
        """(type, hubs, gateway) of a network: what ``_sees`` needs."""
        if net.type == "hub-and-spoke":
            return net.type, frozenset(self.store.hubs(net.name)), None
        if net.type == "gateway":
            return net.type, frozenset(), net.gateway or net.owner   # no gateway named: the owner
        return "mesh", frozenset(), None

    @staticmethod
    def _sees(topo, a: bytes, b: bytes) -> bool:
        """May ``a`` see and reach ``b`` in a network of this topology (symmetric)."""
        typ, hubs, gateway = topo
        if a == b or typ == "mesh":
            return True
        if typ == "hub-and-spoke":
            return a in hubs or b in hubs
        return gateway in (a, b)

    @staticmethod
    def _kind(topo, key: bytes) -> str | None:
        typ, hubs, gateway = topo
        if typ == "hub-and-spoke":
            return "hub" if key in hubs else "spoke"
        if typ == "gateway":
            return "gateway" if key == gateway else "member"
        return None

    def may_reach(self, a: bytes, b: bytes) -> bool:
        """``a`` and ``b`` share a network in which they see each other."""
        return any(self._sees(self._topology(self.store.network(n)), a, b)
                   for n in self.store.shared_networks(a, b))

    def reachable_peers(self, key: bytes) -> set[bytes]:
        """Every node ``key`` may reach (the relay forwards only between these)."""
        out: set[bytes] = set()
        for name in self.store.networks_of(key):
            topo = self._topology(self.store.network(name))
            out.update(k for k in self.store.members(name) if k != key and self._sees(topo, key, k))
        return out

    def _push_visible(self, network: str, about: bytes, msg: dict, topo=None, exclude: bytes | None = None) -> None:
        """Push ``msg`` (about member ``about``) to the members of ``network`` that see ``about``."""
        topo = topo or self._topology(self.store.network(network))
        for k in self.store.members(network):
            if k != exclude and self._sees(topo, k, about):
                self._push(k, msg)

    @staticmethod
    def _visible(topo, key: bytes) -> frozenset | None:
        """Whom ``key`` sees in a network of this topology: None for every member, else a (small)
        set, ``key`` included: the same relation as ``_sees``, without asking it member by member."""
        typ, hubs, gateway = topo
        if typ == "mesh" or (typ == "hub-and-spoke" and key in hubs) or (typ == "gateway" and key == gateway):
            return None
        return (hubs if typ == "hub-and-spoke" else frozenset((gateway,))) | {key}

    def _retopologize(self, name: str, before) -> None:
        """The type, hubs or gateway changed: members lose the peers they no longer see (as
        ``member_left`` with reason ``out of reach``) and get a fresh snapshot. The work is the
        members times what each one sees (not members squared): members, nodes and routes are
        read once."""
        ctx = self._snapshot_ctx(name)
        after, members, order = ctx[1], ctx[2], ctx[3]
        for k in members:
            if k not in self.online:
                continue   # it gets a full snapshot on its next hello
            was, now = self._visible(before, k), self._visible(after, k)
            if now is None:
                lost = ()
            elif was is None:
                lost = [j for j in members if j not in now]
            else:
                lost = [j for j in was if j not in now and j in order]
            for j in lost:
                self._push(k, {"t": "member_left", "network": name, "key": key_to_text(j), "reason": "out of reach"})
            self._send_network(k, name, ctx)

    def _member_record(self, network, key: bytes, node=None, topo=None, routes=None) -> dict:
        node = node or self.store.node(key)
        rec = {"name": node.name, "key": key_to_text(key), "ip": node.vip,
               "online": key in self.online and network.name not in self.away.get(key, ()),
               "role": "owner" if key == network.owner else "member"}
        kind = self._kind(topo or self._topology(network), key)
        if kind:
            rec["kind"] = kind     # hub / spoke / gateway / member, only in hub-and-spoke and gateway networks
        approved = (routes if routes is not None else self.store.routes(network.name)).get(key)
        if approved:
            # gateway routes the owner approved: handed out while the gateway is offline (members
            # say it is offline); while it is online, those it no longer advertises are "withdrawn"
            offered = self.advertised.get(key, ()) if key in self.online else approved
            live = [r for r in approved if r in offered]
            if live:
                rec["routes"] = live
            if len(live) < len(approved):
                rec["withdrawn"] = [r for r in approved if r not in offered]
        iface = self.iface.get(key)
        if iface:
            rec["iface"] = iface   # only while online with a kernel interface
        caps = self.caps.get(key)
        if caps:
            rec["caps"] = caps     # only while online (a node may come back in another mode)
        if rec["online"] and (relay := self.relay_of(key)):
            rec["relay"] = relay   # online on another instance: its relay (overlay/node/server_path.py)
        return rec

    def _network_info(self, network, key: bytes, count: int | None = None, owner=None) -> dict:
        owner = owner or self.store.node(network.owner)
        return {"name": network.name, "owner": owner.name if owner else None,
                "role": "owner" if key == network.owner else "member",
                "locked": network.locked, "approval": network.approval, "type": network.type,
                "encrypted": network.encrypted,
                "max_members": network.max_members, "count": self.store.member_count(network.name) if count is None else count}

    def _snapshot_ctx(self, name: str) -> tuple:
        """What snapshots of network ``name`` are made of: (network, topology, members in join
        order, member -> position, nodes, routes); read once per turn (``end_turn``)."""
        hit = self._turn.get(name)
        if hit is not None:
            return hit[0]
        net = self.store.network(name)
        members = self.store.members(name)
        ctx = (net, self._topology(net), members, {k: i for i, k in enumerate(members)},
               self.store.nodes(members), self.store.routes(name))
        self._turn[name] = (ctx, {})
        return ctx

    def _send_network(self, key: bytes, name: str, ctx: tuple | None = None) -> None:
        """Push a full snapshot of one network to ``key``: info, then members in batches (only
        whom it may reach). ``ctx``: ``_snapshot_ctx(name)``, when sending several."""
        net, topo, everyone, order, nodes, routes = ctx = ctx or self._snapshot_ctx(name)
        self._push(key, {"t": "network", "network": self._network_info(net, key, len(everyone))})
        vis = self._visible(topo, key)
        members = everyone if vis is None else sorted((k for k in vis if k in order), key=order.__getitem__)
        hit = self._turn.get(name)
        records = hit[1] if hit is not None and hit[0] is ctx else {}
        for i in range(0, len(members), MEMBER_BATCH):
            batch = []
            for k in members[i:i + MEMBER_BATCH]:
                rec = records.get(k)
                if rec is None:
                    rec = records[k] = self._member_record(net, k, nodes[k], topo, routes)
                batch.append(rec)
            self._push(key, {"t": "members", "network": name, "members": batch})

    def _broadcast_info(self, name: str) -> None:
        """The network's info to every member: two events (the owner's, the members'), each built
        once, whatever the number of members."""
        net = self.store.network(name)
        members = self.store.members(name)
        owner = self.store.node(net.owner)
        info = {role: {"t": "network", "network": self._network_info(net, k, len(members), owner)}
                for role, k in (("owner", net.owner), ("member", b""))}
        for k in members:
            self._push(k, info["owner" if k == net.owner else "member"])

    def _announce_member(self, name: str, key: bytes, ctx: tuple | None = None) -> None:
        """One delta (``members`` with one record) to each member that sees ``key``; ``ctx``:
        ``_snapshot_ctx(name)`` when the caller has it."""
        if ctx is None:
            net = self.store.network(name)
            topo = self._topology(net)
            rec = self._member_record(net, key, topo=topo)
            self._push_visible(name, key, {"t": "members", "network": name, "members": [rec]}, topo, exclude=key)
            return
        net, topo, members, _order, nodes, routes = ctx
        msg = {"t": "members", "network": name, "members": [self._member_record(net, key, nodes[key], topo, routes)]}
        for k in members:
            if k != key and self._sees(topo, k, key):
                self._push(k, msg)

    # ------------------------------------------------------------------ resynchronisation, presence storms
    def _digest(self, name: str, ctx: tuple) -> tuple[str, list[bytes], list[bytes]]:
        """(digest, members sorted by key text, members with approved routes) of a mesh network's
        full view (overlay/control/resync.py); cached until the store changes."""
        hit = self._digests.get(name)
        if hit is not None:
            return hit
        net, topo, members, _order, nodes, routes = ctx
        lines = []
        for k in members:
            text, node = key_to_text(k), nodes[k]
            lines.append((text, k, resync.stable_line(text, node.name, node.vip, "owner" if k == net.owner else "member",
                                                      self._kind(topo, k), routes.get(k, ()))))
        lines.sort()
        hit = (resync.digest((t, line) for t, _k, line in lines), [k for _t, k, _l in lines],
               [k for k in members if routes.get(k)])
        if len(self._digests) > 10_000:
            self._digests.clear()
        self._digests[name] = hit
        return hit

    def _presence_event(self, name: str, digest: tuple[str, list[bytes], list[bytes]]) -> dict | None:
        """The ``presence`` event of a mesh network as it is now (``digest``: ``_digest``'s); None
        if there are too many distinct interface kinds and capabilities among its online members
        (records are sent instead)."""
        dig, keys, _routed = digest
        online, away, iface, caps = self.online, self.away, self.iface, self.caps
        bits = bytearray((len(keys) + 7) // 8)
        groups: dict[tuple, bytearray] = {}
        for i, k in enumerate(keys):
            if k not in online or (away and name in away.get(k, ())):
                continue
            bits[i >> 3] |= 0x80 >> (i & 7)
            g = (iface.get(k), tuple(caps.get(k, ())))
            if g != (None, ()):
                b = groups.get(g)
                if b is None:
                    if len(groups) >= resync.MAX_PRESENCE_GROUPS:
                        return None
                    b = groups[g] = bytearray(len(bits))
                b[i >> 3] |= 0x80 >> (i & 7)
        b64 = base64.b64encode
        return {"t": "presence", "network": name, "digest": dig, "count": len(keys), "online": b64(bits).decode(),
                "groups": [{"iface": g[0], "caps": list(g[1]), "members": b64(b).decode()} for g, b in groups.items()]}

    def _records(self, name: str, ctx: tuple, keys) -> list[dict]:
        """Member records of ``keys`` (members of ``name``), shared for the turn."""
        net, topo, _members, _order, nodes, routes = ctx
        hit = self._turn.get(name)
        records = hit[1] if hit is not None and hit[0] is ctx else {}
        out = []
        for k in keys:
            rec = records.get(k)
            if rec is None:
                rec = records[k] = self._member_record(net, k, nodes[k], topo, routes)
            out.append(rec)
        return out

    def _send_sync(self, key: bytes, name: str, ctx: tuple, digest: str) -> bool:
        """The node holds the records of ``name`` (its ``digest`` matches ours): send the info,
        the presence event and the records of members with approved routes (what they advertise
        is not in the digest). False if a full snapshot is needed."""
        net, topo, everyone = ctx[0], ctx[1], ctx[2]
        if topo[0] != "mesh":
            return False
        hit = self._digest(name, ctx)
        routed = hit[2]
        if digest != hit[0]:
            return False
        ev = self._presence_event(name, hit)
        if ev is None:
            return False
        self._push(key, {"t": "network", "network": self._network_info(net, key, len(everyone))})
        self._push(key, ev)
        if routed:
            self._push(key, {"t": "members", "network": name, "members": self._records(name, ctx, routed)})
        self.synced += 1
        return True

    def _send_sync_cached(self, key: bytes, name: str, digest: str, now: float) -> bool:
        """``_send_sync`` from the cached digest, without reading the network's members (False:
        not cached, another digest, members with routes, or not a mesh)."""
        hit = self._digests.get(name)
        if hit is None or hit[0] != digest or hit[2]:
            return False
        net = self.store.network(name)
        if net is None or net.type != "mesh":
            return False
        ev = self._presence_event(name, hit)
        if ev is None:
            return False
        self._push(key, {"t": "network", "network": self._network_info(net, key, len(hit[1]))})
        self._push(key, ev)
        self.synced += 1
        self._presence_changed(name, key, now, size=len(hit[1]))
        return True

    def _presence_changed(self, name: str, key: bytes, now: float, ctx: tuple | None = None,
                          size: int | None = None) -> None:
        """``key`` came or went in ``name``: its members hear of it at once,
        or, in a big network's storm, when the network's window ends (``flush_presence``)."""
        if size is None:
            size = len(ctx[2]) if ctx is not None else self.store.member_count(name)
        if self.presence.change(name, key, size, now):
            self._announce_member(name, key, ctx)

    def flush_presence(self, now: float) -> None:
        """Send the presence changes held for the networks whose window ended: to each online
        member, one ``presence`` event (a node that sent ``sync``, in a mesh, for more than a few
        changes) or the changed records in one ``members`` event."""
        for name, held in self.presence.take_due(now):
            if self.store.network(name) is None:
                self.presence.forget(name)
                continue
            ctx = self._snapshot_ctx(name)
            topo, members, order = ctx[1], ctx[2], ctx[3]
            keys = [k for k in held if k in order]
            if not keys:
                continue
            recs = dict(zip(keys, self._records(name, ctx, keys)))
            everything = {"t": "members", "network": name, "members": list(recs.values())}
            ev = self._presence_event(name, self._digest(name, ctx)) if topo[0] == "mesh" and len(keys) > 1 else None
            routed = None
            if ev is not None:
                routed_keys = [k for k in keys if k in set(self._digest(name, ctx)[2])]
                if routed_keys:
                    routed = {"t": "members", "network": name, "members": [recs[k] for k in routed_keys]}
            for r in members:
                if r not in self.online:
                    continue
                if ev is not None and r in self.resync_ok:
                    self._push(r, ev)
                    if routed is not None:
                        self._push(r, routed)
                    continue
                if topo[0] == "mesh" and r not in recs:
                    self._push(r, everything)
                    continue
                mine = [rec for k, rec in recs.items() if k != r and self._sees(topo, r, k)]
                if mine:
                    self._push(r, {"t": "members", "network": name, "members": mine})

    def _network_for(self, key: bytes, raw_name: str, *, member: bool = True, owner: bool = False):
        name = normalize_name(raw_name, "network name")
        net = self.store.network(name)
        if net is None or (member and not self.store.is_member(name, key)):
            if net is None:
                raise RequestError("unknown_network", f"network {name!r} does not exist")
            raise RequestError("not_member", f"you are not a member of {name!r}")
        if owner and net.owner != key:
            raise RequestError("not_owner", f"only the owner of {name!r} can do that")
        return net

    def _name_clash(self, network: str, key: bytes, name: str) -> bytes | None:
        """Another member or pending requester of ``network`` already called ``name``."""
        members = [k for k in self.store.members(network) + self.store.pending(network) if k != key]
        for k, node in self.store.nodes(members).items():
            if node.name == name:
                return k
        return None

    def _member_by_name(self, network: str, name: str) -> bytes:
        target = normalize_name(name, "member name")
        for k, node in self.store.nodes(self.store.members(network)).items():
            if node.name == target:
                return k
        raise RequestError("unknown_member", f"no member named {target!r} in {network!r}")

    def _allocate_vip(self) -> str:
        try:
            return self.vips.allocate()
        except PoolExhausted:
            raise RequestError("pool_exhausted", f"the server's address pool {self.pool} is exhausted") from None

    def _name_of(self, key: bytes) -> str:
        node = self.store.node(key)
        return node.name if node is not None else self._guests[key]

    def _new_node_check(self, key: bytes, now: float) -> None:
        """Refuse before any slow work if storing ``key`` would exceed its address's budget."""
        src = source_bucket(self._source.get(key))
        if src is None or key not in self._guests:
            return
        w = self._new_per_source.get(src)
        if w is not None and w.count(now) >= self.new_nodes_per_hour:
            raise RequestError("rate_limited", f"too many new nodes from your address; try again in "
                                               f"{w.retry_after(now)} s")

    def proof_to_check(self, key: bytes, msg: dict, now: float) -> str | None:
        """The identity proof the glue must check (slow: off the event loop) before this create or
        join may store ``key``; None when none is needed (a stored node, a checked proof, or the
        server asks none). A new node without one is refused, and so is one from a key or address
        that failed too often."""
        if not self.identity_bits or key not in self._guests or key in self._proven:
            return None
        proof = msg.get("proof")
        if proof is None:
            raise RequestError("identity_proof", f"this server stores a new node only with a proof of work on "
                                                 f"its key ({self.identity_bits} bits) and this node sent none: "
                                                 "upgrade overlay on this node")
        self._failures_check(key, now)
        return proof

    def proof_checked(self, key: bytes, good: bool, now: float) -> None:
        """The glue's verdict on the proof from ``proof_to_check``; a bad one counts as a failure."""
        if good:
            if key in self._guests:
                self._proven.add(key)
            return
        self._record_failure(key, None, now)
        raise RequestError("identity_proof", f"the proof of work on this node's key does not check "
                                             f"({self.identity_bits} bits needed)")

    def _store_node(self, key: bytes, now: float) -> None:
        """First create / join / join request of a node: store it and give it its virtual IP."""
        if key not in self._guests:
            return
        self._new_node_check(key, now)
        if self.identity_bits and key not in self._proven:
            raise RequestError("identity_proof", "a new node needs a checked proof of work on its key")
        vip = self.store.claimed_vip(key) or self._allocate_vip()
        self.store.add_node(key, self._guests.pop(key), vip, now)
        self._proven.discard(key)
        src = source_bucket(self._source.get(key))
        if src is not None:
            _count_in(self._new_per_source, src, now, self.new_nodes_per_hour, NEW_NODES_WINDOW)
        self._push(key, {"t": "address", "ip": vip})

    def expire(self, now: float) -> list[bytes]:
        """Forget the nodes the expiry policy (module docstring) allows; at most hourly."""
        if now < self._next_expiry:
            return []
        self._next_expiry = now + EXPIRY_INTERVAL
        self._store_changed()
        gone = []
        for key, vip in self.store.expirable_nodes(now - NODE_TTL):
            if key in self.online:
                continue
            self.store.delete_node(key)
            self.vips.release(vip)
            gone.append(key)
        return gone

    # ------------------------------------------------------------------ session
    def hello(self, key: bytes, msg: dict, now: float, source: str | None = None) -> dict:
        if msg["version"] != PROTOCOL_VERSION:
            raise RequestError("version", f"protocol version {msg['version']} not supported "
                                          f"(server speaks {PROTOCOL_VERSION})")
        name = normalize_name(msg["name"], "node name")
        node = self.store.node(key)
        if node is None:
            self._guests[key] = name      # stored only when it first joins a network
        else:
            if node.name != name:
                self._store_changed()      # snapshots read this turn hold the old name
                for net in self.store.networks_of(key) + self.store.pending_networks_of(key):
                    if self._name_clash(net, key, name):
                        raise RequestError("name_taken",
                                           f"the name {name!r} is already taken in network {net!r}")
            self.store.update_node(key, name, now)
        node = self.store.node(key)
        self.online.add(key)
        self._forget_records(key)
        if msg.get("routes"):
            self.advertised[key] = sorted({str(parse_route(r)) for r in msg["routes"]})
        else:
            self.advertised.pop(key, None)
        if msg.get("iface") in ("tun", "tap"):
            self.iface[key] = msg["iface"]
        else:
            self.iface.pop(key, None)
        caps = parse_caps(msg.get("caps"))
        if caps:
            self.caps[key] = list(caps)
        else:
            self.caps.pop(key, None)
        if source is not None:
            self._source[key] = source
        sync = msg.get("sync")
        if sync is None:
            self.resync_ok.discard(key)   # a node from before resynchronisation: full snapshots
        else:
            self.resync_ok.add(key)
        networks = self.store.networks_of(key)
        for net in networks:
            want = sync.get(net) if sync else None
            if isinstance(want, str) and self._send_sync_cached(key, net, want, now):
                continue                  # a storm of returning nodes: nothing read but the network's row
            ctx = self._snapshot_ctx(net)
            if not (isinstance(want, str) and self._send_sync(key, net, ctx, want)):
                self._send_network(key, net, ctx)
            self._presence_changed(net, key, now, ctx)
        for net in self.store.owned_networks(key):
            for k in self.store.pending(net):
                self._push(key, self._join_request_event(net, k))
        return ok(msg["id"], name=name, ip=node.vip if node else None, key=key_to_text(key),
                  networks=networks, pool=str(self.pool), identity_work=0 if node else self.identity_bits)

    def disconnect(self, key: bytes, now: float) -> None:
        if key not in self.online:
            return
        self.online.discard(key)
        self._forget_records(key)
        self.away.pop(key, None)
        self.endpoints.pop(key, None)
        self.iface.pop(key, None)
        self.caps.pop(key, None)
        self.advertised.pop(key, None)
        self._source.pop(key, None)
        self._proven.discard(key)
        self.resync_ok.discard(key)
        if self._guests.pop(key, None) is not None:
            return
        self.store.update_node(key, self.store.node(key).name, now)
        for net in self.store.networks_of(key):
            self._presence_changed(net, key, now)

    # ------------------------------------------------------------------ requests
    def handle(self, key: bytes, msg: dict, now: float, *, password_ok: bool | None = None,
               password_hash: bytes | None = None) -> dict:
        if msg["t"] in ("create", "join", "leave", "admin", "rename"):   # they write to the store
            self._store_changed()
            try:
                return self._handle(key, msg, now, password_ok=password_ok, password_hash=password_hash)
            finally:
                self._store_changed()
        return self._handle(key, msg, now, password_ok=password_ok, password_hash=password_hash)

    def _handle(self, key: bytes, msg: dict, now: float, *, password_ok: bool | None = None,
                password_hash: bytes | None = None) -> dict:
        t = msg["t"]
        if t == "ping":
            return ok(msg["id"], t_server=now)
        if t == "create":
            return self._create(key, msg, now, password_hash)
        if t == "join":
            return self._join(key, msg, now, password_ok)
        if t == "leave":
            return self._leave(key, msg)
        if t == "chat":
            return self._chat(key, msg, now)
        if t == "history":
            net = self._network_for(key, msg["network"])
            topo = self._topology(net)
            for cid, sender, name, text, ts in self.store.chat_history(net.name):
                self._push(key, {"t": "chat", "network": net.name, "id": cid, "from": name,
                                 "from_key": key_to_text(sender) if self._sees(topo, key, sender) else None,
                                 "text": text, "ts": ts, "history": True})
            return ok(msg["id"])
        if t == "members":
            net = self._network_for(key, msg["network"])
            self._send_network(key, net.name)
            return ok(msg["id"])
        if t == "admin":
            return self._admin(key, msg, now, password_hash)
        if t == "rename":
            return self._rename(key, msg, now)
        if t == "presence":
            return self._presence(key, msg)
        if t == "endpoints":
            self.endpoints[key] = {"candidates": msg["candidates"], "nat": msg.get("nat", {})}
            return ok(msg["id"])
        if t == "punch":
            return self._punch(key, msg)
        raise RequestError("unknown_type", f"unknown request type {t!r}")

    def create_precheck(self, key: bytes, msg: dict, now: float | None = None) -> str:
        """Everything that can refuse a create before the (slow) password hashing."""
        name = normalize_name(msg["network"], "network name")
        if self.store.network(name) is not None:
            raise RequestError("network_exists", f"network {name!r} already exists")
        if len(self.store.networks_of(key)) >= MAX_NETWORKS_PER_NODE:
            raise RequestError("too_many_networks", f"a node may be in at most {MAX_NETWORKS_PER_NODE} networks")
        if now is not None:
            self._new_node_check(key, now)
        return name

    def _create(self, key: bytes, msg: dict, now: float, password_hash: bytes | None) -> dict:
        name = self.create_precheck(key, msg, now)
        if password_hash is None:
            raise RequestError("internal", "password was not hashed")
        self._store_node(key, now)
        self.store.add_network(name, password_hash, key, msg.get("approval", False),
                               msg.get("max_members", 0), now)
        self._send_network(key, name)
        return ok(msg["id"], network=name)

    def join_precheck(self, key: bytes, msg: dict, now: float) -> bytes:
        """Everything that can refuse a join before the (slow) password check; returns the hash."""
        name = normalize_name(msg["network"], "network name")
        self._failures_check(key, now)
        net = self.store.network(name)
        if net is None:
            raise RequestError("unknown_network", f"network {name!r} does not exist")
        if self.store.is_member(name, key):
            raise RequestError("already_member", f"you are already a member of {name!r}")
        if self.store.is_banned(name, key):
            raise RequestError("banned", f"you are banned from {name!r}")
        self._new_node_check(key, now)
        return net.pw_hash

    def failure_delay(self, network: str, now: float) -> float:
        """How long the glue holds a wrong-password answer (and that connection's next request):
        nothing until ``network`` had FAILED_JOINS_PER_NETWORK failures in the window, then
        FAILED_JOIN_DELAY. A network-wide bound that only slows guessing: refusing there would let
        anyone lock the owner and the members out with failures from fresh keys."""
        name = normalize_name(network, "network name")
        w = self._fail_net.get(name)
        return FAILED_JOIN_DELAY if w is not None and w.count(now) >= FAILED_JOINS_PER_NETWORK else 0.0

    def _failures_check(self, key: bytes, now: float) -> None:
        """Refuse a node key or a source address that failed too often (wrong passwords, bad
        identity proofs); failures elsewhere never refuse anyone: the right password gets in."""
        for window, limit, whence in (
                (self._fail_node.get(key), FAILED_JOINS_PER_NODE, ""),
                (self._fail_src.get(source_bucket(self._source.get(key))), FAILED_JOINS_PER_SOURCE,
                 " from your address")):
            if window is not None and window.count(now) >= limit:
                raise RequestError("rate_limited", f"too many failed join attempts{whence}; try again in "
                                                   f"{window.retry_after(now)} s")

    def _record_failure(self, key: bytes, network: str | None, now: float) -> None:
        _count_in(self._fail_node, key, now, FAILED_JOINS_PER_NODE)
        src = source_bucket(self._source.get(key))
        if src is not None:
            _count_in(self._fail_src, src, now, FAILED_JOINS_PER_SOURCE)
        if network is not None:
            _count_in(self._fail_net, network, now, FAILED_JOINS_PER_NETWORK)

    def _join(self, key: bytes, msg: dict, now: float, password_ok: bool | None) -> dict:
        self.join_precheck(key, msg, now)
        name = normalize_name(msg["network"], "network name")
        net = self.store.network(name)
        if not password_ok:
            self._record_failure(key, name, now)
            raise RequestError("wrong_password", f"wrong password for network {name!r}")
        if net.locked:
            raise RequestError("locked", f"network {name!r} is locked: its owner is not accepting new members")
        if net.max_members and self.store.member_count(name) >= net.max_members:
            raise RequestError("full", f"network {name!r} is full ({net.max_members} members)")
        my_name = self._name_of(key)
        if self._name_clash(name, key, my_name):
            raise RequestError("name_taken", f"the name {my_name!r} is already taken in network {name!r}; "
                                             "restart with another --name")
        if len(self.store.networks_of(key)) >= MAX_NETWORKS_PER_NODE:
            raise RequestError("too_many_networks", f"a node may be in at most {MAX_NETWORKS_PER_NODE} networks")
        if net.approval:
            if len(self.store.pending(name)) >= MAX_PENDING:
                raise RequestError("too_many_pending", f"network {name!r} has too many pending requests")
            self._store_node(key, now)
            self.store.add_pending(name, key, now)
            self._push(net.owner, self._join_request_event(name, key))
            return ok(msg["id"], network=name, status="pending")
        self._store_node(key, now)
        self._admit(name, key, now)
        return ok(msg["id"], network=name, status="joined")

    def _join_request_event(self, network: str, key: bytes) -> dict:
        node = self.store.node(key)
        return {"t": "join_request", "network": network, "name": node.name, "key": key_to_text(key)}

    def _admit(self, name: str, key: bytes, now: float) -> None:
        self.store.add_member(name, key, now)
        self._send_network(key, name)
        self._announce_member(name, key)
        self._broadcast_info(name)

    def _remove(self, name: str, key: bytes, reason: str) -> None:
        before = self._topology(self.store.network(name))
        self.store.remove_member(name, key)
        self.away.get(key, set()).discard(name)
        self._push(key, {"t": "removed", "network": name, "reason": reason})
        self._push_visible(name, key, {"t": "member_left", "network": name, "key": key_to_text(key),
                                       "reason": reason}, before)
        self._broadcast_info(name)
        if before != self._topology(self.store.network(name)):   # a hub or the gateway left
            self._retopologize(name, before)

    def _leave(self, key: bytes, msg: dict) -> dict:
        net = self._network_for(key, msg["network"])
        if net.owner == key:
            if self.store.member_count(net.name) > 1:
                raise RequestError("owner_cannot_leave",
                                   f"you own {net.name!r}: hand it to another member first "
                                   f"(overlay admin transfer {net.name} NAME) or delete it")
            self.store.delete_network(net.name)
            self._push(key, {"t": "removed", "network": net.name, "reason": "left"})
            return ok(msg["id"], network=net.name, deleted=True)
        self._remove(net.name, key, "left")
        return ok(msg["id"], network=net.name)

    def _chat(self, key: bytes, msg: dict, now: float) -> dict:
        net = self._network_for(key, msg["network"])
        node = self.store.node(key)
        cid = self.store.add_chat(net.name, key, node.name, msg["text"], now)
        ev = {"t": "chat", "network": net.name, "id": cid, "from": node.name,
              "from_key": key_to_text(key), "text": msg["text"], "ts": now}
        # chat is for the whole network, as in Hamachi; a member out of the sender's reach (spoke
        # to spoke, member to member of a gateway network) gets its name only, not its key
        topo = self._topology(net)
        if topo[0] == "mesh":
            self._push_members(net.name, ev)
        else:
            anonymous = {**ev, "from_key": None}
            for k in self.store.members(net.name):
                self._push(k, ev if self._sees(topo, k, key) else anonymous)
        return ok(msg["id"], chat_id=cid)

    def admin_precheck(self, key: bytes, msg: dict) -> None:
        """Refuse a password change by a non-owner before the (slow) hashing."""
        self._network_for(key, msg["network"], owner=True)

    def _presence(self, key: bytes, msg: dict) -> dict:
        """Go offline (or back online) in one network without leaving it: its members see the node
        offline there; the node stays a member. Forgotten when the node disconnects (the node
        sends it again after hello)."""
        net = self._network_for(key, msg["network"])
        away = self.away.setdefault(key, set())
        if msg["online"]:
            away.discard(net.name)
        else:
            away.add(net.name)
        if not away:
            del self.away[key]
        self._forget_records(key)
        # the node's own request (rate limited per connection) goes out at once; a storm is made
        # of hellos and departures (``_presence_changed``), and a held change of this node is
        # sent again, as it is then, when its window ends
        self._announce_member(net.name, key)
        return ok(msg["id"], network=net.name, online=msg["online"])

    def _rename(self, key: bytes, msg: dict, now: float) -> dict:
        """A node changes its name: refused if another member or requester of one of its networks
        has it; members of its networks (and the node itself) get the new record at once."""
        name = normalize_name(msg["name"], "node name")
        networks = self.store.networks_of(key)
        for net in networks + self.store.pending_networks_of(key):
            if self._name_clash(net, key, name):
                raise RequestError("name_taken", f"the name {name!r} is already taken in network {net!r}")
        self.store.update_node(key, name, now)
        for net in networks:
            rec = self._member_record(self.store.network(net), key)
            self._push_visible(net, key, {"t": "members", "network": net, "members": [rec]})
            self._broadcast_info(net)  # the owner's name is part of the network's info
        return ok(msg["id"], name=name)

    def _admin(self, key: bytes, msg: dict, now: float, password_hash: bytes | None = None) -> dict:
        action = msg["action"]
        net = self._network_for(key, msg["network"], owner=True)
        name = net.name
        rid = msg["id"]
        if action in ("lock", "unlock"):
            self.store.set_network(name, locked=int(action == "lock"))
        elif action in ("encryption-on", "encryption-off"):
            # peers sharing only unencrypted networks send payloads authenticated, not encrypted
            self.store.set_network(name, encrypted=int(action == "encryption-on"))
        elif action in ("approval-on", "approval-off"):
            self.store.set_network(name, approval=int(action == "approval-on"))
        elif action == "limit":
            self.store.set_network(name, max_members=msg["value"])
        elif action == "password":
            # New joins need the new password. Everyone who is a member now joined with an old one:
            # with value 1 they are all removed (the owner stays) and pending requests dropped.
            if password_hash is None:
                raise RequestError("internal", "password was not hashed")
            self.store.set_network(name, pw_hash=password_hash)
            removed = 0
            if msg.get("value") == 1:
                gone = [k for k in self.store.members(name) if k != key]
                for k in gone:          # all out first: no one is told of others leaving as they go
                    self.store.remove_member(name, k)
                for k in gone:
                    self._push(k, {"t": "removed", "network": name, "reason": "password changed"})
                    self._push_members(name, {"t": "member_left", "network": name, "key": key_to_text(k),
                                              "reason": "password changed"})
                removed = len(gone)
                for k in self.store.pending(name):
                    self.store.remove_pending(name, k)
                    self._push(k, {"t": "join_rejected", "network": name})
            self._broadcast_info(name)
            return ok(rid, removed=removed)
        elif action == "pending":
            keys = self.store.pending(name)
            nodes = self.store.nodes(keys)
            return ok(rid, pending=[{"name": nodes[k].name, "key": key_to_text(k)} for k in keys if k in nodes])
        elif action in ("approve", "reject"):
            target = self._pending_by_name(name, msg["target"])
            if action == "approve":
                if self._name_clash(name, target, self.store.node(target).name):
                    raise RequestError("name_taken", f"a member of {name!r} already has that name; "
                                                     "reject this request or ask the node to rename")
                self._admit(name, target, now)
                self._push(target, {"t": "join_approved", "network": name})
            else:
                self.store.remove_pending(name, target)
                self._push(target, {"t": "join_rejected", "network": name})
            return ok(rid)
        elif action in ("kick", "ban"):
            target = (self._ban_target(name, msg["target"]) if action == "ban"
                      else self._member_by_name(name, msg["target"]))
            if target == key:
                raise RequestError("bad_request", "you cannot kick or ban yourself")
            if action == "ban":
                self.store.ban(name, target)
            if self.store.is_member(name, target):
                self._remove(name, target, "banned" if action == "ban" else "kicked")
            else:
                self.store.remove_pending(name, target)
            return ok(rid)
        elif action in ("type", "hub-on", "hub-off", "gateway"):
            before = self._topology(net)
            if action == "type":
                self.store.set_network(name, type=msg["target"])
            elif action == "gateway":
                self.store.set_network(name, gateway=self._member_by_name(name, msg["target"]))
            else:
                self.store.set_hub(name, self._member_by_name(name, msg["target"]), action == "hub-on")
            self._broadcast_info(name)
            if before != self._topology(self.store.network(name)):
                self._retopologize(name, before)
            net = self.store.network(name)
            return ok(rid, type=net.type)
        elif action == "routes":
            approved = self.store.routes(name)
            keys = [k for k in self.store.members(name) if k in approved or self.advertised.get(k)]
            nodes = self.store.nodes(keys)
            return ok(rid, routes=[{"name": nodes[k].name, "key": key_to_text(k), "online": k in self.online,
                                    "advertised": self.advertised.get(k, []), "approved": approved.get(k, [])}
                                   for k in keys if k in nodes])
        elif action in ("route-approve", "route-remove"):
            target = self._member_by_name(name, msg["target"])
            prefix = str(parse_route(msg["prefix"]))
            who = self.store.node(target).name
            if action == "route-approve":
                if prefix not in self.advertised.get(target, []):
                    offered = ", ".join(self.advertised.get(target, [])) or "nothing"
                    raise RequestError("not_advertised", f"{who} does not advertise {prefix} (it offers {offered}"
                                                         f"{'' if target in self.online else '; it is offline'})")
                if parse_route(prefix).overlaps(self.pool):
                    raise RequestError("bad_route", f"{prefix} overlaps the overlay's address pool {self.pool}")
                self.store.set_route(name, target, prefix, True)
            elif not self.store.set_route(name, target, prefix, False):
                raise RequestError("unknown_route", f"{prefix} is not an approved route of {who} in {name!r}")
            rec = self._member_record(self.store.network(name), target)
            self._push_visible(name, target, {"t": "members", "network": name, "members": [rec]})
            return ok(rid)
        elif action == "unban":
            target = normalize_name(msg["target"], "member name")
            for k, node in self.store.nodes(self.store.bans(name)).items():
                if node.name == target:
                    self.store.unban(name, k)
                    return ok(rid)
            raise RequestError("unknown_member", f"no banned node named {target!r} in {name!r}")
        elif action == "delete":
            members = self.store.members(name)
            self.store.delete_network(name)
            for k in members:
                self._push(k, {"t": "removed", "network": name, "reason": "deleted"})
            return ok(rid)
        elif action == "transfer":
            target = self._member_by_name(name, msg["target"])
            if target == key:
                raise RequestError("bad_request", "you already own this network")
            before = self._topology(net)
            self.store.set_network(name, owner=target)
            net = self.store.network(name)
            for k in (key, target):
                rec = self._member_record(net, k)
                self._push_visible(name, k, {"t": "members", "network": name, "members": [rec]})
            if before != self._topology(net):    # the owner was the default gateway
                self._retopologize(name, before)
        self._broadcast_info(name)
        return ok(rid)

    # ------------------------------------------------------------------ introductions
    def shares_network(self, a: bytes, b: bytes) -> bool:
        return self.may_reach(a, b)

    def candidates_of(self, key: bytes) -> list[dict]:
        cands = list(self.endpoints.get(key, {}).get("candidates", []))
        udp = self.udp_addr_of(key)
        if udp is not None:
            srflx = {"addr": format_addr(udp), "kind": "srflx"}
            if srflx not in cands:
                cands.insert(0, srflx)
        return cands

    def _punch(self, key: bytes, msg: dict) -> dict:
        """Introduce two nodes: each gets the other's candidates and starts probing at once."""
        peer = key_from_text(msg["peer"])
        if peer == key or not self.shares_network(key, peer):
            raise RequestError("not_peer", "that node shares no network with you")
        if peer not in self.online:
            raise RequestError("peer_offline", "that node is offline")
        for a, b in ((key, peer), (peer, key)):
            self._push(a, {"t": "punch", "peer": key_to_text(b), "candidates": self.candidates_of(b),
                           "nat": self.endpoints.get(b, {}).get("nat", {})})
        return ok(msg["id"])

    def _pending_by_name(self, network: str, raw: str) -> bytes:
        target = normalize_name(raw, "member name")
        for k, node in self.store.nodes(self.store.pending(network)).items():
            if node.name == target:
                return k
        raise RequestError("unknown_member", f"no pending request from {target!r} in {network!r}")

    def _ban_target(self, network: str, raw: str) -> bytes:
        """Anyone the owner may ban by name: a member, a pending requester, or a former member
        (the most recent one of that name)."""
        target = normalize_name(raw, "member name")
        for keys in (self.store.members(network), self.store.pending(network), self.store.former_members(network)):
            nodes = self.store.nodes(keys)
            for k in keys:
                if k in nodes and nodes[k].name == target:
                    return k
        raise RequestError("unknown_member",
                           f"no member, pending request or former member named {target!r} in {network!r}")

