"""The owner changes a network's password through the CLI, optionally removing everyone who joined
with the old one; a ban is one key (issue 9.9). The mediator's side: tests/unit/server/test_admin_password.py."""

from __future__ import annotations

import pytest

from cluster import Cluster, Node


def members(node, net):
    n = node.network(net)
    return {m["name"] for m in n["members"]} if n else set()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_admin_password_through_the_cli(tmp_path, backend, request):
    database = request.getfixturevalue("pg_url") if backend == "postgres" else None
    with Cluster(tmp_path, database) as c:
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
