"""The server's store: SQLite against PostgreSQL, and two instances on one PostgreSQL database.

    python benchmarks/bench_store.py [--nodes N]

Starts a throw-away PostgreSQL cluster (tests/support/postgres.py; Debian's postgresql), then:

- joins: N nodes say hello and join one network, one after the other, through the glue's sequence
  (the store's ``prepare``, the mediator, ``flush``): joins per second and p50 / p99 per join, on
  SQLite and on PostgreSQL;
- load: the time PostgreSQL's store takes to load those N nodes at start;
- across instances: two instances on one database (each a store, a mediator and its
  LISTEN/NOTIFY sync, overlay/server/pg_sync.py); a node toggles online / offline on one, and the
  time until the other instance's mediator has queued the presence change for its own node,
  p50 / p99 over 200 changes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "support"))

import postgres  # noqa: E402

from overlay import crypto  # noqa: E402
from overlay.control.messages import validate_request  # noqa: E402
from overlay.server.mediator import Mediator  # noqa: E402
from overlay.server.pg_sync import InstanceSync  # noqa: E402
from overlay.server.store import Store  # noqa: E402
from overlay.server.store_pg import PgStore  # noqa: E402

PW_HASH = b"fake$pw"


def key(i: int) -> bytes:
    return crypto.blake2s(b"bench:" + str(i).encode())


async def joins(store, n: int) -> list[float]:
    m = Mediator(store, identity_bits=0, new_nodes_per_hour=10 ** 6)
    rid = 0

    async def apply(k, msg, fn, h=None):
        claim = await store.prepare(m, k, msg, time.time(), h)
        reply = fn()
        await store.flush()
        m.outgoing.clear()
        return claim, reply

    def req(t, **f):
        nonlocal rid
        rid += 1
        return validate_request({"t": t, "id": rid, **f})
    owner = key(0)
    msg = req("hello", name="owner", version=1)
    await apply(owner, msg, lambda: m.hello(owner, msg, time.time()))
    msg = req("create", network="big", password="pw")
    await apply(owner, msg, lambda: m.handle(owner, msg, time.time(), password_hash=PW_HASH), PW_HASH)
    times = []
    for i in range(1, n):
        k = key(i)
        t0 = time.perf_counter()
        msg = req("hello", name=f"n{i}", version=1)
        await apply(k, msg, lambda: m.hello(k, msg, time.time()))
        msg = req("join", network="big", password="pw")
        await apply(k, msg, lambda: m.handle(k, msg, time.time(), password_ok=True))
        m.disconnect(k, time.time())
        await store.flush()
        times.append(time.perf_counter() - t0)
    return times


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def report(label: str, times: list[float]) -> None:
    print(f"{label}: {len(times) / sum(times):.0f} joins/s, p50 {statistics.median(times) * 1000:.2f} ms, "
          f"p99 {pct(times, 0.99) * 1000:.2f} ms")


class FakeServer:
    """What InstanceSync needs of the glue: the sessions here, delivery, the relay cache."""

    def __init__(self, mediator, local: set[bytes]):
        self.mediator = mediator
        self.sessions = {k: None for k in local}
        self.on_event = None

    def deliver(self) -> None:
        out = self.mediator.outgoing
        while out:
            k, msg = out.popleft()
            if k in self.sessions and self.on_event:
                self.on_event(k, msg)

    def membership_changed(self, t: str) -> None:
        pass


async def across(url: str, changes: int) -> list[float]:
    a_store, b_store = await PgStore.open(url), await PgStore.open(url)
    a, b = Mediator(a_store, identity_bits=0), Mediator(b_store, identity_bits=0)
    watcher = key(1)                       # online on B, a member: gets presence changes
    sa, sb = FakeServer(a, set()), FakeServer(b, {watcher})
    ia, ib = InstanceSync(sa, a_store), InstanceSync(sb, b_store)
    await ia.start()
    await ib.start()
    got = asyncio.Event()
    sb.on_event = lambda k, msg: got.set() if msg["t"] == "members" else None
    try:
        b.hello(watcher, validate_request({"t": "hello", "id": 1, "name": "n1", "version": 1}), time.time())
        b.outgoing.clear()
        mover = key(2)
        times = []
        for i in range(changes):
            got.clear()
            t0 = time.perf_counter()
            if i % 2 == 0:
                msg = validate_request({"t": "hello", "id": i, "name": "n2", "version": 1})
                a.hello(mover, msg, time.time())
                ia.hello(mover, msg, time.time(), None)
            else:
                a.disconnect(mover, time.time())
                ia.bye(mover, time.time())
            a.outgoing.clear()
            await a_store.flush()
            await asyncio.wait_for(got.wait(), 10)
            times.append(time.perf_counter() - t0)
        return times
    finally:
        await ia.close()
        await ib.close()
        await a_store.aclose()
        await b_store.aclose()


async def main_async(args, cluster) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        s = Store(Path(tmp) / "overlay.db")
        report(f"SQLite, {args.nodes} nodes joining one network", await joins(s, args.nodes))
        s.close()
    url = cluster.create_database()
    p = await PgStore.open(url)
    report(f"PostgreSQL, {args.nodes} nodes joining one network", await joins(p, args.nodes))
    await p.aclose()
    t0 = time.perf_counter()
    p = await PgStore.open(url)
    print(f"PostgreSQL store loads {p.node_count()} nodes and their memberships in "
          f"{(time.perf_counter() - t0) * 1000:.0f} ms")
    await p.aclose()
    times = await across(url, 200)
    print(f"presence change from instance A to instance B's node: p50 {statistics.median(times) * 1000:.2f} ms, "
          f"p99 {pct(times, 0.99) * 1000:.2f} ms (200 changes)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1000)
    args = ap.parse_args()
    bindir = postgres.find_bin()
    if bindir is None:
        print("PostgreSQL's server binaries are not installed (apt-get install postgresql): skipped")
        return
    cluster = postgres.Cluster(bindir).start()
    try:
        asyncio.run(main_async(args, cluster))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
