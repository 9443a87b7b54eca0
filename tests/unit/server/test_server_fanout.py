"""The server's fan-out: a change goes only to the members it concerns, as a delta, and nothing is
O(members) per member per event (overlay/server/mediator.py, overlay/server/fanout.py)."""

from __future__ import annotations

import copy
import json
from collections import Counter

from overlay.control.messages import MEMBER_BATCH, key_to_text
from overlay.node.state import NodeState
from overlay.server.fanout import Encoder, coalesce
from tests.unit.control.test_control_mediator import PW, World, _setup


def _world() -> World:
    return World()


class CountingStore:
    """The mediator's store, counting the calls made through it."""

    def __init__(self, store):
        self._store, self.calls = store, 0
        self.by_name: Counter = Counter()

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def counted(*a, **kw):
            self.calls += 1
            self.by_name[name] += 1
            return attr(*a, **kw)
        return counted


def test_presence_change_is_one_delta_per_concerned_member():
    w = _world()
    names = [f"m{i}" for i in range(30)]
    _setup(w, *names)
    _setup(w, "x0", "x1", network="other")   # another network: not concerned
    w.disconnect("m29")                        # a member offline: nothing is queued for it
    w.events()
    w.req("m5", "presence", network="lan", online=False)
    evs = w.events()
    bob = key_to_text(w.key("m5"))
    concerned = {w.key(n) for n in names if n not in ("m5", "m29")}
    assert set(evs) == concerned
    for key, got in evs.items():
        assert len(got) == 1, "one message per member"
        (ev,) = got
        assert ev["t"] == "members" and ev["network"] == "lan"
        assert [(r["key"], r["online"]) for r in ev["members"]] == [(bob, False)], "a delta: one record"
    w.store.close()


def test_hello_and_disconnect_send_one_delta_per_member():
    w = _world()
    names = [f"m{i}" for i in range(12)]
    _setup(w, *names)
    w.disconnect("m3")
    evs = w.events()
    assert set(evs) == {w.key(n) for n in names if n != "m3"}
    assert all(len(v) == 1 and len(v[0]["members"]) == 1 for v in evs.values())
    w.hello("m3")
    evs = w.events()
    others = {w.key(n) for n in names if n != "m3"}
    assert set(evs) == others | {w.key("m3")}
    for k in others:
        assert [(e["t"], len(e["members"])) for e in evs[k]] == [("members", 1)]
    assert {r["name"] for e in evs[w.key("m3")] if e["t"] == "members" for r in e["members"]} == set(names)
    w.store.close()


def _join_cost(members: int) -> tuple[int, dict]:
    w = _world()
    _setup(w, *[f"m{i}" for i in range(members)])
    w.hello("late")
    counting = CountingStore(w.m.store)
    w.m.store = counting
    w.req("late", "join", network="lan", password=PW)
    evs = w.events()
    w.m.store = counting._store
    w.store.close()
    return counting.calls, evs


def test_join_costs_the_store_the_same_whatever_the_size_and_each_member_two_events():
    small, _ = _join_cost(10)
    large, evs = _join_cost(60)
    assert large == small, "store calls per join must not grow with the members"
    w = World()
    others = [v for k, v in evs.items() if k != w.key("late")]
    assert len(others) == 60
    for got in others:
        assert sorted(e["t"] for e in got) == ["members", "network"]
        assert next(e for e in got if e["t"] == "network")["network"]["count"] == 61
    w.store.close()


def test_broadcast_info_shares_one_event_per_role():
    w = _world()
    _setup(w, *[f"m{i}" for i in range(20)])
    w.m._broadcast_info("lan")
    out = list(w.m.outgoing)
    w.m.outgoing.clear()
    assert len(out) == 20 and len({id(m) for _, m in out}) == 2
    roles = {k: m["network"]["role"] for k, m in out}
    assert roles[w.key("m0")] == "owner" and {roles[w.key(f"m{i}")] for i in range(1, 20)} == {"member"}
    w.store.close()


def _snapshot(evs: list[dict]) -> dict[str, dict]:
    """The snapshot a node got (one batch: fewer members than MEMBER_BATCH), by name."""
    return {r["name"]: r for r in next(e for e in evs if e["t"] == "members")["members"]}


def test_hellos_of_one_turn_share_the_store_reads_and_the_records():
    """A reconnect storm: the hellos handled in one turn read a network once and build each
    unchanged member's record once."""
    w = _world()
    names = [f"m{i}" for i in range(20)]
    _setup(w, *names)
    for n in names[1:]:
        w.disconnect(n)
    w.m.end_turn()
    w.events()
    counting = CountingStore(w.m.store)
    w.m.store = counting
    for n in names[1:6]:
        w.hello(n)
    w.m.store = counting._store
    assert counting.by_name["nodes"] == 1 and counting.by_name["members"] == 1
    evs = w.events()
    first, last = _snapshot(evs[w.key("m1")]), _snapshot(evs[w.key("m5")])
    assert first["m10"] is last["m10"], "an unchanged member's record is shared"
    assert [last[f"m{i}"]["online"] for i in range(7)] == [True] * 6 + [False]
    assert first["m1"]["online"] is True and first["m2"]["online"] is False
    w.m.end_turn()
    w.store.close()


