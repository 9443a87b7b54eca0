"""What an instance missed while its LISTEN connection was down, told to its own nodes.

Several ``overlay server`` instances on one PostgreSQL database follow each other's changes through
NOTIFY (overlay/server/pg_sync.py). A NOTIFY sent while an instance's listening connection is down
(a network blip, PostgreSQL restarting) is lost. When the connection comes back, the instance
loads the database again into a fresh model, takes it (``Model.adopt``), and ``reconcile`` compares
the model it had with the one it now has and gives the mediator's usual events, as deltas, to the
members that must hear of them:

- a network deleted: ``removed`` (reason ``deleted``) to its members;
- a network new to this instance: its snapshot to the members it has;
- a member gone (left, kicked, banned elsewhere): ``removed`` to it (reason ``banned`` when it is
  banned now, else ``left``), ``member_left`` to the members who saw it;
- a member new: the network's snapshot to it, its record to the others (``join_approved`` when it
  had asked to join); a member whose record changed (name, virtual IP, owner): its record again;
- the type, hubs or gateway changed: what ``Mediator._retopologize`` sends; the network's settings
  or member count changed: its info to every member;
- a join request new to this instance: ``join_request`` to the owner; one rejected: ``join_rejected``
  to the requester;
- chat lines new to this instance: to the members, in id order.

Presence is not in the database: the instance asks the others to announce their nodes again
(``sync``) and takes offline the nodes of other instances not announced again (pg_sync.py).
Events go through ``Mediator._push``, so only nodes online reach the glue, which delivers to the
nodes connected to this instance. The work is proportional to what changed times the members who
must hear of it, plus one pass over the tables to compare them.
"""

from __future__ import annotations

from overlay.control.messages import key_to_text
from overlay.server.model import Model


def _topology(model: Model, net) -> tuple[str, frozenset, bytes | None]:
    """``Mediator._topology`` read from ``model`` (the mediator reads its store, the new model)."""
    if net.type == "hub-and-spoke":
        return net.type, frozenset(model.hubs(net.name)), None
    if net.type == "gateway":
        return net.type, frozenset(), net.gateway or net.owner
    return "mesh", frozenset(), None


def reconcile(m, old: Model, new: Model) -> int:
    """``new`` is the mediator's store now (after ``adopt``), ``old`` what it held before: push the
    events that bring the mediator's nodes from ``old`` to ``new``. Returns how many networks
    changed."""
    m.end_turn()
    changed = 0
    for k, row in new._nodes.items():
        was = old._nodes.get(k)
        if was is None or was.vip != row.vip:
            m.vips.mark_used(row.vip)
        m._guests.pop(k, None)                   # stored elsewhere meanwhile
    used = {row.vip for row in new._nodes.values()}
    for k, row in old._nodes.items():
        if k not in new._nodes and row.vip not in used:
            m.vips.release(row.vip)              # expired elsewhere
    for name in list(old._networks) + [n for n in new._networks if n not in old._networks]:
        if _network(m, old, new, name):
            changed += 1
    m.end_turn()
    return changed


def _network(m, old: Model, new: Model, name: str) -> bool:
    o, n = old.network(name), new.network(name)
    if n is None:
        for k in old.members(name):
            m._push(k, {"t": "removed", "network": name, "reason": "deleted"})
        return True
    if o is None:
        for k in new.members(name):
            m._send_network(k, name)
        for k in new.pending(name):
            m._push(n.owner, m._join_request_event(name, k))
        _chat(m, new, n, name, 0)
        return True
    was, now = old._members[name], new._members[name]
    before, after = _topology(old, o), _topology(new, n)
    differs = False
    for k in was:
        if k in now:
            continue
        differs = True
        m.away.get(k, set()).discard(name)
        reason = "banned" if new.is_banned(name, k) else "left"
        m._push(k, {"t": "removed", "network": name, "reason": reason})
        left = {"t": "member_left", "network": name, "key": key_to_text(k), "reason": reason}
        for j in now:
            if m._sees(before, j, k):
                m._push(j, left)
    asked = old._pending[name]
    for k in now:
        if k in was:
            a, b = old._nodes.get(k), new._nodes.get(k)
            if (a is None or b is None or a.name != b.name or a.vip != b.vip
                    or (k == o.owner) != (k == n.owner) or old._routes[name].get(k) != new._routes[name].get(k)):
                differs = True
                if before == after:
                    m._announce_member(name, k)
            continue
        differs = True
        m._send_network(k, name)
        m._announce_member(name, k)
        if k in asked:
            m._push(k, {"t": "join_approved", "network": name})
    if before != after:
        differs = True
        m._retopologize(name, before)
    for k in new._pending[name]:
        if k not in asked:
            differs = True
            m._push(n.owner, m._join_request_event(name, k))
    for k in asked:
        if k not in now and k not in new._pending[name]:
            differs = True
            m._push(k, {"t": "join_rejected", "network": name})
    if differs or o != n:
        m._broadcast_info(name)
        differs = True
    seen = old._chat[name]
    if _chat(m, new, n, name, seen[-1][0] if seen else 0):
        differs = True
    return differs


def _chat(m, new: Model, net, name: str, after_id: int) -> bool:
    """Chat lines of ``name`` past ``after_id`` to its members, as ``Mediator._chat`` sends them."""
    lines = [c for c in new.chat_history(name) if c[0] > after_id]
    topo = _topology(new, net)
    members = new.members(name)
    for cid, sender, sender_name, text, ts in lines:
        ev = {"t": "chat", "network": name, "id": cid, "from": sender_name, "from_key": key_to_text(sender),
              "text": text, "ts": ts}
        anonymous = {**ev, "from_key": None}
        for k in members:
            m._push(k, ev if m._sees(topo, k, sender) else anonymous)
    return bool(lines)
