"""The server's side of relaying a pair of nodes on two instances (overlay/server/app.py): the relay
secret derives from the server key (one per deployment), an instance relays only pairs with an end
connected to it, and a node of another instance registered here for such a pair does not lend
its address to that node's candidates. The node's side: tests/unit/node/test_cross_instance_relay.py."""

from __future__ import annotations

import shutil

from overlay import crypto
from overlay.server.app import MediationServer


class ElsewhereSync:
    """The one thing ``_may_relay`` and ``_udp_addr_of`` ask of pg_sync.InstanceSync."""

    def __init__(self, remote: set[bytes]):
        self.remote = remote

    def online_elsewhere(self, key: bytes) -> bool:
        return key in self.remote


def test_relay_token_is_one_per_deployment_key(tmp_path):
    one = MediationServer(tmp_path / "a", "127.0.0.1", 0)
    (tmp_path / "b").mkdir(mode=0o700)
    shutil.copy2(tmp_path / "a" / "server.key", tmp_path / "b" / "server.key")
    two = MediationServer(tmp_path / "b", "127.0.0.1", 0)          # another instance, same key
    other = MediationServer(tmp_path / "c", "127.0.0.1", 0)        # another deployment
    node = crypto.public_key(crypto.generate_private_key())
    assert one.relay.token_for(node) == two.relay.token_for(node) != other.relay.token_for(node)
    again = MediationServer(tmp_path / "a", "127.0.0.1", 0)        # a restart
    assert again.relay.token_for(node) == one.relay.token_for(node)


def test_an_instance_relays_only_pairs_with_an_end_of_its_own(tmp_path):
    server = MediationServer(tmp_path / "srv", "127.0.0.1", 0)
    a, b, c = (crypto.public_key(crypto.generate_private_key()) for _ in range(3))
    server.mediator.reachable_peers = lambda k: {a, b, c} - {k}
    assert server._may_relay(b, c)                    # one instance (SQLite): as before
    server.sync = ElsewhereSync({b, c})               # b and c are online on other instances
    server.sessions[a] = object()                     # a is here
    server._peer_cache.clear()
    assert server._may_relay(a, b) and server._may_relay(b, a)
    assert not server._may_relay(b, c) and not server._may_relay(c, b)
    # b registered here for its pair with a: its address here is no candidate of b's
    server.relay._register(b, ("203.0.113.9", 4000), 0.0)
    server.relay._register(a, ("203.0.113.8", 4000), 0.0)
    assert server.mediator.udp_addr_of(b) is None
    assert server.mediator.udp_addr_of(a) == ("203.0.113.8", 4000)
