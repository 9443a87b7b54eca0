"""The owner changes a network's password, optionally removing everyone who joined with the old
one; a ban is one key (issue 9.9)."""

from __future__ import annotations

import pytest

from cluster import Cluster, Node
from tests.unit.control.test_control_mediator import PW, World, fake_hash
from overlay.control.messages import RequestError, validate_request


def members(node, net):
    n = node.network(net)
    return {m["name"] for m in n["members"]} if n else set()


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


def test_admin_password_through_the_cli(tmp_path):
    with Cluster(tmp_path) as c:
        c.start_server()
        owner = c.start_node("owner")
        bob = c.start_node("bob")
        carol = c.start_node("carol")
        owner.ok("create", "lan", "--password", "pw1")
        bob.ok("join", "lan", "--password", "pw1")
        carol.ok("join", "lan", "--password", "pw1")

        # a ban is one key: the same person with a fresh key and the same name is back at once
        owner.ok("admin", "ban", "lan", "carol")
        c.wait(lambda: carol.network("lan") is None, what="carol banned")
        carol.kill()
        carol2 = Node(c, "carol", tmp_path / "home-carol2").start()    # another home: another key
        c.nodes.append(carol2)
        c.wait(carol2.connected, what="carol with a new key")
        carol2.ok("join", "lan", "--password", "pw1")

        # so the owner changes the password: members stay, the old password no longer admits
        assert "lan: password changed" in owner.ok("admin", "password", "lan", "--password", "pw2")
        assert "only the owner" in bob.fails("admin", "password", "lan", "--password", "mine")
        dave = c.start_node("dave")
        assert "wrong password" in dave.fails("join", "lan", "--password", "pw1")
        dave.ok("join", "lan", "--password", "pw2")
        c.wait(lambda: members(owner, "lan") == {"owner", "bob", "carol", "dave"}, what="four members")

        # and removes everyone who joined with an old one (the password piped in)
        r = owner.run("admin", "password", "lan", "--remove-members", input="pw3\npw3\n")
        assert r.returncode == 0 and "removed 3 member(s) who joined with the old one" in r.stdout, r.stderr
        for n in (bob, carol2, dave):
            c.wait(lambda n=n: n.network("lan") is None, what=f"{n.name} removed")
        assert members(owner, "lan") == {"owner"}
        assert "wrong password" in bob.fails("join", "lan", "--password", "pw2")
        bob.ok("join", "lan", "--password", "pw3")
        c.wait(lambda: members(owner, "lan") == {"owner", "bob"}, what="bob back with the new password")
