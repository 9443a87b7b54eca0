"""The node's view of its networks and peers, rebuilt from server events (sans-I/O).

``apply(event)`` folds one server event into the view and returns a short description of what
changed for the log (or None). ``peers()`` merges members of every network into one ``Peer`` per
node key, which is what the tunnel layer needs: a peer is someone sharing at least one network.
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass, field, replace

from overlay.control import resync
from overlay.control.messages import CHAT_HISTORY, MAX_ROUTES, parse_caps, parse_route
from overlay.nat.candidate import parse_addr


@dataclass
class Member:
    name: str
    key: str
    ip: str
    online: bool
    role: str
    iface: str | None = None   # "tun" / "tap": the member runs a kernel interface
    kind: str | None = None    # hub / spoke (hub-and-spoke networks), gateway / member (gateway networks)
    routes: tuple = ()         # approved gateway routes (LAN subnets reached through this member)
    withdrawn: tuple = ()      # approved routes it no longer advertises (online without them)
    caps: tuple = ()           # capabilities the node stated in its hello (only while online)
    relay: tuple | None = None  # online on another server instance: that instance's relay (IP, port)


@dataclass(frozen=True, slots=True)
class Peer:
    """A node this one tunnels to: a member sharing a network, or a static WireGuard peer (``static``).
    ``key`` is the raw public key, ``key_text`` its base64 form (what the API and status show)."""
    name: str
    key: bytes
    key_text: str
    ip: str
    online: bool
    iface: str | None = None          # "tun" / "tap": the member runs a kernel interface
    networks: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()      # approved gateway routes, over every shared network
    withdrawn: tuple[str, ...] = ()   # approved routes it no longer advertises
    encrypted: bool = True
    static: bool = False
    caps: tuple[str, ...] = ()        # capabilities (control.messages CAP_*); none for a static peer
    relay: tuple[str, int] | None = None  # the relay of the other server instance it is on (server_path)

    def to_json(self) -> dict:
        """The peer as status and the API show it (docs/json.md); a static peer has no iface."""
        d: dict = {"name": self.name, "key": self.key_text, "ip": self.ip, "online": self.online}
        if not self.static:
            d["iface"] = self.iface
            d["caps"] = list(self.caps)
        d.update(networks=list(self.networks), routes=list(self.routes), withdrawn=list(self.withdrawn),
                 encrypted=self.encrypted)
        return d


def _routes(raw) -> tuple:
    """Approved routes from a member record: valid subnets only, bounded."""
    out = []
    for r in raw[:MAX_ROUTES] if isinstance(raw, list) else ():
        try:
            out.append(str(parse_route(r)))
        except ValueError:
            continue
    return tuple(out)


def _relay(raw) -> tuple[str, int] | None:
    """A member record's ``relay`` (the relay of the other server instance the member is on):
    an IP:PORT, else None."""
    if not isinstance(raw, str) or len(raw) > 64:
        return None
    try:
        return parse_addr(raw)
    except ValueError:
        return None


def reaches(net_type: str | None, mine: str | None, theirs: str | None) -> bool:
    """May a member of kind ``mine`` reach one of kind ``theirs`` in a network of ``net_type``
    (the node's own check of what the server hands it: a spoke never has another spoke as a peer)."""
    if net_type == "hub-and-spoke":
        return "hub" in (mine, theirs)
    if net_type == "gateway":
        return "gateway" in (mine, theirs)
    return True


@dataclass
class NetworkView:
    name: str
    info: dict = field(default_factory=dict)
    members: dict[str, Member] = field(default_factory=dict)   # key -> member
    chat: deque = field(default_factory=lambda: deque(maxlen=CHAT_HISTORY))
    pending: dict[str, str] = field(default_factory=dict)  # join requests (owners only): key -> name
    # (digest, keys sorted) of the members' stable records (overlay/control/resync.py); None:
    # computed again when asked (a member came, left or changed other than in presence)
    synced: tuple[str, list[str]] | None = None

    def digest(self) -> tuple[str, list[str]]:
        if self.synced is None:
            lines = [(k, resync.stable_line(k, m.name, m.ip, m.role, m.kind, m.routes + m.withdrawn))
                     for k, m in self.members.items()]
            self.synced = (resync.digest(lines), sorted(self.members))
        return self.synced


def _stable(m: Member) -> tuple:
    return (m.name, m.ip, m.role, m.kind, frozenset(m.routes + m.withdrawn))


class NodeState:
    def __init__(self) -> None:
        self.networks: dict[str, NetworkView] = {}
        self.me: dict = {}
        self.away: set[str] = set()  # networks this node went offline in: their members are no peers
        # while a new session's snapshots arrive: network -> members not re-announced yet (None: no
        # resync); networks re-announced so far
        self._unconfirmed: dict[str, set[str]] | None = None
        self._reannounced: set[str] = set()
        # networks whose presence event did not match what this node holds: the daemon asks the
        # server for their full snapshot (a ``members`` request)
        self.needs_snapshot: set[str] = set()

    def sync_digests(self) -> dict[str, str]:
        """For the hello (``sync``): per network, the digest of the member records held."""
        held = [(name, view) for name, view in self.networks.items() if view.members]
        return {name: view.digest()[0] for name, view in held[:resync.MAX_SYNC_NETWORKS]}   # the hello's bound

    def begin_resync(self) -> None:
        """A new session with the server (the same or another of its deployment): it re-sends every
        network as snapshots. What it said before stays until ``end_resync``, so peers (and their
        tunnels) are not dropped and re-added while the snapshots arrive."""
        self._unconfirmed = {name: set(view.members) for name, view in self.networks.items()}
        self._reannounced = set()
        for view in self.networks.values():
            view.pending.clear()          # the server re-sends the join requests an owner has

    def end_resync(self) -> bool:
        """The snapshots are all in: drop the networks and members they did not list. True if
        anything was dropped."""
        unconfirmed, self._unconfirmed = self._unconfirmed, None
        changed = False
        for name, keys in (unconfirmed or {}).items():
            view = self.networks.get(name)
            if view is None:
                continue
            if name not in self._reannounced:
                del self.networks[name]
                changed = True
                continue
            for k in keys:
                if view.members.pop(k, None) is not None:
                    changed = True
                    view.synced = None
        self._reannounced = set()
        return changed

    def apply(self, ev: dict) -> str | None:
        t = ev.get("t")
        if t == "network":
            info = ev["network"]
            view = self.networks.setdefault(info["name"], NetworkView(info["name"]))
            view.info = info
            if self._unconfirmed is not None:
                self._reannounced.add(view.name)
            return None
        if t == "members":
            view = self.networks.setdefault(ev["network"], NetworkView(ev["network"]))
            if self._unconfirmed is not None and view.name in self._unconfirmed:
                self._unconfirmed[view.name].difference_update(m["key"] for m in ev["members"])
            changes = []
            for m in ev["members"]:
                old = view.members.get(m["key"])
                new = Member(m["name"], m["key"], m["ip"], bool(m["online"]), m["role"],
                             m.get("iface") if m.get("iface") in ("tun", "tap") else None,
                             m.get("kind") if m.get("kind") in ("hub", "spoke", "gateway", "member") else None,
                             _routes(m.get("routes")), _routes(m.get("withdrawn")), parse_caps(m.get("caps")),
                             _relay(m.get("relay")))
                view.members[m["key"]] = new
                if old is None or _stable(old) != _stable(new):
                    view.synced = None
                if old is None:
                    changes.append(f"{new.name} ({new.ip}) is a member of {view.name}")
                elif old.online != new.online:
                    changes.append(f"{new.name} is {'online' if new.online else 'offline'}")
            for m in ev["members"]:
                view.pending.pop(m["key"], None)  # a requester let in
            return "; ".join(changes) or None
        if t == "member_left":
            view = self.networks.get(ev["network"])
            if view is not None:
                m = view.members.pop(ev["key"], None)
                if m is not None:
                    view.synced = None
                    if ev.get("reason") == "out of reach":
                        return f"{m.name} is out of reach in {view.name} (network type)"
                    return f"{m.name} {ev.get('reason', 'left')} {view.name}"
            return None
        if t == "presence":
            return self._presence(ev)
        if t == "removed":
            self.networks.pop(ev["network"], None)
            return f"removed from {ev['network']} ({ev.get('reason')})"
        if t == "chat":
            view = self.networks.get(ev["network"])
            if view is not None and not any(c["id"] == ev["id"] for c in view.chat):
                view.chat.append(ev)
                if len(view.chat) > 1 and view.chat[-2]["id"] > ev["id"]:  # history arrived late
                    view.chat = deque(sorted(view.chat, key=lambda c: c["id"]), maxlen=CHAT_HISTORY)
            return None
        if t == "join_request":
            view = self.networks.get(ev["network"])
            if view is not None:
                view.pending[ev["key"]] = ev["name"]
            return f"{ev['name']} asks to join {ev['network']} (overlay admin approve {ev['network']} {ev['name']})"
        if t in ("join_approved", "join_rejected"):
            return f"join request for {ev['network']} {t.split('_')[1]}"
        return None

    def _presence(self, ev: dict) -> str | None:
        """The server's ``presence`` event (overlay/control/resync.py): every member's presence,
        interface and capabilities, over the members this node holds. If they are not what the
        server has (the digests differ), the network goes to ``needs_snapshot``."""
        view = self.networks.get(ev.get("network"))   # type: ignore[arg-type]
        if view is None:
            return None
        digest, keys = view.digest()
        online = resync.decode_bits(ev.get("online"), len(keys))
        groups = ev.get("groups") if isinstance(ev.get("groups"), list) else None
        if digest != ev.get("digest") or online is None or groups is None or len(groups) > resync.MAX_PRESENCE_GROUPS:
            self.needs_snapshot.add(view.name)
            return None
        attrs: dict[int, tuple] = {}
        for g in groups:
            bits = resync.decode_bits(g.get("members") if isinstance(g, dict) else None, len(keys))
            if bits is None:
                self.needs_snapshot.add(view.name)
                return None
            iface = g.get("iface") if g.get("iface") in ("tun", "tap") else None
            caps = parse_caps(g.get("caps"))
            for i, b in enumerate(bits):
                if b:
                    attrs[i] = (iface, caps)
        if self._unconfirmed is not None and view.name in self._unconfirmed:
            self._unconfirmed[view.name].clear()     # the server has every member this node holds
        changes = []
        for i, k in enumerate(keys):
            m = view.members[k]
            iface, caps = attrs.get(i, (None, ())) if online[i] else (None, ())
            if m.online != online[i]:
                changes.append(f"{m.name} is {'online' if online[i] else 'offline'}")
            if (m.online, m.iface, m.caps) != (online[i], iface, caps):
                view.members[k] = replace(m, online=online[i], iface=iface, caps=caps)
        return "; ".join(changes[:5]) + (f" (and {len(changes) - 5} more)" if len(changes) > 5 else "") or None

    def forget_pending(self, network: str, name: str) -> None:
        """A join request this node (the owner) answered or whose requester it banned."""
        view = self.networks.get(network)
        if view is not None:
            view.pending = {k: n for k, n in view.pending.items() if n != name}

    def peers(self) -> dict[bytes, Peer]:
        """raw key -> ``Peer`` for every node sharing a network with us."""
        merged: dict[str, tuple[Member, list[str], list[str], list[str], list[bool]]] = {}
        caps: dict[str, tuple] = {}   # key -> capabilities every record of it states (in case one is stale)
        relays: dict[str, tuple | None] = {}
        mine = self.me.get("key")
        for view in self.networks.values():
            if view.name in self.away:
                continue
            me = view.members.get(mine)
            net_type = view.info.get("type")
            for m in view.members.values():
                if m.key == mine or not reaches(net_type, me.kind if me else None, m.kind):
                    continue
                _, networks, routes, withdrawn, encrypted = merged.setdefault(m.key, (m, [], [], [], [False]))
                networks.append(view.name)
                caps[m.key] = tuple(c for c in caps.get(m.key, m.caps) if c in m.caps)
                relays[m.key] = relays.get(m.key) or m.relay
                # encryption drops only when every network shared with this peer is unencrypted
                encrypted[0] = encrypted[0] or view.info.get("encrypted", True) is not False
                routes.extend(r for r in m.routes if r not in routes)
                withdrawn.extend(r for r in m.withdrawn if r not in withdrawn)
        out: dict[bytes, Peer] = {}
        for text, (m, networks, routes, withdrawn, encrypted) in merged.items():
            key = base64.b64decode(text)
            out[key] = Peer(m.name, key, text, m.ip, m.online, m.iface, tuple(networks), tuple(routes),
                            tuple(withdrawn), encrypted[0], caps=caps[text], relay=relays[text])
        return out

    def own_routes(self) -> list[tuple[str, set[str]]]:
        """This node as a gateway: (approved route, virtual IPs of the members it serves there)."""
        mine = self.me.get("key")
        out: dict[str, set[str]] = {}
        for view in self.networks.values():
            me = view.members.get(mine)
            if me is None or not me.routes or view.name in self.away:
                continue
            net_type = view.info.get("type")
            ips = {m.ip for m in view.members.values() if m.key != mine and reaches(net_type, me.kind, m.kind)}
            for r in me.routes:
                out.setdefault(r, set()).update(ips)
        return sorted(out.items())

    def status(self) -> list[dict]:
        nets = []
        for view in sorted(self.networks.values(), key=lambda v: v.name):
            info = view.info
            nets.append({
                "name": view.name,
                "role": info.get("role"),
                "owner": info.get("owner"),
                "locked": bool(info.get("locked")),
                "approval": bool(info.get("approval")),
                "type": info.get("type") or "mesh",
                "encrypted": info.get("encrypted", True) is not False,
                "max_members": info.get("max_members", 0),
                "away": view.name in self.away,
                "pending": [{"name": n, "key": k} for k, n in sorted(view.pending.items(), key=lambda kv: kv[1])],
                "members": [
                    {"name": m.name, "key": m.key, "ip": m.ip, "online": m.online, "role": m.role,
                     "iface": m.iface, "kind": m.kind, "routes": list(m.routes), "self": m.key == self.me.get("key")}
                    for m in sorted(view.members.values(), key=lambda m: m.name)
                ],
            })
        return nets
