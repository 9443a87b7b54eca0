"""The server's state in memory, with the synchronous methods of the SQLite ``Store``.

The PostgreSQL backend (overlay/server/store_pg.py) loads the database into a ``Model`` at start
and serves the mediator's reads from it; every write updates the model and queues the same change
for the database through ``_write`` (SQL with PostgreSQL's ``$n`` placeholders), which the glue
flushes before it answers. The semantics follow the SQLite store method by method (orders,
cascades, what a removal takes with it), so the mediator cannot tell the two apart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from overlay.control.messages import CHAT_HISTORY
from overlay.server.store import Network, Node, StoreHooks


@dataclass
class NodeRow:
    name: str
    vip: str
    created: float
    last_seen: float


@dataclass
class NetworkRow:
    net: Network
    created: float


class Model(StoreHooks):
    """Every table as dicts; members, pending and former members keep their order."""

    def __init__(self) -> None:
        self._nodes: dict[bytes, NodeRow] = {}
        self._networks: dict[str, NetworkRow] = {}
        self._members: dict[str, dict[bytes, float]] = {}      # network -> key -> joined, in join order
        self._member_of: dict[bytes, dict[str, float]] = {}    # key -> network -> joined
        self._pending: dict[str, dict[bytes, float]] = {}      # network -> key -> requested, in order
        self._pending_of: dict[bytes, set[str]] = {}
        self._former: dict[str, dict[bytes, None]] = {}        # network -> keys, oldest first
        self._bans: dict[str, set[bytes]] = {}
        self._banned_anywhere: dict[bytes, int] = {}
        self._chat: dict[str, deque] = {}                      # network -> (id, sender, name, text, ts)
        self._routes: dict[str, dict[bytes, list[str]]] = {}
        self._hubs: dict[str, set[bytes]] = {}
        self._owned: dict[bytes, set[str]] = {}

    def _write(self, sql: str, *args) -> None:
        """A change the database must get too (nothing for a model alone)."""

    def adopt(self, fresh: "Model") -> "Model":
        """Take every table of ``fresh`` (a model loaded again from the database); returns a
        model holding the tables this one had, to compare with (overlay/server/pg_repair.py)."""
        old = Model()
        for attr in TABLES:
            setattr(old, attr, getattr(self, attr))
            setattr(self, attr, getattr(fresh, attr))
        return old

    def close(self) -> None:
        pass

    # ---------------------------------------------------------------- loading (from a database)
    def _load_network(self, name: str, pw_hash: bytes, owner: bytes, locked: bool, approval: bool,
                      max_members: int, created: float, type_: str, gateway: bytes | None, encrypted: bool) -> None:
        self._networks[name] = NetworkRow(Network(name, owner, bool(locked), bool(approval), max_members, pw_hash,
                                                  type_, gateway, bool(encrypted)), created)
        self._owned.setdefault(owner, set()).add(name)
        for table in (self._members, self._pending, self._former, self._routes):
            table.setdefault(name, {})
        self._bans.setdefault(name, set())
        self._hubs.setdefault(name, set())
        self._chat.setdefault(name, deque(maxlen=CHAT_HISTORY))

    def _load_member(self, network: str, key: bytes, joined: float) -> None:
        self._members[network][key] = joined
        self._member_of.setdefault(key, {})[network] = joined

    def _load_pending(self, network: str, key: bytes, requested: float) -> None:
        self._pending[network][key] = requested
        self._pending_of.setdefault(key, set()).add(network)

    def _load_ban(self, network: str, key: bytes) -> None:
        if key not in self._bans[network]:
            self._bans[network].add(key)
            self._banned_anywhere[key] = self._banned_anywhere.get(key, 0) + 1

    # ---------------------------------------------------------------- nodes
    def node(self, key: bytes) -> Node | None:
        row = self._nodes.get(key)
        return Node(key, row.name, row.vip) if row else None

    def nodes(self, keys: list[bytes]) -> dict[bytes, Node]:
        out = {}
        for k in keys:
            row = self._nodes.get(k)
            if row is not None:
                out[k] = Node(k, row.name, row.vip)
        return out

    def used_vips(self) -> set[str]:
        return {row.vip for row in self._nodes.values()}

    def add_node(self, key: bytes, name: str, vip: str, now: float) -> None:
        if key in self._nodes:
            raise ValueError("node already stored")
        self._nodes[key] = NodeRow(name, vip, now, now)
        self._write("INSERT INTO nodes VALUES ($1,$2,$3,$4,$5) ON CONFLICT (key) DO NOTHING", key, name, vip, now, now)

    def update_node(self, key: bytes, name: str, now: float) -> None:
        row = self._nodes.get(key)
        if row is not None:
            row.name, row.last_seen = name, now
        self._write("UPDATE nodes SET name=$1, last_seen=$2 WHERE key=$3", name, now, key)

    def expirable_nodes(self, seen_before: float) -> list[tuple[bytes, str]]:
        return [(k, row.vip) for k, row in self._nodes.items()
                if row.last_seen < seen_before and not self._member_of.get(k) and not self._owned.get(k)
                and not self._banned_anywhere.get(k)]

    def delete_node(self, key: bytes) -> None:
        for network in list(self._pending_of.get(key, ())):
            self._drop_pending(network, key)
        self._nodes.pop(key, None)
        self._write("DELETE FROM pending WHERE key=$1", key)
        self._write("DELETE FROM nodes WHERE key=$1", key)

    def node_count(self) -> int:
        return len(self._nodes)

    # ---------------------------------------------------------------- networks
    def network(self, name: str) -> Network | None:
        row = self._networks.get(name)
        if row is None:
            return None
        n = row.net
        return Network(n.name, n.owner, n.locked, n.approval, n.max_members, n.pw_hash, n.type, n.gateway, n.encrypted)

    def add_network(self, name: str, pw_hash: bytes, owner: bytes, approval: bool, max_members: int,
                    now: float) -> None:
        if name in self._networks:
            raise ValueError("network exists")
        self._load_network(name, pw_hash, owner, False, approval, max_members, now, "mesh", None, True)
        self._load_member(name, owner, now)
        self._write("INSERT INTO networks (name, pw_hash, owner, approval, max_members, created) "
                    "VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (name) DO NOTHING",
                    name, pw_hash, owner, bool(approval), max_members, now)
        self._write("INSERT INTO members (network, key, joined) VALUES ($1,$2,$3) ON CONFLICT DO NOTHING",
                    name, owner, now)

    def set_network(self, name: str, **fields) -> None:
        allowed = {"locked", "approval", "max_members", "owner", "pw_hash", "type", "gateway", "encrypted"}
        assert set(fields) <= allowed
        for flag in ("locked", "approval", "encrypted"):
            if flag in fields:
                fields[flag] = bool(fields[flag])
        row = self._networks.get(name)
        if row is not None:
            if "owner" in fields:
                self._owned.get(row.net.owner, set()).discard(name)
                self._owned.setdefault(fields["owner"], set()).add(name)
            for k, v in fields.items():
                setattr(row.net, k, v)
        cols = ", ".join(f"{k}=${i}" for i, k in enumerate(fields, 1))
        self._write(f"UPDATE networks SET {cols} WHERE name=${len(fields) + 1}", *fields.values(), name)

    def delete_network(self, name: str) -> None:
        row = self._networks.pop(name, None)
        if row is not None:
            self._owned.get(row.net.owner, set()).discard(name)
            for key in self._members.pop(name, {}):
                self._member_of.get(key, {}).pop(name, None)
            for key in self._pending.pop(name, {}):
                self._pending_of.get(key, set()).discard(name)
            for key in self._bans.pop(name, set()):
                self._banned_anywhere[key] -= 1
            for table in (self._former, self._routes, self._hubs, self._chat):
                table.pop(name, None)
        self._write("DELETE FROM networks WHERE name=$1", name)

    def networks_of(self, key: bytes) -> list[str]:
        return sorted(self._member_of.get(key, {}), key=self._member_of[key].__getitem__) \
            if key in self._member_of else []

    def owned_networks(self, key: bytes) -> list[str]:
        return list(self._owned.get(key, ()))

    # ---------------------------------------------------------------- members
    def members(self, network: str) -> list[bytes]:
        return list(self._members.get(network, ()))

    def member_count(self, network: str) -> int:
        return len(self._members.get(network, ()))

    def is_member(self, network: str, key: bytes) -> bool:
        return key in self._members.get(network, ())

    def add_member(self, network: str, key: bytes, now: float) -> None:
        self._drop_pending(network, key)
        if network in self._members and key not in self._members[network]:
            self._load_member(network, key, now)
        self._write("DELETE FROM pending WHERE network=$1 AND key=$2", network, key)
        self._write("INSERT INTO members (network, key, joined) VALUES ($1,$2,$3) ON CONFLICT DO NOTHING",
                    network, key, now)

    def remove_member(self, network: str, key: bytes) -> None:
        if key not in self._members.get(network, ()):
            return
        del self._members[network][key]
        self._member_of[key].pop(network, None)
        former = self._former[network]
        former.pop(key, None)
        former[key] = None
        self._hubs[network].discard(key)
        self._routes[network].pop(key, None)
        net = self._networks[network].net
        if net.gateway == key:
            net.gateway = None
        self._write("DELETE FROM members WHERE network=$1 AND key=$2", network, key)
        self._write("INSERT INTO former (network, key) VALUES ($1,$2) ON CONFLICT (network, key) "
                    "DO UPDATE SET seq=nextval(pg_get_serial_sequence('former', 'seq'))", network, key)
        self._write("DELETE FROM hubs WHERE network=$1 AND key=$2", network, key)
        self._write("DELETE FROM routes WHERE network=$1 AND key=$2", network, key)
        self._write("UPDATE networks SET gateway=NULL WHERE name=$1 AND gateway=$2", network, key)

    def former_members(self, network: str) -> list[bytes]:
        return list(reversed(self._former.get(network, {})))

    def peers_of(self, key: bytes) -> set[bytes]:
        out: set[bytes] = set()
        for network in self._member_of.get(key, ()):
            out.update(self._members[network])
        out.discard(key)
        return out

    def shared_networks(self, a: bytes, b: bytes) -> list[str]:
        mine = self._member_of.get(a, {})
        theirs = self._member_of.get(b, {})
        return [n for n in mine if n in theirs]

    # ---------------------------------------------------------------- hubs
    def hubs(self, network: str) -> set[bytes]:
        return set(self._hubs.get(network, ()))

    def set_hub(self, network: str, key: bytes, on: bool) -> None:
        if network in self._hubs:
            (self._hubs[network].add if on else self._hubs[network].discard)(key)
        if on:
            self._write("INSERT INTO hubs VALUES ($1,$2) ON CONFLICT DO NOTHING", network, key)
        else:
            self._write("DELETE FROM hubs WHERE network=$1 AND key=$2", network, key)

    # ---------------------------------------------------------------- approved gateway routes
    def routes(self, network: str) -> dict[bytes, list[str]]:
        return {k: list(v) for k, v in self._routes.get(network, {}).items()}

    def set_route(self, network: str, key: bytes, prefix: str, on: bool) -> bool:
        table = self._routes.get(network)
        if table is None:
            return False
        have = table.get(key, [])
        if on:
            if prefix in have:
                return False
            table[key] = sorted(have + [prefix])
            self._write("INSERT INTO routes VALUES ($1,$2,$3) ON CONFLICT DO NOTHING", network, key, prefix)
            return True
        if prefix not in have:
            return False
        have.remove(prefix)
        if not have:
            del table[key]
        self._write("DELETE FROM routes WHERE network=$1 AND key=$2 AND prefix=$3", network, key, prefix)
        return True

    # ---------------------------------------------------------------- pending / bans
    def pending(self, network: str) -> list[bytes]:
        return list(self._pending.get(network, ()))

    def pending_networks_of(self, key: bytes) -> list[str]:
        return list(self._pending_of.get(key, ()))

    def _drop_pending(self, network: str, key: bytes) -> None:
        if key in self._pending.get(network, ()):
            del self._pending[network][key]
            self._pending_of[key].discard(network)

    def add_pending(self, network: str, key: bytes, now: float) -> None:
        if network in self._pending:
            self._drop_pending(network, key)          # INSERT OR REPLACE: a new request goes last
            self._load_pending(network, key, now)
        self._write("DELETE FROM pending WHERE network=$1 AND key=$2", network, key)
        self._write("INSERT INTO pending (network, key, requested) VALUES ($1,$2,$3)", network, key, now)

    def remove_pending(self, network: str, key: bytes) -> None:
        self._drop_pending(network, key)
        self._write("DELETE FROM pending WHERE network=$1 AND key=$2", network, key)

    def is_banned(self, network: str, key: bytes) -> bool:
        return key in self._bans.get(network, ())

    def bans(self, network: str) -> list[bytes]:
        return list(self._bans.get(network, ()))

    def ban(self, network: str, key: bytes) -> None:
        if network in self._bans:
            self._load_ban(network, key)
        self._write("INSERT INTO bans VALUES ($1,$2) ON CONFLICT DO NOTHING", network, key)

    def unban(self, network: str, key: bytes) -> bool:
        if key not in self._bans.get(network, ()):
            return False
        self._bans[network].discard(key)
        self._banned_anywhere[key] -= 1
        self._write("DELETE FROM bans WHERE network=$1 AND key=$2", network, key)
        return True

    # ---------------------------------------------------------------- chat
    def _next_chat_id(self) -> int:
        self._last_chat_id = getattr(self, "_last_chat_id", 0) + 1
        return self._last_chat_id

    def add_chat(self, network: str, sender: bytes, name: str, text: str, now: float) -> int:
        cid = self._next_chat_id()
        if network in self._chat:
            self._chat[network].append((cid, sender, name, text, now))
        self._write("INSERT INTO chat (id, network, sender, name, text, ts) VALUES ($1,$2,$3,$4,$5,$6)",
                    cid, network, sender, name, text, now)
        self._write("DELETE FROM chat WHERE network=$1 AND id <= (SELECT id FROM chat WHERE network=$1 "
                    "ORDER BY id DESC OFFSET $2 LIMIT 1)", network, CHAT_HISTORY)
        return cid

    def chat_history(self, network: str) -> list[tuple[int, bytes, str, str, float]]:
        return list(self._chat.get(network, ()))


TABLES = tuple(vars(Model()))      # the attributes that hold the tables
