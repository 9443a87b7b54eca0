"""A missed NOTIFY is repaired: instance A's listening connection is dropped (its backend
terminated, as a network blip or a PostgreSQL restart would), B changes things meanwhile (a node
joins, a ban, a chat line, a node leaves), and once A listens again its nodes have the changes
(overlay/server/pg_repair.py, pg_sync.InstanceSync._repair), with no restart.

The instances are the stand-in glue of test_server_instances.py (two stores on one database).
"""

from __future__ import annotations

import asyncio

from polling import wait_async

from overlay.server import store_pg
from overlay.server.pg_sync import APP_PREFIX
from overlay.server.store_pg import PgStore, visible_in
from tests.unit.server.test_server_instances import Glue, _close, key
from tests.unit.control.test_control_mediator import PW


def _events(g: Glue, who: str, t: str) -> list[dict]:
    return [m for k, m in g.delivered if k == key(who) and m["t"] == t]


async def _drop_listener(g: Glue) -> None:
    """Terminate the backend of ``g``'s listening connection (found by its application_name)."""
    pids = await g.store.pool.fetch("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE application_name = $1", APP_PREFIX + g.sync.id)
    assert len(pids) == 1 and pids[0][0] is True, pids
    await wait_async(lambda: g.sync.conn.is_closed(), 10, "A's listening connection notices it is gone")


