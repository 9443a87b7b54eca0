#!/usr/bin/env python3
"""The control plane's ceiling: many simulated nodes against one `overlay server` process.

    python benchmarks/bench_scale.py                       # quick: 1,000 nodes in networks of 100
    python benchmarks/bench_scale.py --nodes 10000 --members 100,1000 --workers 2
    python benchmarks/bench_scale.py --nodes 100,1000,10000 --members 10,100,1000   # the table
    python benchmarks/bench_scale.py --database postgresql --instances 2   # two instances, one PostgreSQL

What runs:

- one real `overlay server` process on 127.0.0.1 (a temporary data directory; `--identity-work 0`
  and a high `--new-nodes-per-hour`, since the default proof of work costs a new identity ~0.2 s
  of its own CPU and the per-address budget of new identities would refuse the joiners);
- ``--workers`` client processes, each running its share of the simulated nodes as real
  ``overlay.node.control_client.ControlClient`` objects (Noise XX over TCP, hello, a ping every
  15 s, the node's reconnect back-off), each node bound to one of many loopback source addresses
  (127.1.x.y, ``--per-address`` nodes each: the server caps connections per address).

The nodes and their memberships (networks of ``--members``, mesh) are written to the server's
database before it starts, except ``--joins`` nodes which join over the protocol (password checked
with Argon2id, as always): that gives the join throughput. Then, printed per size:

- server RSS idle and with every node connected and synchronised: memory per node;
- server CPU (utime + stime from /proc) while the nodes connect, per second while idle (pings),
  and during the restart; the client processes' CPU beside it (what the simulation costs);
- presence: a node goes offline (then online) in its network (`presence` request); the time from
  the request until each other member has the change: p50 / p99 over every (change, member);
- punch: a node asks the server to introduce a peer; the time until the peer has the introduction;
- restart: the server is stopped (SIGTERM) and started again on the same data; the time until
  every node has said hello again, and until the last snapshot or delta has arrived (quiet 1 s).

With ``--database postgresql`` the server is one or more (``--instances``) `overlay server`
processes on a throw-away PostgreSQL cluster, the nodes split across them (``InstancesBench``).

Times across processes are CLOCK_MONOTONIC, which Linux shares between processes.
"""

from __future__ import annotations

import argparse
import atexit
import asyncio
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overlay import crypto  # noqa: E402
from overlay.control import resync  # noqa: E402
from overlay.control.messages import key_to_text  # noqa: E402

OVERLAY = [sys.executable, "-m", "overlay"]
PASSWORD = "bench-password"
QUIET = 1.0          # no event for this long: the fan-out is done


def priv_of(seed: int, i: int) -> bytes:
    k = bytearray(hashlib.sha256(f"bench-scale {seed} {i}".encode()).digest())
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    return bytes(k)


def source_of(i: int, per_address: int) -> str:
    a = i // per_address
    return f"127.1.{a // 250}.{a % 250 + 1}"


def net_of(i: int, members: int) -> str:
    return f"net{i // members}"


