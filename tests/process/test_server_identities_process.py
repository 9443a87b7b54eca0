"""Identities on a real server started through the CLI: an address on the first network, the
proof of work cached beside the key, the server's flags (issues 9.2 and 21). The mediator's side:
tests/unit/server/test_server_identities.py."""

from __future__ import annotations

import sqlite3
from cluster import Cluster
from overlay import crypto
from overlay.control import identity_proof
from overlay.control.messages import key_from_text
from overlay.server.mediator import (
    DEFAULT_IDENTITY_BITS,
)


def test_real_node_gets_its_address_on_its_first_network(tmp_path):
    with Cluster(tmp_path) as c:
        c.start_server()
        a = c.start_node("alice")
        b = c.start_node("bob")
        assert a.status()["node"]["virtual_ip"] is None
        assert " -  server" in a.ok("status")
        db = sqlite3.connect(tmp_path / "server" / "overlay.db")
        assert db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] == 0
        a.ok("create", "lan", "--password", "pw")
        b.ok("join", "lan", "--password", "pw")
        c.wait(lambda: a.status()["node"]["virtual_ip"] and b.status()["node"]["virtual_ip"],
               what="addresses after joining")
        assert db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] == 2
        # each proved work on its key once (the server's default), cached beside the key
        for n in (a, b):
            proof = (n.home / identity_proof.FILE).read_text().strip()
            pub = crypto.public_key(key_from_text((n.home / "node.key").read_text().strip()))
            assert identity_proof.check(pub, proof, DEFAULT_IDENTITY_BITS)
        assert "pong from bob" in a.ok("ping", "bob", "-c", "3")     # the stack answers on the new address
        db.close()


def test_server_flags_set_the_work_and_the_bound(tmp_path):
    """`overlay server --identity-work 0 --new-nodes-per-hour 1`: no proof is asked, and a second
    new node from the same address is refused with the time to wait."""
    with Cluster(tmp_path) as c:
        c.start_server("--identity-work", "0", "--new-nodes-per-hour", "1")
        a = c.start_node("alice")
        b = c.start_node("bob")
        a.ok("create", "lan", "--password", "pw")
        assert not (a.home / identity_proof.FILE).exists()
        out = b.fails("join", "lan", "--password", "pw")
        assert "too many new nodes from your address; try again in" in out, out
