"""The owner changes a network's password, optionally removing everyone who joined with the old
one; a ban is one key (issue 9.9)."""

from __future__ import annotations

import pytest

from tests.unit.control.test_control_mediator import PW, World, fake_hash
from overlay.control.messages import RequestError, validate_request


def test_password_change_in_the_mediator():
    w = World()
    for n in ("owner", "bob", "carol"):
        w.hello(n)
    w.req("owner", "create", network="lan", password=PW, approval=False)
    w.req("bob", "join", network="lan", password=PW)
    w.hello("dave")
    w.events()
    # only the owner, and never without the new password
    with pytest.raises(RequestError) as e:
        w.m.admin_precheck(w.key("bob"), {"network": "lan"})
    assert e.value.code == "not_owner"
    with pytest.raises(RequestError):
        validate_request({"t": "admin", "id": 1, "network": "lan", "action": "password"})
    with pytest.raises(RequestError):
        validate_request({"t": "admin", "id": 1, "network": "lan", "action": "lock", "password": "x"})

    msg = validate_request({"t": "admin", "id": 7, "network": "lan", "action": "password", "password": "new"})
    assert w.m.handle(w.key("owner"), msg, w.now, password_hash=fake_hash("new"))["removed"] == 0
    assert w.fails("carol", "join", network="lan", password=PW).code == "wrong_password"
    w.req("carol", "join", network="lan", password="new")
    assert w.members("lan") == {"owner", "bob", "carol"}
    w.store.set_network("lan", approval=1)
    w.req("dave", "join", network="lan", password="new")           # pending
    w.events()

    msg = validate_request({"t": "admin", "id": 8, "network": "lan", "action": "password", "password": "newer",
                            "value": 1})
    assert w.m.handle(w.key("owner"), msg, w.now, password_hash=fake_hash("newer"))["removed"] == 2
    w._collect()
    assert w.members("lan") == {"owner"} and w.store.pending("lan") == []
    evs = w.events()
    assert {"t": "removed", "network": "lan", "reason": "password changed"} in evs[w.key("bob")]
    assert {"t": "join_rejected", "network": "lan"} in evs[w.key("dave")]
    w.store.close()
