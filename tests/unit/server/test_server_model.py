"""The in-memory model behind the PostgreSQL store (overlay/server/model.py) answers like the
SQLite store: random sequences of the mediator's writes applied to both, every read compared
after each step (orders where SQLite defines one, sets where it does not)."""

from __future__ import annotations

import random

import pytest

from overlay.server.model import Model
from overlay.server.store import Store

KEYS = [bytes([i]) * 32 for i in range(6)]
NETS = ["lan", "web", "x"]


def _reads(s) -> dict:
    out = {"count": s.node_count(), "vips": s.used_vips(), "nodes": s.nodes(KEYS)}
    for n in NETS:
        out[n] = (s.network(n), s.members(n), s.member_count(n), s.pending(n), s.former_members(n),
                  set(s.bans(n)), s.hubs(n), s.routes(n), s.chat_history(n))
    for k in KEYS:
        out[k] = (s.node(k), s.networks_of(k), set(s.owned_networks(k)), set(s.pending_networks_of(k)),
                  s.peers_of(k), [s.is_member(n, k) for n in NETS], [s.is_banned(n, k) for n in NETS])
        out[(k, "shared")] = [sorted(s.shared_networks(k, j)) for j in KEYS]
    out["expirable"] = sorted(s.expirable_nodes(50.0))
    return out


def _step(rng: random.Random, now: float, stores) -> None:
    k, j = rng.choice(KEYS), rng.choice(KEYS)
    n = rng.choice(NETS)
    op = rng.randrange(17)
    ref = stores[0]
    calls: list[tuple[str, tuple, dict]] = []
    if op == 0 and ref.node(k) is None:
        calls.append(("add_node", (k, f"n{k[0]}", f"100.64.0.{k[0] + 1}", now), {}))
    elif op == 1 and ref.node(k) is not None:
        calls.append(("update_node", (k, rng.choice(["a", "b", f"n{k[0]}"]), now), {}))
    elif op == 2 and ref.network(n) is None:
        calls.append(("add_network", (n, b"h", k, rng.random() < 0.5, rng.randrange(3), now), {}))
    elif op == 3 and ref.network(n) is not None:
        field = rng.choice(["locked", "approval", "max_members", "owner", "type", "gateway", "encrypted"])
        value = {"locked": rng.randrange(2), "approval": rng.randrange(2), "max_members": rng.randrange(5),
                 "owner": k, "type": rng.choice(["mesh", "hub-and-spoke", "gateway"]),
                 "gateway": rng.choice([None, k]), "encrypted": rng.randrange(2)}[field]
        calls.append(("set_network", (n,), {field: value}))
    elif op == 4 and ref.network(n) is not None and rng.random() < 0.3:
        calls.append(("delete_network", (n,), {}))
    elif op in (5, 6) and ref.network(n) is not None:
        calls.append(("add_member", (n, k, now), {}))
    elif op == 7 and ref.network(n) is not None:
        calls.append(("remove_member", (n, k), {}))
    elif op == 8 and ref.network(n) is not None:
        calls.append(("add_pending", (n, k, now), {}))
    elif op == 9:
        calls.append(("remove_pending", (n, k), {}))
    elif op == 10 and ref.network(n) is not None:
        calls.append(("ban", (n, k), {}))
    elif op == 11:
        calls.append(("unban", (n, k), {}))
    elif op == 12 and ref.network(n) is not None:
        calls.append(("set_hub", (n, k, rng.random() < 0.6), {}))
    elif op == 13 and ref.network(n) is not None:
        calls.append(("set_route", (n, k, rng.choice(["10.0.0.0/8", "192.168.1.0/24"]), rng.random() < 0.6), {}))
    elif op == 14 and ref.network(n) is not None:
        calls.append(("add_chat", (n, k, "name", f"t{now}", now), {}))
    elif op == 15 and ref.node(k) is not None and rng.random() < 0.3:
        calls.append(("delete_node", (k,), {}))
    elif op == 16 and ref.node(j) is None:
        calls.append(("add_node", (j, "other", f"100.64.1.{j[0]}", now), {}))
    for name, args, kw in calls:
        results = [getattr(s, name)(*args, **kw) for s in stores]
        assert results[0] == results[1], (name, args, kw, results)


@pytest.mark.parametrize("seed", range(30))
def test_model_answers_like_sqlite(seed):
    rng = random.Random(seed)
    sqlite, model = Store(":memory:"), Model()
    try:
        for i in range(150):
            _step(rng, 1.0 + i, (sqlite, model))
            assert _reads(sqlite) == _reads(model), f"seed {seed}, step {i}"
    finally:
        sqlite.close()
