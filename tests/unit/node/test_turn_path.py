"""The data plane's TURN path (overlay/node/turn_path.py) against a scripted TURN server, fake clock."""

from __future__ import annotations

import struct
import time

from overlay.nat import stun, turn
from overlay.nat.turn import ALLOCATE, CHANNEL_BIND, CREATE_PERMISSION, REFRESH, TurnConfig
from overlay.node.turn_path import RETRY_INITIAL, ROTATE_BEFORE, TurnPath
from tests.unit.nat.test_nat_turn import KEY, NONCE, PASSWORD, REALM, USER, answer, error

SERVER = ("198.51.100.5", 3478)
MINE = ("198.51.100.5", 50000)
PEER_B = ("198.51.100.5", 50001)
B, C = b"b" * 32, b"c" * 32


class Harness:
    def __init__(self):
        self.t = 100.0
        self.out: list = []
        self.relayed_changes = 0
        self.path = TurnPath(now=lambda: self.t, out=self.out, schedule_flush=lambda: None,
                             on_relayed=self._relayed, config=TurnConfig(keepalive_interval=1e6))

    def _relayed(self):
        self.relayed_changes += 1

    def creds(self, username: str = USER, ttl: int = 3600) -> dict:
        return {"url": "turn:198.51.100.5:3478", "username": username, "password": PASSWORD,
                "expires": int(time.time()) + ttl, "ttl": ttl}

    def sent(self) -> list[bytes]:
        assert all(addr == SERVER for _, addr in self.out), self.out
        out = [d for d, _ in self.out]
        self.out.clear()
        return out

    def tick(self):
        t = self.path.timer()
        if t is not None and t <= self.t:
            self.path.tick(self.t)

    def feed(self, datagram: bytes):
        return self.path.receive(memoryview(datagram), self.t)

    def allocate(self) -> None:
        """Run the allocation (401, then success) and answer the peer requests that follow."""
        self.tick()
        [first] = self.sent()
        assert stun.parse(first).method == ALLOCATE
        self.feed(error(first, 401, "Unauthorized", realm=REALM, nonce=NONCE))
        [second] = self.sent()
        tid = stun.parse(second).transaction_id
        self.feed(answer(second, stun.SUCCESS, [(turn.XOR_RELAYED_ADDRESS, stun.encode_address(MINE, tid)),
                                                (turn.LIFETIME, struct.pack("!I", 600))]))


def test_lazy_allocation_publish_bind_and_data():
    h = Harness()
    p = h.path
    p.configure(h.creds())
    assert p.configured and p.label == "198.51.100.5:3478" and p.timer() is None   # nothing wanted yet
    batch: list = []
    assert not p.send(B, b"wg", batch) and not batch
    p.set_peer(B, PEER_B)                  # the peer published its relayed address: allocate too
    h.allocate()
    assert p.published == MINE and h.relayed_changes == 1
    reqs = {stun.parse(d).method: d for d in h.sent()}
    assert set(reqs) == {CREATE_PERMISSION, CHANNEL_BIND}
    assert not p.active(B)
    for r in reqs.values():
        h.feed(answer(r, stun.SUCCESS, []))
    assert p.active(B)
    assert p.send(B, b"wg", batch) and batch == [(b"\x40\x00\x00\x02wg", SERVER)]
    got = h.feed(b"\x40\x00\x00\x03abc")
    assert got is not None and got[0] == B and bytes(got[1]) == b"abc"
    assert p.summary()["ready"] == 1 and p.summary()["state"] == "allocated"
    # another peer claiming the same relayed address is refused; a peer leaving is forgotten
    p.set_peer(C, PEER_B)
    assert p.conflicts == 1 and p.peer_addr == {B: PEER_B}
    p.set_peer(C, ("192.0.2.99", 4000))     # not on our TURN server: never permitted
    assert p.foreign == 1 and ("192.0.2.99", 4000) not in p.client.peers
    p.forget_peer(B)
    assert not p.active(B) and not p.send(B, b"x", []) and h.feed(b"\x40\x00\x00\x01x") is None


def test_failure_backs_off_and_the_built_in_relay_stays():
    h = Harness()
    p = h.path
    p.configure(h.creds())
    p.need()
    h.tick()
    [first] = h.sent()
    h.feed(error(first, 401, "Unauthorized", realm=REALM, nonce=NONCE))
    [second] = h.sent()
    h.feed(error(second, 401, "Unauthorized", realm=REALM, nonce=NONCE))    # credentials refused
    assert p.client is None and "401" in p.last_error and p.published is None
    assert p.timer() == h.t + RETRY_INITIAL
    h.t += RETRY_INITIAL
    h.tick()
    assert [stun.parse(d).method for d in h.sent()] == [ALLOCATE]           # tried again
    assert p.backoff == 2 * RETRY_INITIAL


def test_fresh_credentials_replace_the_allocation_before_the_old_ones_expire():
    h = Harness()
    p = h.path
    p.configure(h.creds(ttl=3600))
    p.need()
    h.allocate()
    h.sent()
    p.configure(h.creds(username="9999999999:node", ttl=7200))
    due = p.rotation_at()
    assert due is not None and p.timer() <= due and abs(due - (h.t + 3600 - ROTATE_BEFORE)) < 2
    h.t = due
    p.tick(h.t)
    methods = [(stun.parse(d).method, stun.parse(d).get(turn.LIFETIME)) for d in h.sent()]
    assert methods == [(REFRESH, b"\x00\x00\x00\x00"), (ALLOCATE, struct.pack("!I", 600))]
    assert p.published is None and h.relayed_changes == 2          # withdrawn until the new one is there
    assert p.client.username == "9999999999:node"


def test_close_deallocates_and_no_server_means_no_path():
    h = Harness()
    p = h.path
    p.configure(h.creds())
    p.need()
    h.allocate()
    h.sent()
    [(bye, addr)] = p.close()
    assert addr == SERVER and stun.parse(bye).method == REFRESH and turn.integrity_ok(bye, KEY)
    p.configure(None)
    assert not p.configured and p.summary() is None and p.timer() is None