async def _liveness_until(g: Glue, cond, what: str, timeout: float = 15.0) -> None:
    """Run the reaper's liveness check until ``cond()`` holds (bounded)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, f"timed out waiting for: {what}"
        g.sync._last_liveness = 0.0
        await g.sync.check_liveness()
        await asyncio.sleep(0.05)


def test_changes_made_while_an_instance_was_not_listening_reach_its_nodes(pg_url):
    async def main():
        a = Glue(await PgStore.open(pg_url))
        await a.sync.start()
        b = Glue(await PgStore.open(pg_url))
        await b.sync.start()
        a.sync.confirm_within = 1.0
        try:
            # bob (on B) owns lan; alice and dave are members on A, erin a member on B
            await b.request("bob", "hello", name="bob", version=1)
            await b.request("bob", "create", network="lan", password=PW)
            for who, g in (("alice", a), ("dave", a), ("erin", b)):
                await g.request(who, "hello", name=who, version=1)
                await wait_async(lambda g=g: g.store.network("lan"), 5, "the network reaches the instance")
                await g.request(who, "join", network="lan", password=PW)
            await wait_async(lambda: a.online("erin") and b.online("dave"), 5, "everyone online everywhere")

            await _drop_listener(a)
            # meanwhile on B: carol joins, dave is banned, bob chats, erin leaves B (offline)
            await b.request("carol", "hello", name="carol", version=1)
            await b.request("carol", "join", network="lan", password=PW)
            await b.request("bob", "admin", network="lan", action="ban", target="dave")
            await b.request("bob", "chat", network="lan", text="while you were away")
            await b.leave_node("erin")
            assert a.store.is_member("lan", key("carol")) is False      # A missed all of it
            assert a.online("erin") is True
            a.delivered.clear()

            await _liveness_until(a, lambda: a.sync.repairs >= 1, "A reloads after listening again")
            assert a.sync.repaired_networks == 1
            # A's model follows the database
            assert a.store.members("lan") == b.store.members("lan")
            assert a.store.is_banned("lan", key("dave"))
            assert a.store.chat_history("lan") == b.store.chat_history("lan")
            assert a.store.node(key("carol")).vip == b.store.node(key("carol")).vip
            # A's nodes were told, as deltas: carol is a member (and online, announced again by B)
            await _liveness_until(a, lambda: a.online("carol") is True, "A sees carol online")
            carol = [m for e in _events(a, "alice", "members") for m in e["members"] if m["name"] == "carol"]
            assert carol and carol[-1]["online"] is True, carol
            assert any(e["key"] == _text("dave") and e["reason"] == "banned"
                       for e in _events(a, "alice", "member_left"))
            assert [e["reason"] for e in _events(a, "dave", "removed")] == ["banned"]
            chat = _events(a, "alice", "chat")
            assert [c["text"] for c in chat] == ["while you were away"]
            assert not _events(a, "dave", "chat")
            # erin left B while A was not listening: not announced again, so offline on A
            await _liveness_until(a, lambda: a.online("erin") is False, "A takes erin offline")
            erin = [m for e in _events(a, "alice", "members") for m in e["members"] if m["name"] == "erin"]
            assert erin and erin[-1]["online"] is False, erin
            # nothing was told twice, and the instances go on in step
            assert len(chat) == 1 and len(carol) <= 2
            await b.request("bob", "chat", network="lan", text="and now")
            await wait_async(lambda: len(_events(a, "alice", "chat")) == 2, 5, "a new chat line reaches A")
        finally:
            await _close(a, b)
    asyncio.run(main())


def test_events_held_during_the_reload_are_applied_once(pg_url, monkeypatch):
    """A change B makes while A reloads: applied after the reload unless the load showed it
    (each NOTIFY carries its transaction id; the load, its snapshot)."""
    async def main():
        a = Glue(await PgStore.open(pg_url))
        await a.sync.start()
        b = Glue(await PgStore.open(pg_url))
        await b.sync.start()
        try:
            await b.request("bob", "hello", name="bob", version=1)
            await b.request("bob", "create", network="lan", password=PW)
            await a.request("alice", "hello", name="alice", version=1)
            await wait_async(lambda: a.store.network("lan"), 5, "lan reaches A")
            await a.request("alice", "join", network="lan", password=PW)
            await _drop_listener(a)
            real = a.store.load_fresh

            local = []
            loading_started, go_on = asyncio.Event(), asyncio.Event()
            real_load_model = store_pg.load_model

            async def held_load_model(model, conn):
                loading_started.set()
                await go_on.wait()
                await real_load_model(model, conn)
                # after the load's snapshot: its NOTIFY is held until the reload is in
                await b.request("bob", "chat", network="lan", text="after the load")
                await wait_async(lambda: any(ev.get("m", {}).get("text") == "after the load"
                                             for _, ev in a.sync._held or ()), 5, "its NOTIFY is held")
            monkeypatch.setattr(store_pg, "load_model", held_load_model)

            async def load_with_changes_around():
                await b.request("bob", "chat", network="lan", text="before the load")
                loading = asyncio.create_task(real())
                await asyncio.wait_for(loading_started.wait(), 5)
                # a request of A's own node meanwhile waits for the new model (not lost with the old)
                local.append(asyncio.create_task(a.request("alice", "chat", network="lan", text="mine")))
                go_on.set()
                got = await loading
                assert not local[0].done()
                return got      # no yield before the caller takes the model (load_fresh's contract)
            a.store.load_fresh = load_with_changes_around
            await _liveness_until(a, lambda: a.sync.repairs >= 1, "A reloads")
            await local[0]
            await wait_async(lambda: len(b.store.chat_history("lan")) == 3, 5, "alice's line reaches B")
            assert [c[3] for c in a.store.chat_history("lan")] == ["before the load", "after the load", "mine"]
            assert a.store.chat_history("lan") == b.store.chat_history("lan")
            texts = [c["text"] for c in _events(a, "alice", "chat")]
            assert sorted(texts) == ["after the load", "before the load", "mine"], texts
            assert a.sync.diverged == 0
        finally:
            await _close(a, b)
    asyncio.run(main())


def test_visible_in_reads_postgresql_snapshots():
    assert visible_in("100:105:", 99)
    assert visible_in("100:105:", 103)
    assert not visible_in("100:105:102,104", 102)
    assert visible_in("100:105:102,104", 103)
    assert not visible_in("100:105:", 105)
    assert not visible_in("100:105:", 200)


def _text(who: str) -> str:
    from overlay.control.messages import key_to_text
    return key_to_text(key(who))