def is_joiner(i: int, nodes: int, members: int, joins: int) -> bool:
    """The nodes that join over the protocol: the last slots of the networks, spread over them."""
    nets = max(1, nodes // members)
    slot, net = i % members, i // members
    rank = (members - 1 - slot) * nets + net    # 0 for the last slot of net0, 1 for that of net1 ...
    return rank < joins


# ---------------------------------------------------------------------------------------- workers
def server_list_of(cfg: dict, i: int) -> str:
    """Node ``i``'s servers, as `overlay up --server A,B` takes them: with several instances
    (``cfg["ports"]``) its own first (``i`` mod their number: half of every network on each of
    two), then the others, which it moves to when its own goes away."""
    ports = cfg.get("ports") or [cfg["port"]]
    k = i % len(ports)
    return ",".join(f"127.0.0.1:{p}" for p in ports[k:] + ports[:k])


class _NoHome:
    """The node's home only pins the server key (trust on first use); the simulation has none."""
    path = Path("/nonexistent")

    def check_server_key(self, server: str, key: bytes, *servers, **kw) -> bool:
        return False


class Worker:
    """One client process: its share of the nodes, commands on stdin, answers on stdout."""

    def __init__(self, cfg: dict):
        from overlay.node.control_client import ControlClient

        class BenchClient(ControlClient):
            src = "127.0.0.1"

            async def _open(self):
                return await asyncio.wait_for(asyncio.open_connection(self.host, self.port,
                                                                      local_addr=(self.src, 0)), 10.0)
        self.cfg = cfg
        self.clients: dict[int, ControlClient] = {}
        self.tasks: list[asyncio.Task] = []
        self.last_event = 0.0
        self.events = 0
        self.types: Counter = Counter()     # events received, by type
        self.watches: dict[str, tuple] = {}        # key text -> (kind, online, times, network, who)
        self.started: set[int] = set()
        # what the nodes hold of their networks, for the hello's ``sync`` (overlay/control/resync.py):
        # one view per network shared by the worker's nodes (their records are the same; the
        # simulated networks' members never change name or address), not one per node
        self.views: dict[str, dict[str, str]] = {}
        self.digests: dict[str, tuple[str, dict[str, int]]] = {}
        for i in cfg["indices"]:
            c = BenchClient(_NoHome(), server_list_of(cfg, i), f"n{i}", priv_of(cfg["seed"], i))
            c.src = source_of(i, cfg["per_address"])
            if cfg.get("sync", True):
                c.hello_sync = lambda net=net_of(i, cfg["members"]): self.sync(net)
            c.on_event = lambda ev, c=c: self.on_event(c, ev)
            c.index = i
            self.clients[i] = c

    def digest(self, net: str) -> tuple[str, dict[str, int]]:
        hit = self.digests.get(net)
        if hit is None:
            view = self.views.get(net, {})
            hit = self.digests[net] = (resync.digest(view.items()), {k: i for i, k in enumerate(sorted(view))})
        return hit

    def sync(self, net: str) -> dict:
        return {net: self.digest(net)[0]} if self.views.get(net) else {}

    def on_event(self, client, ev: dict) -> None:
        now = time.monotonic()
        self.last_event = now
        self.events += 1
        t = ev.get("t")
        self.types[t] += 1
        if t == "members":
            view = self.views.setdefault(ev["network"], {})
            for m in ev["members"]:
                if m["key"] not in view:
                    view[m["key"]] = resync.record_line(m)
                    self.digests.pop(ev["network"], None)
        elif t == "member_left":
            if self.views.get(ev["network"], {}).pop(ev["key"], None) is not None:
                self.digests.pop(ev["network"], None)
        if not self.watches:
            return
        if t == "presence":
            order = self.digest(ev["network"])[1]
            bits = None
            for key, w in self.watches.items():
                if w[0] == "presence" and w[3] == ev["network"] and key in order:
                    bits = bits or resync.decode_bits(ev["online"], len(order))
                    if bits is not None and bits[order[key]] == w[1]:
                        w[2].append(now)
        elif t == "members":
            for m in ev["members"]:
                w = self.watches.get(m["key"])
                if w is not None and w[0] == "presence" and w[1] == m["online"] and w[3] == ev["network"]:
                    w[2].append(now)
                    w[4].append(client.index)
        elif t == "punch":
            w = self.watches.get(ev["peer"])
            if w is not None and w[0] == "punch":
                w[2].append(now)
                w[4].append(client.index)

    def connected(self, indices) -> int:
        return sum(1 for i in indices if self.clients[i].connected)

    async def command(self, cmd: dict) -> dict:
        op = cmd["op"]
        if op == "start":
            which = [i for i in self.clients if cmd["joiners"] == (i in self.cfg["joiners"])]
            for i in which:
                self.tasks.append(asyncio.create_task(self.clients[i].run()))
                self.started.add(i)
            return {"started": len(which)}
        if op == "status":
            ru = resource.getrusage(resource.RUSAGE_SELF)
            errors = Counter((c.last_error or c.state)[:70] for i, c in self.clients.items()
                             if not c.connected and i in self.started)
            return {"connected": self.connected(self.clients), "total": len(self.clients),
                    "errors": errors.most_common(3),
                    "connects": sum(c.connects for c in self.clients.values()),
                    "on": Counter(c.server for c in self.clients.values() if c.connected),
                    "last_event": self.last_event, "events": self.events, "types": self.types,
                    "cpu": ru.ru_utime + ru.ru_stime,
                    "now": time.monotonic()}
        if op == "join":
            joiners = [self.clients[i] for i in self.cfg["joiners"]]
            members = self.cfg["members"]

            async def join(i, c):
                t0 = time.monotonic()
                await c.request({"t": "join", "network": net_of(i, members), "password": PASSWORD}, 600)
                return t0, time.monotonic()
            res = await asyncio.gather(*(join(i, c) for i, c in zip(self.cfg["joiners"], joiners)),
                                       return_exceptions=True)
            ok = [r for r in res if isinstance(r, tuple)]
            errors = sorted({repr(r) for r in res if not isinstance(r, tuple)})[:3]
            return {"times": ok, "errors": errors}
        if op == "watch":
            self.watches[cmd["key"]] = (cmd["kind"], cmd.get("online"), [], cmd.get("network"), [])
            return {}
        if op == "act":
            c = self.clients[cmd["node"]]
            t0 = time.monotonic()
            c.post(cmd["msg"])
            return {"t0": t0}
        if op == "collect":
            w = self.watches.get(cmd["key"])
            times = list(w[2]) if w else []
            who = list(w[4]) if w else []
            if cmd.get("clear"):
                self.watches.pop(cmd["key"], None)
            return {"times": times, "who": who}
        if op == "stop":
            for t in self.tasks:
                t.cancel()
            return {}
        raise ValueError(op)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            cmd = json.loads(line)
            try:
                reply = await self.command(cmd)
            except Exception as e:      # the orchestrator prints it
                reply = {"error": repr(e)}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
            if cmd["op"] == "stop":
                return


def worker_main(cfg_path: str) -> None:
    raise_nofile()
    cfg = json.loads(Path(cfg_path).read_text())
    cfg["joiners"] = set(cfg["joiners"])
    import logging
    logging.basicConfig(level=logging.CRITICAL)
    asyncio.run(Worker(cfg).serve())


# ---------------------------------------------------------------------------------------- orchestrator
def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


class WorkerProc:
    def __init__(self, proc):
        self.proc = proc
        self.lock = asyncio.Lock()

    async def call(self, **cmd) -> dict:
        async with self.lock:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            await self.proc.stdin.drain()
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("a worker died")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker: {reply['error']}")
        return reply


def seed_db(data: Path, args, pubs: list[bytes]) -> None:
    """Nodes and memberships straight into the server's database (all but the joiners)."""
    from overlay.control import passwords
    from overlay.server.store import Store
    data.mkdir(parents=True, mode=0o700)
    store = Store(data / "overlay.db")
    h = passwords.hash_password(PASSWORD)
    now = time.time()
    store.db.execute("BEGIN")   # one transaction: the Store commits per call otherwise
    for i, k in enumerate(pubs):
        if not is_joiner(i, args.n, args.m, args.j):
            store.db.execute("INSERT INTO nodes VALUES (?,?,?,?,?)",
                             (k, f"n{i}", f"100.{64 + (i + 16) // 65536}.{(i + 16) // 256 % 256}.{(i + 16) % 256}",
                              now, now))
    for first in range(0, args.n, args.m):
        store.db.execute("INSERT INTO networks (name, pw_hash, owner, approval, max_members, created) "
                         "VALUES (?,?,?,?,?,?)", (net_of(first, args.m), h, pubs[first], 0, 0, now))
        for i in range(first, min(args.n, first + args.m)):
            if not is_joiner(i, args.n, args.m, args.j):
                store.db.execute("INSERT INTO members VALUES (?,?,?)", (net_of(i, args.m), pubs[i], now + i * 1e-6))
    store.db.execute("COMMIT")
    store.close()
    for f in data.iterdir():
        f.chmod(0o600)     # as the server keeps its database


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="overlay-scale-"))
        self.server: subprocess.Popen | None = None
        self.workers: list[WorkerProc] = []
        self.owner: dict[int, WorkerProc] = {}
        self.rows: dict[str, object] = {}
        self._next_report = 0.0

    def start_server(self) -> None:
        a = self.args
        log = open(self.tmp / "server.log", "ab")
        self.server = subprocess.Popen(
            [*OVERLAY, "server", "--listen", f"127.0.0.1:{self.port}", "--data", str(self.tmp / "data"),
             "--identity-work", "0", "--new-nodes-per-hour", "1000000",
             "--max-connections", str(a.n + 1000), "--log-level", "warning"] + a.server_args,
            stdout=log, stderr=subprocess.STDOUT)

    def wait_listening(self, timeout: float = 30.0) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.server.poll() is not None:
                raise RuntimeError(f"server exited: see {self.tmp / 'server.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return time.monotonic()
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    async def all_status(self) -> list[dict]:
        return await asyncio.gather(*(w.call(op="status") for w in self.workers))

    async def wait_connected(self, want: int, since_connects: int | None, timeout: float) -> float:
        """Until ``want`` nodes are connected (and, with ``since_connects``, have connected again
        since then); returns the time it happened."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = await self.all_status()
            n = sum(s["connected"] for s in st)
            done = n >= want
            if since_connects is not None:
                done = done and sum(s["connects"] for s in st) >= since_connects + want
            if done:
                return time.monotonic()
            if self.args.verbose and time.monotonic() >= self._next_report:
                self._next_report = time.monotonic() + 10
                errs = Counter()
                for s in st:
                    errs.update({e: c for e, c in s["errors"]})
                print(f"  {n} connected; not yet: {errs.most_common(3)}", flush=True)
            await asyncio.sleep(0.05)
        st = await self.all_status()
        raise RuntimeError(f"only {sum(s['connected'] for s in st)} of {want} nodes connected after {timeout:.0f} s")

    async def wait_quiet(self, timeout: float) -> float:
        """Until no worker got an event for QUIET s; returns the last event's time."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = await self.all_status()
            last = max(s["last_event"] for s in st)
            if time.monotonic() - last >= QUIET:
                return last
            await asyncio.sleep(0.2)
        return float("nan")

    async def client_cpu(self) -> float:
        return sum(s["cpu"] for s in await self.all_status())

    async def probe(self, kind: str, subject: int, actor: int, msg: dict, expect: int, online=None,
                    network=None) -> list[float]:
        key = key_to_text(crypto.public_key(priv_of(self.args.seed, subject)))
        await asyncio.gather(*(w.call(op="watch", key=key, kind=kind, online=online, network=network)
                               for w in self.workers))
        t0 = (await self.owner[actor].call(op="act", node=actor, msg=msg))["t0"]
        end = time.monotonic() + 30
        times: list[float] = []
        while time.monotonic() < end:
            got = await asyncio.gather(*(w.call(op="collect", key=key) for w in self.workers))
            times = [t for g in got for t in g["times"]]
            if len(times) >= expect:
                break
            await asyncio.sleep(0.01)
        await asyncio.gather(*(w.call(op="collect", key=key, clear=True) for w in self.workers))
        if len(times) < expect:
            print(f"  ! {kind}: {len(times)} of {expect} recipients within 30 s")
        return [t - t0 for t in times]

    async def run(self) -> dict:
        a = self.args
        pubs = [crypto.public_key(priv_of(a.seed, i)) for i in range(a.n)]
        seed_db(self.tmp / "data", a, pubs)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.start_server()
        self.wait_listening()
        if a.verbose:
            print(f"  server pid {self.server.pid}", flush=True)
        await asyncio.sleep(1.0)
        pid = self.server.pid
        rss_idle = rss_mib(pid)
        joiners = [i for i in range(a.n) if is_joiner(i, a.n, a.m, a.j)]
        shares = [list(range(w, a.n, a.workers)) for w in range(a.workers)]
        for share in shares:
            cfg = {"port": self.port, "seed": a.seed, "indices": share, "per_address": a.per_address,
                   "members": a.m, "joiners": [i for i in share if i in set(joiners)], "sync": not a.no_sync}
            cfg_path = self.tmp / f"worker{len(self.workers)}.json"
            cfg_path.write_text(json.dumps(cfg))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--worker", str(cfg_path),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=1 << 24)
            wp = WorkerProc(proc)
            self.workers.append(wp)
            for i in share:
                self.owner[i] = wp
        r = self.rows
        seeded = a.n - len(joiners)

        # 1. every seeded node connects at once
        cpu0, ccpu0, t0 = proc_cpu(pid), await self.client_cpu(), time.monotonic()
        await asyncio.gather(*(w.call(op="start", joiners=False) for w in self.workers))
        t_conn = await self.wait_connected(seeded, None, 600)
        t_quiet = await self.wait_quiet(600)
        r["connect_all_s"] = t_conn - t0
        r["connect_synced_s"] = max(t_quiet, t_conn) - t0
        r["connect_server_cpu_s"] = proc_cpu(pid) - cpu0
        r["connect_client_cpu_s"] = await self.client_cpu() - ccpu0

        # 2. joins over the protocol (Argon2id per join)
        if joiners:
            cpu0, t0 = proc_cpu(pid), time.monotonic()
            await asyncio.gather(*(w.call(op="start", joiners=True) for w in self.workers))
            await self.wait_connected(a.n, None, 600)
            got = await asyncio.gather(*(w.call(op="join") for w in self.workers))
            times = [t for g in got for t in g["times"]]
            errors = [e for g in got for e in g["errors"]]
            if errors:
                print(f"  ! joins refused: {errors}")
            if times:
                span = max(e for _, e in times) - min(s for s, _ in times)
                r["joins"] = len(times)
                r["joins_per_s"] = len(times) / span if span > 0 else float("nan")
                r["join_p50_ms"] = pct([(e - s) * 1000 for s, e in times], 50)
            await self.wait_quiet(600)
            r["join_server_cpu_s"] = proc_cpu(pid) - cpu0

        await asyncio.sleep(2.0)
        r["rss_idle_mib"] = rss_idle
        r["rss_loaded_mib"] = rss_mib(pid)
        r["kib_per_node"] = (r["rss_loaded_mib"] - rss_idle) * 1024 / a.n

        # 3. idle: pings only
        cpu0, ccpu0, t0 = proc_cpu(pid), await self.client_cpu(), time.monotonic()
        await asyncio.sleep(a.idle)
        dt = time.monotonic() - t0
        r["idle_server_cpu_pct"] = (proc_cpu(pid) - cpu0) / dt * 100
        r["idle_client_cpu_pct"] = (await self.client_cpu() - ccpu0) / dt * 100

        # 4. presence and punch
        rng = random.Random(a.seed)
        pres, pres_last, punch = [], [], []
        cpu0 = proc_cpu(pid)
        for _ in range(a.samples):
            s = rng.randrange(a.n)
            net = net_of(s, a.m)
            size = len(range(s - s % a.m, min(a.n, s - s % a.m + a.m)))
            for online in (False, True):
                lat = await self.probe("presence", s, s, {"t": "presence", "network": net, "online": online},
                                       size - 1, online=online, network=net)
                pres += lat
                if lat:
                    pres_last.append(max(lat))
            peer = s - s % a.m + rng.randrange(size)
            if peer == s:
                peer = s - s % a.m + (s % a.m + 1) % size
            punch += await self.probe("punch", s, s, {"t": "punch", "peer": key_to_text(pubs[peer])}, 1)
        r["probe_server_cpu_s"] = proc_cpu(pid) - cpu0
        r["presence_p50_ms"] = pct(pres, 50) * 1000
        r["presence_p99_ms"] = pct(pres, 99) * 1000
        r["presence_last_p50_ms"] = pct(pres_last, 50) * 1000
        r["punch_p50_ms"] = pct(punch, 50) * 1000
        r["punch_p99_ms"] = pct(punch, 99) * 1000

        # 5. restart
        st = await self.all_status()
        connects = sum(s["connects"] for s in st)
        types0 = sum((Counter(s["types"]) for s in st), Counter())
        ccpu0 = await self.client_cpu()
        t_stop = time.monotonic()
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(60)
        self.start_server()
        t_up = self.wait_listening(120)
        pid = self.server.pid
        if a.verbose:
            print(f"  server pid {pid} (restarted)", flush=True)
        t_back = await self.wait_connected(a.n, connects, 600)
        t_quiet = await self.wait_quiet(600)
        r["restart_down_s"] = t_up - t_stop
        r["restart_all_back_s"] = t_back - t_stop
        r["restart_synced_s"] = max(t_quiet, t_back) - t_stop
        r["restart_server_cpu_s"] = proc_cpu(pid)
        r["restart_rss_mib"] = rss_mib(pid)
        r["restart_client_cpu_s"] = await self.client_cpu() - ccpu0
        st = await self.all_status()
        r["restart_events"] = dict(sum((Counter(s["types"]) for s in st), Counter()) - types0)
        return r

    async def close(self) -> None:
        for w in self.workers:
            try:
                await asyncio.wait_for(w.call(op="stop"), 10)
            except Exception:
                pass
            w.proc.kill()
            await w.proc.wait()
        if self.server and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(30)
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def show(n: int, m: int, r: dict) -> None:
    def f(k, fmt="{:.1f}"):
        v = r.get(k)
        return "-" if v is None else fmt.format(v)
    print(f"{n} nodes in networks of {m}:")
    print(f"  server RSS {f('rss_idle_mib')} MiB idle -> {f('rss_loaded_mib')} MiB: {f('kib_per_node')} KiB per node")
    print(f"  connect all at once: {f('connect_all_s', '{:.2f}')} s to hello, {f('connect_synced_s', '{:.2f}')} s "
          f"until every snapshot arrived; server CPU {f('connect_server_cpu_s')} s, clients {f('connect_client_cpu_s')} s")
    if "joins" in r:
        print(f"  joins over the protocol: {r['joins']} at {f('joins_per_s')} joins/s (one join {f('join_p50_ms', '{:.0f}')} "
              f"ms p50 under that load); server CPU {f('join_server_cpu_s')} s")
    print(f"  idle (pings every 15 s): server {f('idle_server_cpu_pct')} % of a core, clients {f('idle_client_cpu_pct')} %")
    print(f"  presence change -> each member: p50 {f('presence_p50_ms')} ms, p99 {f('presence_p99_ms')} ms "
          f"(the last member of the network: p50 {f('presence_last_p50_ms')} ms)")
    print(f"  punch introduction -> the other side: p50 {f('punch_p50_ms')} ms, p99 {f('punch_p99_ms')} ms")
    print(f"  restart: down {f('restart_down_s', '{:.2f}')} s; all back {f('restart_all_back_s', '{:.2f}')} s after the "
          f"stop, all synchronised {f('restart_synced_s', '{:.2f}')} s; server CPU {f('restart_server_cpu_s')} s, "
          f"clients {f('restart_client_cpu_s')} s; server RSS then {f('restart_rss_mib')} MiB", flush=True)
    print(f"  restart: events the nodes got: {r.get('restart_events')}", flush=True)


# ---------------------------------------------------------------------------------------- instances on PostgreSQL
class InstancesBench(Bench):
    """``--database postgresql [--instances K]``: K `overlay server` processes on one database of
    a throw-away PostgreSQL cluster (tests/support/postgres.py: Debian's binaries, a temporary data
    directory, a Unix socket, fsync off), sharing one server key (one deployment), node ``i`` on
    instance ``i`` mod K with the others as its next servers (``--server A,B``). The seeded SQLite
    database is moved in with ``overlay server --migrate-from``. Same phases as ``Bench.run``;
    with two instances or more, instead of a restart, instance 0 is stopped (SIGTERM) and its
    nodes move to the others: the time until all are back, and the survivors' CPU."""

    def __init__(self, args, cluster):
        super().__init__(args)
        self.cluster = cluster
        self.url = cluster.create_database()
        self.k = args.instances
        self.servers: list[subprocess.Popen | None] = [None] * self.k
        self.ports: list[int] = []

    def start_instance(self, j: int) -> None:
        a = self.args
        log = open(self.tmp / f"server{j}.log", "ab")
        self.servers[j] = subprocess.Popen(
            [*OVERLAY, "server", "--listen", f"127.0.0.1:{self.ports[j]}", "--data", str(self.tmp / f"data{j}"),
             "--database", self.url, "--identity-work", "0", "--new-nodes-per-hour", "1000000",
             "--max-connections", str(a.n + 1000), "--log-level", "warning"] + a.server_args,
            stdout=log, stderr=subprocess.STDOUT)

    def wait_instance(self, j: int, timeout: float = 60.0) -> float:
        self.server, self.port = self.servers[j], self.ports[j]
        return self.wait_listening(timeout)

    def pids(self) -> list[int]:
        return [s.pid for s in self.servers if s is not None and s.poll() is None]

    def cpu(self) -> list[float]:
        """Each instance's CPU seconds, then PostgreSQL's (the postmaster, its backends, reaped ones)."""
        return [proc_cpu(s.pid) if s is not None and s.poll() is None else float("nan")
                for s in self.servers] + [self.pg_cpu()]

    def pg_cpu(self) -> float:
        try:
            master = int((self.cluster.data / "postmaster.pid").read_text().split()[0])
            total = 0.0
            for d in Path("/proc").iterdir():
                if d.name.isdigit():
                    try:
                        stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                    except OSError:
                        continue
                    if int(stat[1]) == master:
                        total += proc_cpu(int(d.name))
            fields = Path(f"/proc/{master}/stat").read_text().rsplit(")", 1)[1].split()
            return total + sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return float("nan")

    async def probe_split(self, kind: str, subject: int, msg: dict, expect: int, **kw) -> tuple[list, list]:
        """``Bench.probe``, its latencies split: recipients on the subject's instance, on another."""
        key = key_to_text(crypto.public_key(priv_of(self.args.seed, subject)))
        await asyncio.gather(*(w.call(op="watch", key=key, kind=kind, **kw) for w in self.workers))
        t0 = (await self.owner[subject].call(op="act", node=subject, msg=msg))["t0"]
        end = time.monotonic() + 30
        got: list[dict] = []
        while time.monotonic() < end:
            got = await asyncio.gather(*(w.call(op="collect", key=key) for w in self.workers))
            if sum(len(g["times"]) for g in got) >= expect:
                break
            await asyncio.sleep(0.01)
        await asyncio.gather(*(w.call(op="collect", key=key, clear=True) for w in self.workers))
        pairs = [(t - t0, i) for g in got for t, i in zip(g["times"], g["who"])]
        if len(pairs) < expect:
            print(f"  ! {kind}: {len(pairs)} of {expect} recipients within 30 s")
        same = [t for t, i in pairs if i % self.k == subject % self.k]
        return same, [t for t, i in pairs if i % self.k != subject % self.k]

    async def wait_moved(self, moved: int, connects: int, timeout: float) -> float:
        """Until every node is connected and ``moved`` connections were made since ``connects``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = await self.all_status()
            if sum(s["connected"] for s in st) >= self.args.n and sum(s["connects"] for s in st) >= connects + moved:
                return time.monotonic()
            await asyncio.sleep(0.05)
        st = await self.all_status()
        raise RuntimeError(f"only {sum(s['connected'] for s in st)} of {self.args.n} nodes back after {timeout:.0f} s")

    async def run(self) -> dict:
        a, k, r = self.args, self.k, self.rows
        pubs = [crypto.public_key(priv_of(a.seed, i)) for i in range(a.n)]
        seed_db(self.tmp / "seed", a, pubs)
        t0 = time.monotonic()
        for j in range(k):
            (self.tmp / f"data{j}").mkdir(mode=0o700)
        mig = subprocess.run([*OVERLAY, "server", "--data", str(self.tmp / "data0"), "--database", self.url,
                              "--migrate-from", f"sqlite:{self.tmp / 'seed' / 'overlay.db'}"],
                             capture_output=True, text=True, timeout=600)
        if mig.returncode != 0:
            raise RuntimeError(f"--migrate-from failed: {mig.stderr.strip()[-300:]}")
        r["migrate_s"] = time.monotonic() - t0
        for _ in range(k):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                self.ports.append(sock.getsockname()[1])
        for j in range(k):
            if j > 0:   # one deployment: one server key
                shutil.copy2(self.tmp / "data0" / "server.key", self.tmp / f"data{j}" / "server.key")
            self.start_instance(j)
            self.wait_instance(j)
        if a.verbose:
            print(f"  server pids {self.pids()}", flush=True)
        await asyncio.sleep(1.0)
        rss_idle = [rss_mib(p) for p in self.pids()]
        joiners = [i for i in range(a.n) if is_joiner(i, a.n, a.m, a.j)]
        for share in [list(range(w, a.n, a.workers)) for w in range(a.workers)]:
            cfg = {"ports": self.ports, "seed": a.seed, "indices": share, "per_address": a.per_address,
                   "members": a.m, "joiners": [i for i in share if i in set(joiners)]}
            cfg_path = self.tmp / f"worker{len(self.workers)}.json"
            cfg_path.write_text(json.dumps(cfg))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--worker", str(cfg_path),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=1 << 24)
            wp = WorkerProc(proc)
            self.workers.append(wp)
            for i in share:
                self.owner[i] = wp
        seeded = a.n - len(joiners)

        def spent(before: list[float]) -> list[float]:
            return [x - y for x, y in zip(self.cpu(), before)]

        # 1. every seeded node connects at once, each to its own instance
        cpu0, ccpu0, t0 = self.cpu(), await self.client_cpu(), time.monotonic()
        await asyncio.gather(*(w.call(op="start", joiners=False) for w in self.workers))
        t_conn = await self.wait_connected(seeded, None, 600)
        t_quiet = await self.wait_quiet(600)
        r["connect_all_s"] = t_conn - t0
        r["connect_synced_s"] = max(t_quiet, t_conn) - t0
        r["connect_server_cpu_s"] = spent(cpu0)
        r["connect_client_cpu_s"] = await self.client_cpu() - ccpu0

        # 2. joins over the protocol, spread over the instances
        if joiners:
            cpu0, t0 = self.cpu(), time.monotonic()
            await asyncio.gather(*(w.call(op="start", joiners=True) for w in self.workers))
            await self.wait_connected(a.n, None, 600)
            got = await asyncio.gather(*(w.call(op="join") for w in self.workers))
            times = [t for g in got for t in g["times"]]
            errors = [e for g in got for e in g["errors"]]
            if errors:
                print(f"  ! joins refused: {errors}")
            if times:
                span = max(e for _, e in times) - min(s for s, _ in times)
                r["joins"] = len(times)
                r["joins_per_s"] = len(times) / span if span > 0 else float("nan")
                r["join_p50_ms"] = pct([(e - s) * 1000 for s, e in times], 50)
            await self.wait_quiet(600)
            r["join_server_cpu_s"] = spent(cpu0)

        await asyncio.sleep(2.0)
        r["rss_idle_mib"] = rss_idle
        r["rss_loaded_mib"] = [rss_mib(p) for p in self.pids()]
        # each instance holds the whole model and its share of the connections
        r["kib_per_node"] = [(x - y) * 1024 / a.n for x, y in zip(r["rss_loaded_mib"], rss_idle)]

        # 3. idle: pings only
        cpu0, ccpu0, t0 = self.cpu(), await self.client_cpu(), time.monotonic()
        await asyncio.sleep(a.idle)
        dt = time.monotonic() - t0
        r["idle_server_cpu_pct"] = [x / dt * 100 for x in spent(cpu0)]
        r["idle_client_cpu_pct"] = (await self.client_cpu() - ccpu0) / dt * 100

        # 4. presence and punch; with several instances the punch peer is on another instance
        rng = random.Random(a.seed)
        pres_same, pres_other, punch_same, punch_other = [], [], [], []
        cpu0 = self.cpu()
        for _ in range(a.samples):
            s = rng.randrange(a.n)
            net = net_of(s, a.m)
            first = s - s % a.m
            size = len(range(first, min(a.n, first + a.m)))
            for online in (False, True):
                same, other = await self.probe_split("presence", s, {"t": "presence", "network": net,
                                                                     "online": online},
                                                     size - 1, online=online, network=net)
                pres_same += same
                pres_other += other
            peers = [p for p in range(first, first + size) if p != s and (k == 1 or p % k != s % k)]
            peer = rng.choice(peers)
            same, other = await self.probe_split("punch", s, {"t": "punch", "peer": key_to_text(pubs[peer])}, 1)
            punch_same += same
            punch_other += other
        r["probe_server_cpu_s"] = spent(cpu0)
        pres, punch = pres_same + pres_other, punch_same + punch_other
        r["presence_p50_ms"], r["presence_p99_ms"] = pct(pres, 50) * 1000, pct(pres, 99) * 1000
        if k > 1:
            r["presence_same_p50_ms"], r["presence_same_p99_ms"] = pct(pres_same, 50) * 1000, pct(pres_same, 99) * 1000
            r["presence_other_p50_ms"] = pct(pres_other, 50) * 1000
            r["presence_other_p99_ms"] = pct(pres_other, 99) * 1000
        r["punch_p50_ms"], r["punch_p99_ms"] = pct(punch, 50) * 1000, pct(punch, 99) * 1000

        # 5. one instance goes: with others, its nodes move to them; alone, it is restarted
        st = await self.all_status()
        connects = sum(s["connects"] for s in st)
        on = Counter()
        for s in st:
            on.update(s["on"])
        # a node whose attempts timed out during the storms moved on to another instance already
        r["nodes_on"] = [on.get(f"127.0.0.1:{p}", 0) for p in self.ports]
        cpu0, ccpu0 = self.cpu(), await self.client_cpu()
        t_stop = time.monotonic()
        gone = self.servers[0]
        assert gone is not None
        gone.send_signal(signal.SIGTERM)
        gone.wait(60)
        if k > 1:
            moved = r["nodes_on"][0]
            t_back = await self.wait_moved(moved, connects, 600)
            t_quiet = await self.wait_quiet(600)
            after = self.cpu()
            r["failover_moved"] = moved
            r["failover_all_back_s"] = t_back - t_stop
            r["failover_synced_s"] = max(t_quiet, t_back) - t_stop
            r["failover_server_cpu_s"] = [x - y for x, y in zip(after[1:], cpu0[1:])]   # survivors, PostgreSQL
            r["failover_rss_mib"] = [rss_mib(p) for p in self.pids()]
        else:
            self.start_instance(0)
            t_up = self.wait_instance(0, 120)
            t_back = await self.wait_connected(a.n, connects, 600)
            t_quiet = await self.wait_quiet(600)
            r["restart_down_s"] = t_up - t_stop
            r["restart_all_back_s"] = t_back - t_stop
            r["restart_synced_s"] = max(t_quiet, t_back) - t_stop
            after = self.cpu()     # the new process's CPU since it started; PostgreSQL's since the stop
            r["restart_server_cpu_s"] = after[:k] + [after[k] - cpu0[k]]
        r["restart_client_cpu_s"] = await self.client_cpu() - ccpu0
        return r

    async def close(self) -> None:
        for s in self.servers:
            if s is not None and s.poll() is None:
                s.terminate()
                s.wait(30)
        self.server = None
        await super().close()


def show_instances(n: int, m: int, k: int, r: dict) -> None:
    def f(key, fmt="{:.1f}"):
        v = r.get(key)
        if v is None:
            return "-"
        return " / ".join(fmt.format(x) for x in v) if isinstance(v, list) else fmt.format(v)
    print(f"{n} nodes in networks of {m}, {k} instance{'s' * (k > 1)} on PostgreSQL "
          f"(moved in by --migrate-from in {f('migrate_s')} s); figures per instance separated by /, "
          f"PostgreSQL's CPU last:")
    print(f"  server RSS {f('rss_idle_mib')} MiB idle -> {f('rss_loaded_mib')} MiB: {f('kib_per_node')} KiB per node "
          f"(of all {n})")
    print(f"  connect all at once: {f('connect_all_s', '{:.2f}')} s to hello, {f('connect_synced_s', '{:.2f}')} s "
          f"until every snapshot arrived; server CPU {f('connect_server_cpu_s')} s, clients {f('connect_client_cpu_s')} s")
    if "joins" in r:
        print(f"  joins over the protocol: {r['joins']} at {f('joins_per_s')} joins/s (one join {f('join_p50_ms', '{:.0f}')} "
              f"ms p50 under that load); server CPU {f('join_server_cpu_s')} s")
    print(f"  idle (pings every 15 s): server {f('idle_server_cpu_pct')} % of a core, clients {f('idle_client_cpu_pct')} %")
    print(f"  presence change -> each member: p50 {f('presence_p50_ms')} ms, p99 {f('presence_p99_ms')} ms", end="")
    if k > 1:
        print(f" (same instance {f('presence_same_p50_ms')} / {f('presence_same_p99_ms')} ms, "
              f"the other {f('presence_other_p50_ms')} / {f('presence_other_p99_ms')} ms)", end="")
    print()
    print(f"  punch introduction -> the other side{' (on the other instance)' * (k > 1)}: "
          f"p50 {f('punch_p50_ms')} ms, p99 {f('punch_p99_ms')} ms")
    if k > 1:
        print(f"  nodes on each instance before the stop: {f('nodes_on', '{:d}')}")
        print(f"  instance 0 stopped: its {r['failover_moved']} nodes all back on the others "
              f"{f('failover_all_back_s', '{:.2f}')} s after the stop, all synchronised "
              f"{f('failover_synced_s', '{:.2f}')} s; survivors' CPU {f('failover_server_cpu_s')} s, "
              f"RSS {f('failover_rss_mib')} MiB; clients {f('restart_client_cpu_s')} s", flush=True)
    else:
        print(f"  restart: down {f('restart_down_s', '{:.2f}')} s; all back {f('restart_all_back_s', '{:.2f}')} s after "
              f"the stop, all synchronised {f('restart_synced_s', '{:.2f}')} s; server CPU {f('restart_server_cpu_s')} s, "
              f"clients {f('restart_client_cpu_s')} s", flush=True)


def start_postgres():
    """A throw-away cluster for ``--database postgresql`` (stopped by the caller)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
    import postgres
    bindir = postgres.find_bin()
    if bindir is None:
        raise SystemExit("--database postgresql needs Debian's postgresql (apt-get install postgresql)")
    return postgres.Cluster(bindir).start()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="1000", help="comma-separated node counts (1000)")
    ap.add_argument("--members", default="100", help="comma-separated network sizes (100)")
    ap.add_argument("--workers", type=int, default=2, help="client processes (2)")
    ap.add_argument("--joins", type=int, default=100, help="nodes per size that join over the protocol (100)")
    ap.add_argument("--samples", type=int, default=20, help="presence and punch samples (20)")
    ap.add_argument("--idle", type=float, default=15.0, help="seconds of idle CPU measurement (15)")
    ap.add_argument("--per-address", type=int, default=50, help="nodes per loopback source address (50)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-sync", action="store_true",
                    help="nodes send no member digests in their hello (as nodes from before resynchronisation)")
    ap.add_argument("--verbose", action="store_true", help="print the server's pid (for py-spy) as it starts")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (server log, database)")
    ap.add_argument("--json", action="store_true", help="print every figure as JSON too")
    ap.add_argument("--server-arg", action="append", default=[], dest="server_args",
                    help="extra `overlay server` argument (repeatable)")
    ap.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                    help="the servers' store: SQLite in the data directory (default), or a throw-away "
                         "PostgreSQL cluster (Debian's postgresql)")
    ap.add_argument("--instances", type=int, default=1,
                    help="server instances on that PostgreSQL database, the nodes split across them (1)")
    args = ap.parse_args()
    if args.instances > 1 and args.database != "postgresql":
        ap.error("--instances needs --database postgresql")
    cluster = start_postgres() if args.database == "postgresql" else None
    if cluster is not None:
        atexit.register(cluster.stop)
    hard = raise_nofile()
    print(f"RLIMIT_NOFILE {hard}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; "
          f"{args.workers} client processes", flush=True)
    results = []
    for n in [int(x) for x in args.nodes.split(",")]:
        for m in [int(x) for x in args.members.split(",")]:
            if m > n:
                continue
            args.n, args.m, args.j = n, m, min(args.joins, n // 2)
            if n + 1000 > hard:
                print(f"{n} nodes: the descriptor limit {hard} is too low; skipped")
                continue
            bench = Bench(args) if cluster is None else InstancesBench(args, cluster)
            try:
                r = asyncio.run(_run(bench))
            except RuntimeError as e:
                print(f"{n} nodes in networks of {m}: failed: {e}", flush=True)
                continue
            if cluster is None:
                show(n, m, r)
            else:
                show_instances(n, m, args.instances, r)
            results.append({"nodes": n, "members": m, "instances": args.instances, "database": args.database, **r})
    if args.json:
        print(json.dumps(results, indent=1))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


async def _run(bench: Bench) -> dict:
    try:
        return await bench.run()
    finally:
        await bench.close()


if __name__ == "__main__":
    main()
