"""pg_repair.reconcile without a database: an instance's model, a copy changed by another
mediator (another instance whose NOTIFYs were missed), the copy taken with ``Model.adopt``; what
the first mediator then tells its nodes. The World's event checks (who may get which event) run
on everything reconcile queues."""

from __future__ import annotations

import copy

from overlay.server.mediator import Mediator
from overlay.server.model import Model
from overlay.server.pg_repair import reconcile
from tests.unit.control.test_control_mediator import PW, World, _setup


def _on_model() -> World:
    w = World()
    w.store.close()
    w.store = Model()
    w.m = Mediator(w.store, **w.settings)
    return w


def _elsewhere(w: World, change) -> int:
    """``change(other)``: another instance's World on a copy of ``w``'s model; then ``w`` takes
    the changed model and reconciles."""
    other = _on_model()
    other.store = copy.deepcopy(w.store)
    other.m = Mediator(other.store, **other.settings)
    other.now = w.now
    change(other)
    old = w.store.adopt(other.store)
    return reconcile(w.m, old, w.store)


def _names(w: World, who: str, network: str = "lan") -> dict[str, bool]:
    """Member name -> online, as ``who`` was told in ``members`` events (last record wins)."""
    out: dict[str, bool] = {}
    for e in w.ev(who, "members"):
        if e["network"] == network:
            out.update({m["name"]: m["online"] for m in e["members"]})
    return out


def test_a_join_a_ban_and_chat_made_elsewhere_are_told_as_deltas():
    w = _on_model()
    _setup(w, "alice", "bob", "carol")

    def change(o: World) -> None:
        o.hello("alice")
        o.hello("dave")
        o.req("dave", "join", network="lan", password=PW)
        o.admin("alice", "lan", "ban", target="carol")
        o.req("alice", "chat", network="lan", text="hi")
    assert _elsewhere(w, change) == 1
    ev = w.events()
    bob = ev[w.key("bob")]
    assert [(e["t"], e.get("reason")) for e in bob if e["t"] in ("member_left", "removed")] == [("member_left", "banned")]
    assert {m["name"] for e in bob if e["t"] == "members" for m in e["members"]} == {"dave"}
    assert [e["text"] for e in bob if e["t"] == "chat"] == ["hi"]
    assert [e["network"]["count"] for e in bob if e["t"] == "network"] == [3]
    carol = ev[w.key("carol")]
    assert [(e["t"], e.get("reason")) for e in carol] == [("removed", "banned")]
    assert w.store.is_banned("lan", w.key("carol")) and w.members("lan") == {"alice", "bob", "dave"}
    # a new node's virtual IP is taken here too
    dave_ip = w.store.node(w.key("dave")).vip
    w.hello("erin")
    w.req("erin", "join", network="lan", password=PW)
    assert w.store.node(w.key("erin")).vip != dave_ip
    # nothing changed: nothing told
    w.events()
    assert _elsewhere(w, lambda o: None) == 0
    assert w.events() == {}


def test_topology_join_requests_and_a_deleted_network():
    w = _on_model()
    _setup(w, "alice", "hub", "carol")
    w.req("alice", "create", network="club", password=PW, approval=True)
    w.req("carol", "create", network="old", password=PW)
    w.hello("frank")
    w.req("frank", "join", network="old", password=PW)
    w.events()

    def change(o: World) -> None:
        o.hello("alice")
        o.hello("carol")
        o.admin("alice", "lan", "hub-on", target="hub")
        o.admin("alice", "lan", "type", target="hub-and-spoke")
        o.hello("erin")
        o.req("erin", "join", network="club", password=PW)     # a join request: approval
        o.admin("carol", "old", "delete")
    assert _elsewhere(w, change) == 3
    ev = w.events()
    carol = ev[w.key("carol")]
    # a spoke now: the other spoke is out of reach, a fresh snapshot follows
    assert any(e["t"] == "member_left" and e["reason"] == "out of reach" and e["key"] == _key_text(w, "alice")
               for e in carol)
    assert any(e["t"] == "network" and e["network"]["type"] == "hub-and-spoke" for e in carol)
    assert ("removed", "deleted") in [(e["t"], e.get("reason")) for e in carol]
    assert [(e["t"], e.get("reason")) for e in ev[w.key("frank")]] == [("removed", "deleted")]
    assert [e["name"] for e in ev[w.key("alice")] if e["t"] == "join_request"] == ["erin"]
    # the owner approves here: this instance's model has erin's request
    w.admin("alice", "club", "approve", target="erin")
    assert w.members("club") == {"alice", "erin"}


def _key_text(w: World, who: str) -> str:
    from overlay.control.messages import key_to_text
    return key_to_text(w.key(who))
