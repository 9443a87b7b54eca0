"""The mediation server's sans-I/O core: ``Mediator`` over a real ``Store``, injected ``now``.

Most tests run twice, on SQLite and on PostgreSQL (``PgStore``; a throw-away cluster from
tests/support/postgres.py): ``World`` then awaits the store's hooks around each request as the
glue does (``prepare`` before the mediator, ``undo`` when it refuses, ``flush`` after).

Requests go through ``validate_request`` and the same precheck -> verify -> handle sequence as the
asyncio glue (overlay/server/app.py); the slow Argon2id step is replaced by a cheap stand-in hash
except in one test that uses ``overlay.control.passwords`` end to end. Every batch of outgoing
events is checked against an isolation invariant: an event only ever goes to an online node that
has business with the network it names.

Bugs these tests found were fixed; the tests stay as regressions.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import pytest

from overlay import crypto
from overlay.control import identity_proof, passwords
from overlay.control.channel import MAX_PLAINTEXT
from overlay.control.messages import (
    CHAT_HISTORY, MEMBER_BATCH, RequestError, key_from_text, key_to_text, validate_request,
)
from overlay.server import mediator as mediator_mod
from overlay.server.mediator import (
    FAILED_JOIN_DELAY, FAILED_JOIN_WINDOW, FAILED_JOINS_PER_NETWORK, FAILED_JOINS_PER_NODE,
    FAILED_JOINS_PER_SOURCE, MAX_NETWORKS_PER_NODE,
    MAX_PENDING, Mediator,
)
from overlay.server.store import Store
from overlay.server.store_pg import PgStore, is_postgres_url

PW = "s3cret"


def fake_hash(pw: str) -> bytes:
    return b"fake$" + pw.encode()


class World:
    """A Mediator plus the bits of glue the asyncio server provides (ids, password step)."""

    def __init__(self, path=":memory:", pool: str = mediator_mod.DEFAULT_POOL, real_passwords: bool = False,
                 **settings):
        self.path, self.pool = path, pool
        self.loop: asyncio.AbstractEventLoop | None = None
        if isinstance(path, str) and is_postgres_url(path):
            self.loop = asyncio.new_event_loop()
            self.store = self.loop.run_until_complete(PgStore.open(path))
        else:
            self.store = Store(path)
        # identity proofs (slow on purpose) are off here; tests/unit/server/test_server_identities.py has them
        self.settings = {"identity_bits": 0, **settings}
        self.m = Mediator(self.store, pool, **self.settings)
        self.now = 1_000_000.0
        self._rid = 0
        self.real = real_passwords
        self._buf: dict[bytes, list[dict]] = defaultdict(list)

    def run(self, coro):
        """Await a store hook as the glue does (SQLite's are no-ops)."""
        if self.loop is None:
            coro.close()
            return None
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        if self.loop is None:
            self.store.close()
        else:
            self.loop.run_until_complete(self.store.aclose())
            self.loop.close()

    def count(self, table: str) -> int:
        if self.loop is None:
            return self.store.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        return self.run(self.store.pool.fetchval(f"SELECT COUNT(*) FROM {table}"))

    # ------------------------------------------------------------------ keys
    @staticmethod
    def key(label: str) -> bytes:
        return crypto.blake2s(b"node:" + label.encode())

    # ------------------------------------------------------------------ requests
    def _id(self) -> int:
        self._rid += 1
        return self._rid

    def hello(self, who: str, name: str | None = None, version: int = 1, source: str | None = None,
              **extra) -> dict:
        msg = validate_request({"t": "hello", "id": self._id(), "name": name or who, "version": version, **extra})
        try:
            return self._applied(self.key(who), msg, None, lambda: self.m.hello(self.key(who), msg, self.now,
                                                                                source=source))
        finally:
            self._collect()

    def disconnect(self, who: str) -> None:
        self.m.disconnect(self.key(who), self.now)
        self.run(self.store.flush())
        self._collect()

    def _applied(self, key: bytes, msg: dict, password_hash: bytes | None, apply):
        """The glue's sequence around the mediator: the store's prepare, the mediator's answer,
        undo if it refused, flush."""
        claim = self.run(self.store.prepare(self.m, key, msg, self.now, password_hash))
        try:
            reply = apply()
        except RequestError:
            self.run(self.store.undo(claim))
            raise
        self.run(self.store.flush())
        return reply

    def req(self, who: str, t: str, **fields) -> dict:
        try:
            return self._req(who, t, fields)
        finally:
            self._collect()

    def _req(self, who: str, t: str, fields: dict) -> dict:
        msg = validate_request({"t": t, "id": self._id(), **fields})
        key = self.key(who)
        m = self.m
        if t == "create":
            m.create_precheck(key, msg, self.now)
            self._check_proof(key, msg)
            h = passwords.hash_password(msg["password"]) if self.real else fake_hash(msg["password"])
            reply = self._applied(key, msg, h, lambda: m.handle(key, msg, self.now, password_hash=h))
        elif t == "join":
            stored = m.join_precheck(key, msg, self.now)
            self._check_proof(key, msg)
            if self.real:
                good = passwords.verify_password(stored, msg["password"])
            else:
                good = stored == fake_hash(msg["password"])
            if good:
                reply = self._applied(key, msg, None, lambda: m.handle(key, msg, self.now, password_ok=good))
            else:
                reply = m.handle(key, msg, self.now, password_ok=good)
        elif t == "admin" and msg["action"] == "password":  # as the glue: owner check, then hashing
            m.admin_precheck(key, msg)
            reply = self._applied(key, msg, None,
                                  lambda: m.handle(key, msg, self.now, password_hash=fake_hash(msg["password"])))
        else:
            reply = self._applied(key, msg, None, lambda: m.handle(key, msg, self.now))
        assert reply["t"] == "ok" and reply["id"] == msg["id"]
        return reply

    def _check_proof(self, key: bytes, msg: dict) -> None:
        proof = self.m.proof_to_check(key, msg, self.now)
        if proof is not None:
            self.m.proof_checked(key, identity_proof.check(key, proof, self.m.identity_bits), self.now)

    def fails(self, who: str, t: str, **fields) -> RequestError:
        with pytest.raises(RequestError) as e:
            self.req(who, t, **fields)
        return e.value

    def admin(self, who: str, network: str, action: str, **fields) -> dict:
        return self.req(who, "admin", network=network, action=action, **fields)

    # ------------------------------------------------------------------ events
    def _collect(self) -> None:
        """Take the events queued by the last call, checking who each goes to against the state
        right after that call (the glue delivers them before the next request is handled)."""
        while self.m.outgoing:
            k, msg = self.m.outgoing.popleft()
            assert k in self.m.online, f"event {msg['t']} queued for an offline node"
            net = msg.get("network")
            name = net["name"] if isinstance(net, dict) else net
            t = msg["t"]
            if t == "punch":
                peer = key_from_text(msg["peer"])
                assert peer in self.store.peers_of(k), "introduction to a node sharing no network"
            elif t == "join_request":
                assert self.store.network(name).owner == k, "join request to a non-owner"
            elif t in ("removed", "join_rejected"):
                assert not self.store.is_member(name, k), f"{t} to a member"
            elif t == "address":           # the node's own virtual IP, once it is stored
                assert self.store.node(k).vip == msg["ip"], "address event with another address"
            else:
                assert self.store.is_member(name, k), f"{t} event about {name} to a non-member"
            if t == "members":   # network types: a node only ever hears of members it may reach
                topo = self.m._topology(self.store.network(name))
                for rec in msg["members"]:
                    assert self.m._sees(topo, k, key_from_text(rec["key"])), "member record of an unreachable peer"
            if t == "chat" and msg["from_key"] is not None:   # nor its key through chat
                topo = self.m._topology(self.store.network(name))
                assert self.m._sees(topo, k, key_from_text(msg["from_key"])), "chat names an unreachable peer's key"
            json.dumps(msg)  # every event is JSON-serialisable
            self._buf[k].append(msg)

    def events(self) -> dict[bytes, list[dict]]:
        """Every event queued since the last call, per node."""
        self._collect()
        out, self._buf = dict(self._buf), defaultdict(list)
        return out

    def ev(self, who: str, t: str | None = None) -> list[dict]:
        """Events for one node since the last call (drains everyone's)."""
        evs = self.events().get(self.key(who), [])
        return [e for e in evs if t is None or e["t"] == t]

    def members(self, network: str) -> set[str]:
        return {n.name for n in self.store.nodes(self.store.members(network)).values()}


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    """Where a World keeps its state: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return str(tmp_path / "overlay.db")


@pytest.fixture
def w(db):
    world = World(db)
    yield world
    world.close()


def _setup(w: World, *names: str, network: str = "lan", **create) -> None:
    """First name creates ``network``, the others join it; everyone online; events drained."""
    for n in names:
        w.hello(n)
    w.req(names[0], "create", network=network, password=PW, **create)
    for n in names[1:]:
        w.req(n, "join", network=network, password=PW)
    w.events()


# ============================================================================ create / join / leave


def test_create_join_leave(w):
    w.hello("alice")
    w.hello("bob")
    r = w.req("alice", "create", network="  LAN ", password=PW)
    assert r["network"] == "lan"
    evs = w.ev("alice")
    assert evs.pop(0) == {"t": "address", "ip": w.store.node(w.key("alice")).vip}   # stored on creating
    assert evs[0]["t"] == "network" and evs[0]["network"]["role"] == "owner"
    assert evs[0]["network"]["owner"] == "alice" and evs[0]["network"]["count"] == 1
    assert evs[1] == {"t": "members", "network": "lan", "members": [
        {"name": "alice", "key": key_to_text(w.key("alice")), "ip": w.store.node(w.key("alice")).vip,
         "online": True, "role": "owner"}]}
    assert w.fails("bob", "create", network="lan", password="x").code == "network_exists"

    r = w.req("bob", "join", network="Lan", password=PW)
    assert r["status"] == "joined" and r["network"] == "lan"
    evs = w.events()
    bob_evs = evs[w.key("bob")]
    assert bob_evs.pop(0) == {"t": "address", "ip": w.store.node(w.key("bob")).vip}
    assert bob_evs[0]["t"] == "network" and bob_evs[0]["network"]["role"] == "member"
    assert {m["name"] for m in bob_evs[1]["members"]} == {"alice", "bob"}
    alice_evs = evs[w.key("alice")]
    assert any(e["t"] == "members" and [m["name"] for m in e["members"]] == ["bob"] for e in alice_evs)
    assert any(e["t"] == "network" and e["network"]["count"] == 2 for e in alice_evs)
    assert w.fails("bob", "join", network="lan", password=PW).code == "already_member"
    assert w.store.networks_of(w.key("bob")) == ["lan"]

    w.req("bob", "leave", network="lan")
    evs = w.events()
    assert evs[w.key("bob")] == [{"t": "removed", "network": "lan", "reason": "left"}]
    assert {"t": "member_left", "network": "lan", "key": key_to_text(w.key("bob")),
            "reason": "left"} in evs[w.key("alice")]
    assert w.members("lan") == {"alice"}
    assert w.fails("bob", "leave", network="lan").code == "not_member"


def test_create_refusals(w):
    w.hello("alice")
    assert w.fails("alice", "create", network="bad_name", password=PW).code == "invalid_name"
    msg = validate_request({"t": "create", "id": 1, "network": "n", "password": PW})
    with pytest.raises(RequestError) as e:
        w.m.handle(w.key("alice"), msg, w.now)   # glue forgot to hash: refused, nothing stored
    assert e.value.code == "internal"
    assert w.store.network("n") is None


def test_create_options(w):
    w.hello("alice")
    w.req("alice", "create", network="n", password=PW, approval=True, max_members=3)
    info = w.ev("alice", "network")[0]["network"]
    assert info["approval"] is True and info["max_members"] == 3 and info["locked"] is False


def test_wrong_password_and_unknown_network(w):
    _setup(w, "alice")
    w.hello("bob")
    assert w.fails("bob", "join", network="lan", password="nope").code == "wrong_password"
    assert w.fails("bob", "join", network="nosuch", password=PW).code == "unknown_network"
    assert w.members("lan") == {"alice"}
    assert w.ev("alice") == []


def test_real_argon2_passwords():
    w = World(real_passwords=True)
    try:
        _setup(w, "alice", "bob")
        assert w.store.network("lan").pw_hash.startswith(b"$argon2id$")
        w.hello("carol")
        assert w.fails("carol", "join", network="lan", password=PW + "x").code == "wrong_password"
        assert w.members("lan") == {"alice", "bob"}
    finally:
        w.store.close()


def test_requests_need_membership(w):
    _setup(w, "alice")
    w.hello("bob")
    for t, extra in (("chat", {"text": "hi"}), ("history", {}), ("members", {}), ("leave", {})):
        assert w.fails("bob", t, network="lan", **extra).code == "not_member"
        assert w.fails("bob", t, network="nosuch", **extra).code == "unknown_network"
    assert w.fails("bob", "admin", network="lan", action="lock").code == "not_member"
    assert w.ev("alice") == []


def test_hello_version_and_ping(w):
    with pytest.raises(RequestError) as e:
        w.hello("alice", version=2)
    assert e.value.code == "version"
    assert w.store.node(w.key("alice")) is None
    r = w.hello("alice")
    assert r["name"] == "alice" and r["key"] == key_to_text(w.key("alice")) and r["networks"] == []
    assert w.req("alice", "ping")["t_server"] == w.now


# ============================================================================ lock / full / approval


def test_locked(w):
    _setup(w, "alice")
    w.hello("bob")
    w.admin("alice", "lan", "lock")
    assert w.ev("alice", "network")[0]["network"]["locked"] is True
    assert w.fails("bob", "join", network="lan", password=PW).code == "locked"
    w.admin("alice", "lan", "unlock")
    assert w.req("bob", "join", network="lan", password=PW)["status"] == "joined"


def test_full_and_limit(w):
    _setup(w, "alice", "bob", max_members=2)
    w.hello("carol")
    assert w.fails("carol", "join", network="lan", password=PW).code == "full"
    w.admin("alice", "lan", "limit", value=0)   # 0 = no limit
    w.req("carol", "join", network="lan", password=PW)
    w.admin("alice", "lan", "limit", value=3)
    w.hello("dave")
    assert w.fails("dave", "join", network="lan", password=PW).code == "full"
    assert w.members("lan") == {"alice", "bob", "carol"}


def test_approval_flow(w):
    _setup(w, "alice", approval=True)
    w.hello("bob")
    w.hello("carol")
    assert w.req("bob", "join", network="lan", password=PW)["status"] == "pending"
    assert w.ev("alice") == [{"t": "join_request", "network": "lan", "name": "bob",
                              "key": key_to_text(w.key("bob"))}]
    assert w.members("lan") == {"alice"}
    assert w.fails("bob", "chat", network="lan", text="hi").code == "not_member"
    w.now += 1
    w.req("carol", "join", network="lan", password=PW)
    w.events()
    assert sorted(p["name"] for p in w.admin("alice", "lan", "pending")["pending"]) == ["bob", "carol"]
    assert w.fails("bob", "admin", network="lan", action="approve", target="bob").code == "not_member"

    w.admin("alice", "lan", "approve", target="Bob")
    evs = w.events()
    assert {"t": "join_approved", "network": "lan"} in evs[w.key("bob")]
    assert any(e["t"] == "members" and len(e["members"]) == 2 for e in evs[w.key("bob")])
    assert w.members("lan") == {"alice", "bob"}

    w.admin("alice", "lan", "reject", target="carol")
    assert w.ev("carol") == [{"t": "join_rejected", "network": "lan"}]
    assert w.members("lan") == {"alice", "bob"}
    assert w.admin("alice", "lan", "pending")["pending"] == []
    assert w.fails("alice", "admin", network="lan", action="approve", target="carol").code == "unknown_member"
    assert w.req("carol", "join", network="lan", password=PW)["status"] == "pending"  # may ask again

    w.admin("alice", "lan", "approval-off")
    w.hello("dave")
    assert w.req("dave", "join", network="lan", password=PW)["status"] == "joined"


def test_pending_listed_in_request_order(w):
    _setup(w, "alice", approval=True)
    names = [f"p{i}" for i in range(8)]
    for n in names:
        w.now += 1
        w.hello(n)
        w.req(n, "join", network="lan", password=PW)
    assert [p["name"] for p in w.admin("alice", "lan", "pending")["pending"]] == names


def test_join_request_replayed_to_owner_on_hello(w):
    _setup(w, "alice", approval=True)
    w.disconnect("alice")
    w.hello("bob")
    w.req("bob", "join", network="lan", password=PW)
    evs = w.events()                              # owner offline: nothing queued for her
    assert list(evs) == [w.key("bob")] and [e["t"] for e in evs[w.key("bob")]] == ["address"]
    w.hello("alice")
    assert [e["name"] for e in w.ev("alice", "join_request")] == ["bob"]


def test_too_many_pending(w):
    _setup(w, "owner", approval=True)
    for i in range(MAX_PENDING):
        w.hello(f"n{i}")
        w.req(f"n{i}", "join", network="lan", password=PW)
    w.hello("late")
    assert w.fails("late", "join", network="lan", password=PW).code == "too_many_pending"
    w.events()


def test_approve_refuses_name_clash(w):
    _setup(w, "alice", approval=True)
    w.hello("b1", name="bob")
    w.hello("b2", name="bob")
    w.req("b1", "join", network="lan", password=PW)
    # a pending request holds its name: a second "bob" is refused at once, not at approval
    with pytest.raises(RequestError) as e:
        w.req("b2", "join", network="lan", password=PW)
    assert e.value.code == "name_taken"
    w.admin("alice", "lan", "approve", target="bob")
    names = [n.name for n in w.store.nodes(w.store.members("lan")).values()]
    assert sorted(names) == ["alice", "bob"]


def test_rename_while_pending_cannot_clash(w):
    _setup(w, "alice", "carol", approval=True)
    w.hello("bob")
    w.req("bob", "join", network="lan", password=PW)
    w.disconnect("bob")
    with pytest.raises(RequestError) as e:  # renaming into a member's name is refused at hello
        w.hello("bob", name="carol")
    assert e.value.code == "name_taken"
    w.admin("alice", "lan", "approve", target="bob")
    names = [n.name for n in w.store.nodes(w.store.members("lan")).values()]
    assert len(names) == len(set(names))


# ============================================================================ kick / ban / transfer / delete


def test_kick_then_rejoin(w):
    _setup(w, "alice", "bob", "carol")
    w.admin("alice", "lan", "kick", target="bob")
    evs = w.events()
    assert evs[w.key("bob")] == [{"t": "removed", "network": "lan", "reason": "kicked"}]
    assert {"t": "member_left", "network": "lan", "key": key_to_text(w.key("bob")),
            "reason": "kicked"} in evs[w.key("carol")]
    assert w.members("lan") == {"alice", "carol"}
    assert w.req("bob", "join", network="lan", password=PW)["status"] == "joined"
    assert w.fails("alice", "admin", network="lan", action="kick", target="alice").code == "bad_request"
    assert w.fails("alice", "admin", network="lan", action="kick", target="zed").code == "unknown_member"
    assert w.fails("bob", "admin", network="lan", action="kick", target="carol").code == "not_owner"


def test_ban_unban(w):
    _setup(w, "alice", "bob")
    w.admin("alice", "lan", "ban", target="bob")
    assert w.ev("bob") == [{"t": "removed", "network": "lan", "reason": "banned"}]
    assert w.fails("bob", "join", network="lan", password=PW).code == "banned"
    assert w.members("lan") == {"alice"}
    assert w.fails("alice", "admin", network="lan", action="unban", target="carol").code == "unknown_member"
    w.admin("alice", "lan", "unban", target="bob")
    assert w.req("bob", "join", network="lan", password=PW)["status"] == "joined"


def test_ban_pending_request(w):
    _setup(w, "alice", approval=True)
    w.hello("eve")
    w.req("eve", "join", network="lan", password=PW)
    w.admin("alice", "lan", "ban", target="eve")
    assert w.admin("alice", "lan", "pending")["pending"] == []
    assert w.fails("eve", "join", network="lan", password=PW).code == "banned"
    assert w.fails("alice", "admin", network="lan", action="kick", target="eve").code == "unknown_member"


def test_ban_former_members_kicked_or_left(w):
    """A kicked member, or one who left, can still be banned by name (the most recent of that name)."""
    _setup(w, "alice", "bob", "dave")
    w.admin("alice", "lan", "kick", target="dave")
    w.req("bob", "leave", network="lan")
    w.events()
    w.admin("alice", "lan", "ban", target="dave")
    w.admin("alice", "lan", "ban", target="bob")
    assert w.ev("dave") == [] and w.ev("bob") == []  # not members: nothing to remove
    assert w.fails("dave", "join", network="lan", password=PW).code == "banned"
    assert w.fails("bob", "join", network="lan", password=PW).code == "banned"
    err = w.fails("alice", "admin", network="lan", action="ban", target="zed")
    assert err.code == "unknown_member" and "no member, pending request or former member named 'zed'" in err.message
    # kick still only applies to members
    assert w.fails("alice", "admin", network="lan", action="kick", target="dave").code == "unknown_member"
    w.admin("alice", "lan", "unban", target="dave")
    assert w.req("dave", "join", network="lan", password=PW)["status"] == "joined"


def test_former_members_survive_a_server_restart(db):
    w = World(db)
    _setup(w, "alice", "dave")
    w.admin("alice", "lan", "kick", target="dave")
    w.close()
    w2 = World(db)
    w2.hello("alice")
    w2.admin("alice", "lan", "ban", target="dave")
    assert w2.store.is_banned("lan", w2.key("dave"))
    w2.close()


def test_owner_changes_the_password(w):
    _setup(w, "alice", "bob")
    w.hello("carol")
    assert w.fails("bob", "admin", network="lan", action="password", password="x").code == "not_owner"
    w.admin("alice", "lan", "password", password="new one")
    assert w.members("lan") == {"alice", "bob"}  # members stay
    assert w.fails("carol", "join", network="lan", password=PW).code == "wrong_password"
    assert w.req("carol", "join", network="lan", password="new one")["status"] == "joined"


def test_rename_is_announced_and_refused_on_a_clash(w):
    _setup(w, "alice", "bob", "carol")
    w.events()
    assert w.req("bob", "rename", name="Bobby")["name"] == "bobby"
    evs = w.events()
    for who in ("alice", "carol", "bob"):
        recs = [m for e in evs[w.key(who)] if e["t"] == "members" for m in e["members"]]
        assert {"name": "bobby", "key": key_to_text(w.key("bob"))}.items() <= recs[-1].items(), who
    assert w.members("lan") == {"alice", "bobby", "carol"}
    assert w.fails("bob", "rename", name="carol").code == "name_taken"
    w.req("alice", "rename", name="alicia")
    owner = [e["network"]["owner"] for e in w.events()[w.key("carol")] if e["t"] == "network"]
    assert owner == ["alicia"]


def test_offline_in_one_network_without_leaving(w):
    _setup(w, "alice", "bob")
    w.req("alice", "create", network="work", password=PW)
    w.req("bob", "join", network="work", password=PW)
    w.events()
    assert w.req("bob", "presence", network="lan", online=False)["online"] is False
    evs = w.events()
    assert [m["online"] for e in evs[w.key("alice")] if e["t"] == "members" and e["network"] == "lan"
            for m in e["members"]] == [False]
    assert not [e for e in evs[w.key("alice")] if e["network"] == "work"]  # still online in work
    assert w.members("lan") == {"alice", "bob"}  # still a member
    w.req("alice", "members", network="lan")  # a fresh snapshot says the same
    recs = {m["name"]: m["online"] for e in w.ev("alice", "members") for m in e["members"]}
    assert recs == {"alice": True, "bob": False}
    w.req("bob", "presence", network="lan", online=True)
    assert [m["online"] for e in w.ev("alice", "members") for m in e["members"]] == [True]
    assert w.fails("bob", "presence", network="nope", online=False).code == "unknown_network"
    # a disconnect forgets it (the node sends it again after hello)
    w.req("bob", "presence", network="lan", online=False)
    w.disconnect("bob")
    w.hello("bob")
    assert bob_online(w, "lan")


def bob_online(w, net):
    w.events()
    w.req("alice", "members", network=net)
    return {m["name"]: m["online"] for e in w.ev("alice", "members") for m in e["members"]}["bob"]


def test_transfer_and_owner_leave_rules(w):
    _setup(w, "alice", "bob")
    assert w.fails("alice", "leave", network="lan").code == "owner_cannot_leave"
    assert w.fails("alice", "admin", network="lan", action="transfer", target="alice").code == "bad_request"
    assert w.fails("alice", "admin", network="lan", action="transfer", target="zed").code == "unknown_member"
    w.admin("alice", "lan", "transfer", target="bob")
    evs = w.events()
    roles = {m["name"]: m["role"] for e in evs[w.key("alice")] if e["t"] == "members" for m in e["members"]}
    assert roles == {"alice": "member", "bob": "owner"}
    assert [e["network"]["role"] for e in evs[w.key("bob")] if e["t"] == "network"][-1] == "owner"
    assert w.store.network("lan").owner == w.key("bob")
    assert w.fails("alice", "admin", network="lan", action="lock").code == "not_owner"
    w.req("alice", "leave", network="lan")           # no longer the owner: may leave
    w.events()
    r = w.req("bob", "leave", network="lan")         # last member and owner: network goes
    assert r["deleted"] is True
    assert w.store.network("lan") is None
    assert w.ev("bob") == [{"t": "removed", "network": "lan", "reason": "left"}]


def test_delete(w):
    _setup(w, "alice", "bob", "carol")
    w.req("bob", "chat", network="lan", text="old secret")
    w.admin("alice", "lan", "ban", target="carol")
    w.events()
    assert w.fails("bob", "admin", network="lan", action="delete").code == "not_owner"
    w.admin("alice", "lan", "delete")
    evs = w.events()
    for who in ("alice", "bob"):
        assert evs[w.key(who)] == [{"t": "removed", "network": "lan", "reason": "deleted"}]
    assert w.store.network("lan") is None
    assert w.store.networks_of(w.key("bob")) == []
    assert w.fails("bob", "join", network="lan", password=PW).code == "unknown_network"
    # a new network with the same name starts clean: no old members, bans or chat
    w.req("carol", "create", network="lan", password="new")
    w.req("carol", "history", network="lan")
    assert w.ev("carol", "chat") == []
    assert w.members("lan") == {"carol"}


# ============================================================================ names


def test_name_clash_on_join(w):
    _setup(w, "alice", "bob")
    w.hello("bob2", name="BOB")
    e = w.fails("bob2", "join", network="lan", password=PW)
    assert e.code == "name_taken"
    assert w.members("lan") == {"alice", "bob"}
    w.req("bob2", "create", network="other", password=PW)   # the name is free elsewhere


def test_name_clash_on_hello_rename(w):
    _setup(w, "alice", "bob")
    w.disconnect("bob")
    with pytest.raises(RequestError) as e:
        w.hello("bob", name="alice")
    assert e.value.code == "name_taken"
    assert w.store.node(w.key("bob")).name == "bob"
    assert w.key("bob") not in w.m.online
    w.events()
    r = w.hello("bob", name="robert")
    assert r["name"] == "robert" and r["networks"] == ["lan"]
    announced = [m for e in w.ev("alice", "members") for m in e["members"]]
    assert [(m["name"], m["online"]) for m in announced] == [("robert", True)]
    assert w.members("lan") == {"alice", "robert"}


def test_invalid_node_name(w):
    with pytest.raises(RequestError) as e:
        w.hello("x", name="no spaces")
    assert e.value.code == "invalid_name"


# ============================================================================ virtual IPs


def _join_all(w: World, n: int) -> dict[int, str]:
    """n0 creates "lan", n1.. join it; their virtual IPs from the "address" events."""
    ips = {}
    for i in range(n):
        assert w.hello(f"n{i}")["ip"] is None                  # a hello gives no address
        if i == 0:
            w.req("n0", "create", network="lan", password=PW)
        else:
            w.req(f"n{i}", "join", network="lan", password=PW)
        ips[i] = w.ev(f"n{i}", "address")[0]["ip"]
    return ips


def test_vip_stable_and_unique(w):
    ips = _join_all(w, 20)
    assert len(set(ips.values())) == 20
    for i in range(20):
        w.disconnect(f"n{i}")
        assert w.hello(f"n{i}", name=f"renamed{i}")["ip"] == ips[i]
    import ipaddress
    pool = ipaddress.IPv4Network(mediator_mod.DEFAULT_POOL)
    assert all(ipaddress.IPv4Address(ip) in pool for ip in ips.values())


def test_vip_pool_exhaustion(db):
    w = World(db, pool="10.9.0.0/29")
    try:
        ips = list(_join_all(w, 6).values())
        assert sorted(ips) == [f"10.9.0.{i}" for i in range(1, 7)]   # hosts only: no .0 or .7
        w.hello("n6")
        assert w.fails("n6", "join", network="lan", password=PW).code == "pool_exhausted"
        assert w.store.node(w.key("n6")) is None
        assert w.hello("n3")["ip"] == ips[3]                          # existing nodes unaffected
    finally:
        w.close()


def test_tiny_pool_refused():
    with pytest.raises(ValueError):
        Mediator(Store(":memory:"), "10.0.0.0/31")


# ============================================================================ rate limiting


def test_failed_joins_limited_per_node_with_sliding_window(w):
    _setup(w, "alice")
    _setup(w, "zed", network="other")
    w.hello("eve")
    t0 = w.now
    for i in range(FAILED_JOINS_PER_NODE):
        w.now = t0 + i * 10
        assert w.fails("eve", "join", network="lan", password="guess").code == "wrong_password"
    w.now = t0 + FAILED_JOIN_WINDOW - 1
    e = w.fails("eve", "join", network="lan", password=PW)        # even the right password
    assert e.code == "rate_limited" and "try again in 1 s" in e.message
    assert w.fails("eve", "join", network="other", password=PW).code == "rate_limited"  # per node
    assert w.members("lan") == {"alice"}
    w.now = t0 + FAILED_JOIN_WINDOW                                 # the first failure slides out
    assert w.fails("eve", "join", network="lan", password="guess").code == "wrong_password"
    assert w.fails("eve", "join", network="lan", password=PW).code == "rate_limited"
    w.now = t0 + FAILED_JOIN_WINDOW + 10.5
    assert w.req("eve", "join", network="lan", password=PW)["status"] == "joined"
    # bounded state: one window per node, at most `limit` timestamps in it
    assert len(w.m._fail_node[w.key("eve")].times) <= FAILED_JOINS_PER_NODE


def test_failed_joins_never_lock_out_the_right_password(w):
    """A flood of wrong passwords from fresh keys on many addresses refuses only those addresses
    (and keys); the owner, a member and a newcomer elsewhere with the right password join at once.
    The network-wide count only delays the wrong answers."""
    _setup(w, "alice", "bob")
    w.req("bob", "leave", network="lan")
    w.hello("alice2", source="192.0.2.1")
    t0 = w.now
    for s in range(4):
        src = f"203.0.113.{s}"
        for i in range(FAILED_JOINS_PER_SOURCE // FAILED_JOINS_PER_NODE):
            a = f"a{s}-{i}"
            w.hello(a, source=src)
            for _ in range(FAILED_JOINS_PER_NODE):
                assert w.fails(a, "join", network="lan", password="guess").code == "wrong_password"
        # the attacker's address is limited now, fresh keys and the right password alike
        w.hello(f"fresh{s}", source=src)
        e = w.fails(f"fresh{s}", "join", network="lan", password="guess")
        assert e.code == "rate_limited" and "from your address" in e.message
        assert w.fails(f"fresh{s}", "join", network="lan", password=PW).code == "rate_limited"
    assert w.m.failure_delay("lan", w.now) == FAILED_JOIN_DELAY > 0
    assert w.m.failure_delay("other", w.now) == 0
    # everyone else with the right password: at once
    assert w.req("bob", "join", network="lan", password=PW)["status"] == "joined"        # a member back
    w.hello("carol", source="192.0.2.7")
    assert w.req("carol", "join", network="lan", password=PW)["status"] == "joined"      # a newcomer
    w.hello("dave")                                                                        # source unknown
    assert w.req("dave", "join", network="lan", password=PW)["status"] == "joined"
    assert w.members("lan") == {"alice", "bob", "carol", "dave"}
    # bounded state: the network's window keeps at most its threshold of timestamps
    assert len(w.m._fail_net["lan"].times) == FAILED_JOINS_PER_NETWORK
    assert all(len(x.times) <= FAILED_JOINS_PER_SOURCE for x in w.m._fail_src.values())
    assert set(w.m._fail_src) == {f"203.0.113.{s}" for s in range(4)}
    w.now = t0 + FAILED_JOIN_WINDOW + 0.01
    assert w.m.failure_delay("lan", w.now) == 0
    assert w.req("fresh0", "join", network="lan", password=PW)["status"] == "joined"


def test_failed_joins_count_an_ipv6_64_as_one_source(w):
    _setup(w, "alice")
    for i in range(FAILED_JOINS_PER_SOURCE // FAILED_JOINS_PER_NODE):
        w.hello(f"a{i}", source=f"2001:db8:1:2::{i + 1:x}")
        for _ in range(FAILED_JOINS_PER_NODE):
            assert w.fails(f"a{i}", "join", network="lan", password="guess").code == "wrong_password"
    w.hello("b", source="2001:db8:1:2:ffff::9")
    assert w.fails("b", "join", network="lan", password=PW).code == "rate_limited"
    w.hello("c", source="2001:db8:1:3::1")
    assert w.req("c", "join", network="lan", password=PW)["status"] == "joined"


def test_refusals_before_password_do_not_count_as_failures(w):
    _setup(w, "alice", "bob")
    for _ in range(3 * FAILED_JOINS_PER_NODE):
        assert w.fails("bob", "join", network="lan", password="x").code == "already_member"
        assert w.fails("bob", "join", network="nosuch", password="x").code == "unknown_network"
    assert w.m._fail_node == {} and w.m._fail_net == {} and w.m._fail_src == {}


def test_too_many_networks(w):
    w.hello("alice")
    for i in range(MAX_NETWORKS_PER_NODE):
        w.req("alice", "create", network=f"n{i}", password=PW)
    assert w.fails("alice", "create", network="one-more", password=PW).code == "too_many_networks"
    w.hello("bob")
    w.req("bob", "create", network="bobs", password=PW)
    assert w.fails("alice", "join", network="bobs", password=PW).code == "too_many_networks"
    w.events()


# ============================================================================ chat


def test_chat_delivery_and_history_capped_per_network(w):
    _setup(w, "alice", "bob")
    _setup(w, "carol", network="other")
    for i in range(CHAT_HISTORY + 50):
        w.now += 1
        r = w.req("alice", "chat", network="lan", text=f"m{i}")
        assert r["chat_id"] > 0
    for i in range(5):
        w.req("carol", "chat", network="other", text=f"o{i}")
    evs = w.events()
    assert [e["text"] for e in evs[w.key("bob")] if e["t"] == "chat"] == [f"m{i}" for i in range(150)]
    assert all(e["t"] != "chat" or e["network"] == "other" for e in evs[w.key("carol")])
    assert len([e for e in evs[w.key("carol")] if e["t"] == "chat"]) == 5

    w.req("bob", "history", network="lan")
    evs = w.events()
    hist = evs[w.key("bob")]
    assert list(evs) == [w.key("bob")]                    # history goes to the requester only
    assert [e["text"] for e in hist] == [f"m{i}" for i in range(50, 150)]
    assert all(e["history"] and e["from"] == "alice" and e["from_key"] == key_to_text(w.key("alice"))
               for e in hist)
    assert [e["id"] for e in hist] == sorted(e["id"] for e in hist)
    w.req("carol", "history", network="other")
    assert [e["text"] for e in w.ev("carol")] == [f"o{i}" for i in range(5)]
    assert w.count("chat") == CHAT_HISTORY + 5


def test_chat_keeps_sender_name_at_send_time(w):
    _setup(w, "alice", "bob")
    w.req("bob", "chat", network="lan", text="hi")
    w.disconnect("bob")
    w.hello("bob", name="bobby")
    w.events()
    w.req("alice", "history", network="lan")
    assert [(e["from"], e["text"]) for e in w.ev("alice")] == [("bob", "hi")]


# ============================================================================ events, presence, isolation


def test_events_only_to_online_members_of_the_network(w):
    _setup(w, "alice", "bob", "carol")
    _setup(w, "xavier", "yolanda", network="other")
    w.disconnect("carol")
    w.events()
    w.req("alice", "chat", network="lan", text="hello lan")
    evs = w.events()
    assert set(evs) == {w.key("alice"), w.key("bob")}       # carol offline, other network isolated
    w.hello("dave")
    w.req("dave", "join", network="lan", password=PW)
    evs = w.events()
    assert set(evs) == {w.key("alice"), w.key("bob"), w.key("dave")}
    w.admin("xavier", "other", "lock")
    evs = w.events()
    assert set(evs) == {w.key("xavier"), w.key("yolanda")}
    assert not w.store.peers_of(w.key("alice")) & {w.key("xavier"), w.key("yolanda")}


def test_presence_on_hello_and_disconnect(w):
    _setup(w, "alice", "bob")
    _setup(w, "carol", network="other")
    w.disconnect("bob")
    evs = w.events()
    assert set(evs) == {w.key("alice")}
    (rec,) = evs[w.key("alice")][0]["members"]
    assert rec["name"] == "bob" and rec["online"] is False
    w.disconnect("bob")                                     # idempotent: no second event
    assert w.events() == {}
    r = w.hello("bob")
    assert r["networks"] == ["lan"]
    evs = w.events()
    assert set(evs) == {w.key("alice"), w.key("bob")}
    (rec,) = evs[w.key("alice")][0]["members"]
    assert rec["name"] == "bob" and rec["online"] is True
    snap = {m["name"]: m["online"] for e in evs[w.key("bob")] if e["t"] == "members" for m in e["members"]}
    assert snap == {"alice": True, "bob": True}
    w.req("alice", "members", network="lan")
    assert [e["t"] for e in w.ev("alice")] == ["network", "members"]


@pytest.mark.slow
def test_member_batches_for_450_members():
    w = World()
    try:
        def long(i):                                     # 32-character names: worst case size
            return f"member-{i:04d}-" + "x" * 20
        w.hello("owner", name=long(0))
        w.req("owner", "create", network="big", password=PW)
        w.disconnect("owner")
        for i in range(1, 450):
            w.hello(f"m{i}", name=long(i))
            w.req(f"m{i}", "join", network="big", password=PW)
            w.disconnect(f"m{i}")                            # keep the test O(n): nobody online
        w.events()
        w.hello("m7", name=long(7))
        evs = w.ev("m7")
        batches = [e for e in evs if e["t"] == "members"]
        assert len(batches) == -(-450 // MEMBER_BATCH)
        names = [m["name"] for e in batches for m in e["members"]]
        assert len(names) == 450 and set(names) == {long(i) for i in range(450)}
        assert len({m["ip"] for e in batches for m in e["members"]}) == 450
        for e in evs:
            size = len(json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode())
            assert size < 64 * 1024 and size <= MAX_PLAINTEXT
        online = {m["name"] for e in batches for m in e["members"] if m["online"]}
        assert online == {long(7)}
    finally:
        w.store.close()


# ============================================================================ introductions (punch)


def test_endpoints_and_punch(w):
    _setup(w, "alice", "bob")
    _setup(w, "carol", network="other")
    a_c = [{"addr": "192.168.1.10:41641", "kind": "lan"}]
    b_c = [{"addr": "10.0.0.7:41641", "kind": "lan"}, {"addr": "203.0.113.5:1000", "kind": "predicted"}]
    w.req("alice", "endpoints", candidates=a_c, nat={"mapping": "eim"})
    w.req("bob", "endpoints", candidates=b_c)
    udp = {w.key("bob"): ("198.51.100.9", 7777)}
    w.m.udp_addr_of = udp.get
    w.req("alice", "punch", peer=key_to_text(w.key("bob")))
    evs = w.events()
    assert set(evs) == {w.key("alice"), w.key("bob")}
    (to_a,) = evs[w.key("alice")]
    (to_b,) = evs[w.key("bob")]
    assert to_a == {"t": "punch", "peer": key_to_text(w.key("bob")), "nat": {},
                    "candidates": [{"addr": "198.51.100.9:7777", "kind": "srflx"}] + b_c}
    assert to_b == {"t": "punch", "peer": key_to_text(w.key("alice")), "nat": {"mapping": "eim"},
                    "candidates": a_c}
    for target, code in (("carol", "not_peer"), ("alice", "not_peer"), ("nobody", "not_peer")):
        assert w.fails("alice", "punch", peer=key_to_text(w.key(target))).code == code
    w.disconnect("bob")
    assert w.key("bob") not in w.m.endpoints                 # forgotten with the session
    assert w.fails("alice", "punch", peer=key_to_text(w.key("bob"))).code == "peer_offline"
    w.events()


def test_punch_refused_after_leaving_shared_network(w):
    _setup(w, "alice", "bob", "carol")
    w.req("bob", "leave", network="lan")
    w.events()
    assert w.fails("alice", "punch", peer=key_to_text(w.key("bob"))).code == "not_peer"
    w.req("alice", "punch", peer=key_to_text(w.key("carol")))
    assert [e["t"] for e in w.ev("carol")] == ["punch"]


# ============================================================================ network types


def _seen(w: World, who: str, network: str = "lan") -> set[str]:
    """Members ``who`` is told about in a fresh snapshot (as after a reconnect)."""
    w.events()
    w.req(who, "members", network=network)
    return {m["name"] for e in w.ev(who, "members") for m in e["members"]}


def test_hub_and_spoke_spokes_see_and_reach_only_hubs(w):
    _setup(w, "alice", "hub", "s1", "s2")
    assert w.fails("s1", "admin", network="lan", action="type", target="hub-and-spoke").code == "not_owner"
    assert w.fails("alice", "admin", network="lan", action="type", target="star").code == "bad_request"
    assert w.fails("alice", "admin", network="lan", action="hub-on", target="nobody").code == "unknown_member"
    w.admin("alice", "lan", "hub-on", target="hub")
    w.events()
    assert w.admin("alice", "lan", "type", target="hub-and-spoke")["type"] == "hub-and-spoke"
    evs = w.events()
    # the spokes lose each other (and the owner, a spoke too) at once; the hub keeps everyone
    gone = {e["key"] for e in evs[w.key("s1")] if e["t"] == "member_left"}
    assert gone == {key_to_text(w.key(n)) for n in ("alice", "s2")}
    assert all(e["reason"] == "out of reach" for e in evs[w.key("s1")] if e["t"] == "member_left")
    assert not [e for e in evs[w.key("hub")] if e["t"] == "member_left"]
    info = [e for e in evs[w.key("s1")] if e["t"] == "network"][-1]["network"]
    assert info["type"] == "hub-and-spoke"
    assert _seen(w, "s1") == {"s1", "hub"}
    assert _seen(w, "hub") == {"alice", "hub", "s1", "s2"}
    kinds = {m["name"]: m["kind"] for e in (w.req("hub", "members", network="lan"), w.ev("hub", "members"))[1]
             for m in e["members"]}
    assert kinds == {"alice": "spoke", "hub": "hub", "s1": "spoke", "s2": "spoke"}
    # introductions and relaying only between pairs that may reach each other
    k = w.key
    assert not w.m.may_reach(k("s1"), k("s2")) and w.m.may_reach(k("s1"), k("hub"))
    assert w.m.reachable_peers(k("s1")) == {k("hub")}
    assert w.fails("s1", "punch", peer=key_to_text(k("s2"))).code == "not_peer"
    w.req("s1", "punch", peer=key_to_text(k("hub")))
    # a spoke coming online is announced to hubs only
    w.disconnect("s2")
    w.events()
    w.hello("s2")
    evs = w.events()
    assert any(e["t"] == "members" for e in evs.get(k("hub"), []))
    assert not any(e["t"] == "members" for e in evs.get(k("s1"), []))
    # a second, mesh network shared by two spokes lets them reach each other there
    w.req("s1", "create", network="side", password=PW)
    w.req("s2", "join", network="side", password=PW)
    assert w.m.may_reach(k("s1"), k("s2"))
    # back to mesh: everyone again
    w.admin("alice", "lan", "type", target="mesh")
    assert _seen(w, "s1") == {"alice", "hub", "s1", "s2"}
    assert all("kind" not in m for e in (w.req("s1", "members", network="lan"), w.ev("s1", "members"))[1]
               for m in e["members"])


def test_chat_reaches_spokes_without_other_spokes_keys(w):
    """Network chat is for every member (as in Hamachi), but a spoke learns only the name of
    another spoke that writes, not its key (nor its address: chat never carries one)."""
    _setup(w, "alice", "hub", "s1", "s2")
    w.admin("alice", "lan", "hub-on", target="hub")
    w.admin("alice", "lan", "type", target="hub-and-spoke")
    w.events()
    w.req("s1", "chat", network="lan", text="hi all")
    evs = w.events()
    got = {n: [e for e in evs.get(w.key(n), []) if e["t"] == "chat"] for n in ("alice", "hub", "s1", "s2")}
    assert all([(e["from"], e["text"]) for e in v] == [("s1", "hi all")] for v in got.values()), got
    s1 = key_to_text(w.key("s1"))
    assert got["hub"][0]["from_key"] == s1 and got["s1"][0]["from_key"] == s1
    assert got["s2"][0]["from_key"] is None and got["alice"][0]["from_key"] is None
    assert all("ip" not in e for v in got.values() for e in v)
    w.req("hub", "chat", network="lan", text="from the hub")
    assert [e["from_key"] for e in w.ev("s2", "chat")] == [key_to_text(w.key("hub"))]
    w.req("s2", "history", network="lan")
    assert [(e["from"], e["from_key"]) for e in w.ev("s2", "chat")] == [("s1", None),
                                                                          ("hub", key_to_text(w.key("hub")))]
    w.req("hub", "history", network="lan")
    assert [e["from_key"] for e in w.ev("hub", "chat")] == [s1, key_to_text(w.key("hub"))]


def test_type_change_work_grows_with_members_times_what_each_sees(w, monkeypatch):
    """A hub turned on or off in a large hub-and-spoke network: members, nodes and routes are read
    once, not once per member, and reachability is not asked pair by pair."""
    names = ["alice", "hub"] + [f"s{i}" for i in range(150)]
    _setup(w, *names)
    w.admin("alice", "lan", "type", target="hub-and-spoke")
    w.events()
    calls = {"members": 0, "sees": 0}
    real_members, real_sees = w.store.members, Mediator._sees

    def members(network):
        calls["members"] += 1
        return real_members(network)

    def sees(topo, a, b):
        calls["sees"] += 1
        return real_sees(topo, a, b)
    monkeypatch.setattr(w.store, "members", members)
    monkeypatch.setattr(Mediator, "_sees", staticmethod(sees))
    w.admin("alice", "lan", "hub-on", target="hub")
    evs = w.events()
    # (this World checks every member record it collects with _sees: one call per record, linear
    # too; pair by pair would be len(names) ** 2 = 23,104)
    assert calls["members"] <= 3 and calls["sees"] < 4 * len(names), calls
    # and the result is the same as before: every spoke sees the hub (and itself), the hub everyone
    assert {m["name"] for e in evs[w.key("s7")] if e["t"] == "members" for m in e["members"]} == {"hub", "s7"}
    assert len({m["name"] for e in evs[w.key("hub")] if e["t"] == "members" for m in e["members"]}) == len(names)
    calls.update(members=0, sees=0)
    w.admin("alice", "lan", "hub-off", target="hub")
    evs = w.events()
    assert calls["members"] <= 3 and calls["sees"] < 4 * len(names), calls
    assert [e["key"] for e in evs[w.key("s7")] if e["t"] == "member_left"] == [key_to_text(w.key("hub"))]
    assert sorted(e["key"] for e in evs[w.key("hub")] if e["t"] == "member_left") == sorted(
        key_to_text(w.key(n)) for n in names if n != "hub")


def test_hub_off_and_hub_leaving_hide_it_again(w):
    _setup(w, "alice", "hub", "s1")
    w.admin("alice", "lan", "type", target="hub-and-spoke")
    w.admin("alice", "lan", "hub-on", target="hub")
    assert _seen(w, "s1") == {"s1", "hub"}
    w.admin("alice", "lan", "hub-off", target="hub")
    assert [e["key"] for e in w.ev("s1", "member_left")] == [key_to_text(w.key("hub"))]
    assert _seen(w, "s1") == {"s1"}
    w.admin("alice", "lan", "hub-on", target="hub")
    w.req("hub", "leave", network="lan")
    assert w.store.hubs("lan") == set()        # a hub that leaves is no hub when it comes back
    w.req("hub", "join", network="lan", password=PW)
    assert _seen(w, "s1") == {"s1"}


def test_gateway_network_members_reach_only_the_gateway(w):
    _setup(w, "alice", "gw", "m1", "m2")
    w.admin("alice", "lan", "type", target="gateway")
    assert _seen(w, "m1") == {"m1", "alice"}            # no gateway named yet: the owner
    w.admin("alice", "lan", "gateway", target="gw")
    assert _seen(w, "m1") == {"m1", "gw"}
    assert _seen(w, "gw") == {"alice", "gw", "m1", "m2"}
    assert _seen(w, "alice") == {"alice", "gw"}
    w.admin("alice", "lan", "kick", target="gw")      # the gateway gone: the owner again
    assert _seen(w, "m1") == {"m1", "alice"}
    assert w.store.network("lan").gateway is None


def test_network_type_survives_store_reopen(db):
    w = World(db)
    _setup(w, "alice", "hub", "s1", "s2")
    w.admin("alice", "lan", "type", target="hub-and-spoke")
    w.admin("alice", "lan", "hub-on", target="hub")
    w.close()
    w2 = World(db)
    try:
        for n in ("alice", "hub", "s1", "s2"):
            w2.hello(n)
        assert w2.store.network("lan").type == "hub-and-spoke"
        assert _seen(w2, "s1") == {"s1", "hub"}
    finally:
        w2.close()


def test_old_database_gains_network_types(tmp_path):
    import sqlite3
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript("CREATE TABLE networks (name TEXT PRIMARY KEY, pw_hash BLOB NOT NULL, owner BLOB NOT NULL, "
                      "locked INTEGER NOT NULL DEFAULT 0, approval INTEGER NOT NULL DEFAULT 0, "
                      "max_members INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);"
                      "INSERT INTO networks VALUES ('lan', x'00', x'01', 0, 0, 0, 1.0);")
    con.close()
    s = Store(db)
    try:
        assert s.network("lan").type == "mesh" and s.network("lan").gateway is None
    finally:
        s.close()


# ============================================================================ unencrypted networks


def test_encryption_off_is_an_owner_setting_in_the_network_info(w):
    _setup(w, "alice", "bob")
    assert w.fails("bob", "admin", network="lan", action="encryption-off").code == "not_owner"
    w.admin("alice", "lan", "encryption-off")
    infos = [e["network"] for e in w.ev("bob", "network")]
    assert infos and infos[-1]["encrypted"] is False
    assert w.store.network("lan").encrypted is False
    w.admin("alice", "lan", "encryption-on")
    assert [e["network"]["encrypted"] for e in w.ev("alice", "network")] == [True]


# ============================================================================ gateway routes


def _routes_seen(w: World, who: str, network: str = "lan") -> dict[str, list[str]]:
    w.events()
    w.req(who, "members", network=network)
    return {m["name"]: m["routes"] for e in w.ev(who, "members") for m in e["members"] if "routes" in m}


def test_gateway_routes_need_the_owners_approval(w):
    _setup(w, "alice", "gw", "bob")
    w.hello("gw", routes=["192.168.1.0/24", "10.1.0.0/16"])
    assert _routes_seen(w, "bob") == {}                      # advertised is not approved
    listing = w.admin("alice", "lan", "routes")["routes"]
    assert listing == [{"name": "gw", "key": key_to_text(w.key("gw")), "online": True,
                        "advertised": ["10.1.0.0/16", "192.168.1.0/24"], "approved": []}]
    assert w.fails("bob", "admin", network="lan", action="routes").code == "not_owner"
    e = w.fails("alice", "admin", network="lan", action="route-approve", target="gw", prefix="172.16.0.0/12")
    assert e.code == "not_advertised" and "it offers 10.1.0.0/16, 192.168.1.0/24" in e.message
    e = w.fails("alice", "admin", network="lan", action="route-approve", target="gw", prefix="192.168.1.7/24")
    assert e.code == "bad_request" and "use 192.168.1.0/24" in e.message
    w.admin("alice", "lan", "route-approve", target="gw", prefix="192.168.1.0/24")
    evs = w.ev("bob", "members")
    assert evs and evs[-1]["members"][0]["routes"] == ["192.168.1.0/24"]
    assert _routes_seen(w, "bob") == {"gw": ["192.168.1.0/24"]}
    assert _routes_seen(w, "gw") == {"gw": ["192.168.1.0/24"]}   # the gateway learns its approved routes
    # approved routes stay handed out while the gateway is offline (peers see it offline)
    w.disconnect("gw")
    assert _routes_seen(w, "bob") == {"gw": ["192.168.1.0/24"]}
    assert w.fails("alice", "admin", network="lan", action="route-approve", target="gw",
                   prefix="10.1.0.0/16").message.endswith("it is offline)")
    w.hello("gw", routes=["192.168.1.0/24"])
    assert _routes_seen(w, "bob") == {"gw": ["192.168.1.0/24"]}
    # the gateway back without advertising it: the members learn at once that it is withdrawn
    w.disconnect("gw")
    w.events()
    w.hello("gw")
    evs = [m for e in w.ev("bob", "members") for m in e["members"] if m["name"] == "gw"]
    assert evs and "routes" not in evs[-1] and evs[-1]["withdrawn"] == ["192.168.1.0/24"], evs
    assert _routes_seen(w, "bob") == {}
    w.hello("gw", routes=["192.168.1.0/24"])
    assert _routes_seen(w, "bob") == {"gw": ["192.168.1.0/24"]}
    w.admin("alice", "lan", "route-remove", target="gw", prefix="192.168.1.0/24")
    assert _routes_seen(w, "bob") == {}
    assert w.fails("alice", "admin", network="lan", action="route-remove", target="gw",
                   prefix="192.168.1.0/24").code == "unknown_route"
    # a route inside the overlay's pool is refused; leaving drops the approvals
    w.hello("gw", routes=["100.64.0.0/16", "192.168.1.0/24"])
    assert w.fails("alice", "admin", network="lan", action="route-approve", target="gw",
                   prefix="100.64.0.0/16").code == "bad_route"
    w.admin("alice", "lan", "route-approve", target="gw", prefix="192.168.1.0/24")
    w.req("gw", "leave", network="lan")
    w.req("gw", "join", network="lan", password=PW)
    assert _routes_seen(w, "bob") == {}


def test_routes_are_validated():
    for bad in (["192.168.1.0"], ["192.168.1.1/24"], ["0.0.0.0/0"], ["127.0.0.0/8"], ["224.0.0.0/4"], [5],
                ["10.0.0.0/8"] * 17, ["nonsense/24"]):
        with pytest.raises(RequestError):
            validate_request({"t": "hello", "id": 1, "name": "x", "version": 1, "routes": bad})
    validate_request({"t": "hello", "id": 1, "name": "x", "version": 1, "routes": ["10.0.0.0/8", "192.168.1.5/32"]})
    with pytest.raises(RequestError):
        validate_request({"t": "admin", "id": 1, "network": "n", "action": "route-approve", "target": "gw"})
    with pytest.raises(RequestError):
        validate_request({"t": "admin", "id": 1, "network": "n", "action": "kick", "target": "gw",
                          "prefix": "10.0.0.0/8"})


# ============================================================================ persistence


def test_state_survives_store_reopen(db):
    w = World(db)
    _setup(w, "alice", "bob", "carol", approval=False)
    _setup(w, "dan", network="other", approval=True)
    w.hello("eve")
    w.req("eve", "join", network="other", password=PW)   # pending
    w.admin("alice", "lan", "ban", target="carol")
    w.admin("alice", "lan", "lock")
    w.req("bob", "chat", network="lan", text="persist me")
    ips = {n: w.store.node(w.key(n)).vip for n in ("alice", "bob", "carol", "dan", "eve")}
    w.close()

    w2 = World(db)
    try:
        assert w2.m.online == set()
        for n in ("alice", "bob", "carol", "dan", "eve"):
            assert w2.hello(n)["ip"] == ips[n]
        assert w2.hello("frank")["ip"] not in ips.values()
        assert w2.members("lan") == {"alice", "bob"}
        assert w2.store.network("lan").locked and w2.store.network("lan").owner == w2.key("alice")
        assert w2.store.network("other").approval
        assert [p["name"] for p in w2.admin("dan", "other", "pending")["pending"]] == ["eve"]
        w2.admin("alice", "lan", "unlock")
        assert w2.fails("carol", "join", network="lan", password=PW).code == "banned"
        assert w2.fails("frank", "join", network="lan", password="bad").code == "wrong_password"
        assert w2.req("frank", "join", network="lan", password=PW)["status"] == "joined"
        w2.events()
        w2.req("alice", "history", network="lan")
        assert [(e["from"], e["text"]) for e in w2.ev("alice")] == [("bob", "persist me")]
    finally:
        w2.close()