def test_a_snapshot_after_a_change_in_the_same_turn_is_fresh():
    w = _world()
    names = [f"m{i}" for i in range(8)]
    _setup(w, *names)
    w.disconnect("m6")
    w.disconnect("m7")
    w.m.end_turn()
    w.events()
    w.req("m0", "members", network="lan")           # the turn's cache holds the network now
    w.req("m1", "presence", network="lan", online=False)
    w.req("m2", "rename", name="renamed")
    w.hello("m6", name="newname")                   # a hello that renames
    w.hello("m7")
    snap = _snapshot(w.events()[w.key("m7")])
    assert snap["m1"]["online"] is False
    assert "renamed" in snap and "m2" not in snap
    assert snap["newname"]["online"] is True and "m6" not in snap
    assert snap["m7"]["online"] is True
    w.req("m0", "admin", network="lan", action="kick", target="m5")
    w.req("m4", "members", network="lan")
    assert "m5" not in _snapshot(w.events()[w.key("m4")])
    w.store.close()


# ============================================================================ coalesce / encode


def _members(net: str, *keys: str, online: bool = True) -> dict:
    return {"t": "members", "network": net, "members": [{"name": k, "key": k, "ip": "100.64.0.1",
                                                          "online": online, "role": "member"} for k in keys]}


def test_coalesce_merges_adjacent_deltas_of_one_network_per_recipient():
    a, b = b"a" * 32, b"b" * 32
    shared = _members("lan", "x")
    items = [(a, shared), (b, shared), (a, _members("lan", "y")), (a, _members("other", "z")),
             (a, _members("other", "w")), (a, {"t": "chat", "network": "lan"}), (a, _members("lan", "v"))]
    before = copy.deepcopy(shared)
    out = coalesce(items)
    assert shared == before, "an event shared with other recipients is never changed"
    assert out[b] == [shared]
    assert [(e["t"], e.get("network"), [r["key"] for r in e.get("members", [])]) for e in out[a]] == [
        ("members", "lan", ["x", "y"]), ("members", "other", ["z", "w"]), ("chat", "lan", []),
        ("members", "lan", ["v"])]


def test_coalesce_keeps_batches_bounded():
    a = b"a" * 32
    out = coalesce([(a, _members("lan", f"k{i}")) for i in range(MEMBER_BATCH + 5)])
    assert [len(e["members"]) for e in out[a]] == [MEMBER_BATCH, 5]


def test_encoder_gives_json_dumps_bytes_and_encodes_shared_events_once():
    shared = _members("lan", "x", "ü")
    enc = Encoder()
    datas = [enc.encode(shared) for _ in range(100)]
    assert enc.encoded == 2, "the event's two records, each encoded once"
    assert datas[0] == json.dumps(shared, separators=(",", ":"), ensure_ascii=False).encode()
    merged = coalesce([(b"a", shared), (b"a", _members("lan", "y", online=False))])[b"a"][0]
    data = enc.encode(merged)
    assert json.loads(data) == {"t": "members", "network": "lan",
                                "members": shared["members"] + _members("lan", "y", online=False)["members"]}
    assert data == json.dumps(dict(merged), separators=(",", ":"), ensure_ascii=False).encode()


def test_reconnect_storm_coalesced_gives_each_node_the_same_state():
    """Everyone comes back within one turn (a server restart): coalesced, the online member gets
    one message for all the others, and every node ends in the state the events one by one give."""
    w = _world()
    names = [f"m{i}" for i in range(15)]
    _setup(w, *names)
    for n in names[1:]:
        w.disconnect(n)
    w.events()
    for n in names[1:]:
        w.hello(n)
        w.req(n, "presence", network="lan", online=n != "m7")
    raw: list[tuple[bytes, dict]] = [(k, e) for k, evs in w.events().items() for e in evs]
    # the order per recipient is what counts; the mediator queues them in this order
    merged = coalesce(raw)
    first = merged[w.key("m0")]
    assert len(first) == 1 and len(first[0]["members"]) == 2 * (len(names) - 1)
    enc = Encoder()
    for key in {k for k, _ in raw}:
        one_by_one, batched = NodeState(), NodeState()
        for k, e in raw:
            if k == key:
                one_by_one.apply(e)
        for e in merged[key]:
            batched.apply(json.loads(enc.encode(e)))
        assert batched.status() == one_by_one.status()
    assert {r["key"]: r["online"] for r in first[0]["members"]}[key_to_text(w.key("m7"))] is False
    w.store.close()
