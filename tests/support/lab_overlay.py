"""Real ``overlay`` processes (server and nodes, started through the CLI) inside the NAT lab.

    with natlab.NatLab() as nl:
        nl.add_site("a", "port_restricted"); nl.add_site("b", "full_cone")
        ol = OverlayLab(nl)
        ol.start_server()
        a, b = ol.start_node("a1", "alice"), ol.start_node("b1", "bob")
        ol.pair(a, b, "net1")                      # create + join, both through the CLI
        ol.wait(lambda: a.path_to("bob", direct=True), 20, "alice direct to bob")
        a.ping("bob")                              # `overlay ping --json` lines

The server runs in ``pub`` (198.51.100.10, STUN also on .11); each node runs in its host's
namespace with its own home directory. The local API is a Unix socket in the home, so the CLI and
status polling work from the root namespace (the filesystem is shared), which is simpler and
faster than ``ip netns exec``. Every wait is bounded; ``OverlayLab.dump()`` prints the tail of
every process log for assertion messages; the ``NatLab`` kills every process on close.
"""

from __future__ import annotations

import hashlib
import os
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import natlab
from polling import wait  # also `from lab_overlay import wait`, as the lab tests do
from overlay.node import api

SERVER_IP = natlab.SERVER_IPS[0]
SERVER_ALT_IP = natlab.SERVER_IPS[1]
SERVER_PORT = 7777
SERVER = f"{SERVER_IP}:{SERVER_PORT}"
OVERLAY = [sys.executable, "-m", "overlay"]
PASSWORD = "lab-password"
T = TypeVar("T")


class LabNode:
    """One ``overlay up`` daemon in a lab host."""

    def __init__(self, ol: "OverlayLab", host: str, name: str, home: Path, argv: list[str],
                 env: dict[str, str] | None = None):
        self.ol, self.host, self.name, self.home, self.argv, self.env = ol, host, name, home, argv, env
        self.proc = ol.nl.popen(host, argv, env=env, label=ol.label(f"node-{name}"))

    @property
    def socket_path(self) -> Path:
        return self.home / "overlay.sock"

    def status(self) -> dict:
        """The daemon's status (the same object ``overlay status --json`` prints), straight from
        its API socket; an empty "down" status while it does not answer."""
        try:
            return api.call(self.socket_path, "status", timeout=5)
        except (api.DaemonNotRunning, api.ApiError, OSError, ValueError):
            return {"server": {"connected": False, "state": "down"}, "networks": [], "peers": []}

    def connected(self) -> bool:
        return bool(self.status()["server"]["connected"])

    def peer(self, name: str) -> dict | None:
        for p in self.status().get("peers", []):
            if p["name"] == name:
                return p
        return None

    def path_to(self, name: str, direct: bool | None = None) -> str | None:
        """The status path toward peer ``name`` ("direct IP:PORT", "relay" or None). With
        ``direct`` True/False: the path only if it is (not) direct, else None (for ``wait``)."""
        p = self.peer(name)
        path = p["path"] if p else None
        if path is None or direct is None:
            return path
        return path if path.startswith("direct") == direct else None

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run ``overlay ARGS --home HOME`` (from the root namespace: the API is a Unix socket)."""
        return subprocess.run([*OVERLAY, *args, "--home", str(self.home)], capture_output=True, text=True,
                              timeout=timeout)

    def ok(self, *args: str, timeout: float = 30) -> str:
        r = self.cli(*args, timeout=timeout)
        assert r.returncode == 0, (f"{self.name}: overlay {' '.join(args)} failed ({r.returncode}):\n"
                                   f"{r.stdout}{r.stderr}\n{self.ol.dump()}")
        return r.stdout

    def ping(self, peer: str, count: int = 3, until_direct: bool = False) -> list[dict]:
        """``overlay ping PEER -c COUNT --json``: one dict per probe (``rtt_ms`` None: no answer)."""
        args = ["ping", peer, "-c", str(count), "--json"]
        if not until_direct:
            args.append("--no-until-direct")
        r = self.cli(*args, timeout=10 + 3 * count)
        lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        if not lines or "error" in lines[0]:
            raise AssertionError(f"{self.name}: overlay ping {peer} failed: {r.stdout}{r.stderr}\n{self.ol.dump()}")
        return lines

    def answered(self, peer: str, count: int = 3) -> list[dict]:
        """The answered probes of a ping (asserting at least one)."""
        probes = self.ping(peer, count)
        got = [p for p in probes if p["rtt_ms"] is not None]
        assert got, f"{self.name}: no answer from {peer} in {count} probes: {probes}\n{self.ol.dump()}"
        return got

    def stop(self) -> None:
        """SIGTERM the daemon (SIGKILL if it lingers) and wait for it to exit."""
        self.proc.stop()

    def restart(self) -> "LabNode":
        """Stop the daemon and start a fresh process with the same home and arguments."""
        self.stop()
        self.proc = self.ol.nl.popen(self.host, self.argv, env=self.env, label=self.ol.label(f"node-{self.name}"))
        return self

    def log(self) -> str:
        return self.proc.stdout() + self.proc.stderr()


class OverlayLab:
    """A mediation server and nodes inside a ``NatLab``; homes live in a temporary directory."""

    def __init__(self, nl: natlab.NatLab, log_level: str = "info"):
        self.nl = nl
        self.log_level = log_level
        self.tmp = Path(tempfile.mkdtemp(prefix="ovlab-"))  # short: Unix socket paths are limited
        self.server: natlab.Proc | None = None
        self.servers: list[natlab.Proc] = []  # every server run, for the logs
        self.nodes: list[LabNode] = []
        self._labels: dict[str, int] = {}

    def close(self) -> None:
        """Stop our processes (the lab would too) and remove the homes."""
        for n in self.nodes:
            n.stop()
        for s in self.servers:
            s.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def stop_nodes(self, *nodes: LabNode) -> None:
        """Stop nodes a test is done with (fewer processes competing for the CPU)."""
        for n in nodes:
            n.stop()

    # ------------------------------------------------------------------ processes
    def label(self, base: str) -> str:
        """A unique log label (a restarted process must not overwrite its predecessor's log)."""
        n = self._labels[base] = self._labels.get(base, 0) + 1
        return base if n == 1 else f"{base}-{n}"

    def start_server(self, *extra: str, timeout: float = 15) -> natlab.Proc:
        """Start (or restart, same data directory) the server in ``pub``; wait until it listens."""
        self.server = self.nl.popen(
            "pub", [*OVERLAY, "server", "--listen", f"0.0.0.0:{SERVER_PORT}", "--data", str(self.tmp / "server"),
                    "--stun-alt-ip", SERVER_ALT_IP, "--log-level", self.log_level, *extra],
            label=self.label("server"))
        self.servers.append(self.server)
        self.server.wait_for("listening", timeout=timeout)
        return self.server

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()

    def start_node(self, host: str, name: str, *extra: str, keepalive: float | None = None,
                   server: str = SERVER, env: dict[str, str] | None = None) -> LabNode:
        """Start ``overlay up`` for node ``name`` in lab host ``host`` (not waiting for it; ``env``
        added to its environment)."""
        home = self.tmp / name
        argv = [*OVERLAY, "up", "--server", server, "--name", name, "--home", str(home),
                "--socks", "127.0.0.1:0", "--log-level", self.log_level, *extra]
        if keepalive is not None:
            argv += ["--keepalive", str(keepalive)]
        node = LabNode(self, host, name, home, argv, env)
        self.nodes.append(node)
        return node

    def wait_connected(self, *nodes: LabNode, timeout: float = 30) -> None:
        for n in nodes:
            self.wait(n.connected, timeout, f"{n.name} connected to the server")

    def pair(self, a: LabNode, b: LabNode, network: str, *more: LabNode) -> None:
        """``a`` creates ``network``; ``b`` (and ``more``) join it; all through the CLI."""
        self.wait_connected(a, b, *more)
        a.ok("create", network, "--password", PASSWORD)
        for n in (b, *more):
            n.ok("join", network, "--password", PASSWORD)

    # ------------------------------------------------------------------ waiting and diagnostics
    def wait(self, cond: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
        return wait(cond, timeout, what, interval, on_fail=self.dump)

    def dump(self, tail: int = 6000) -> str:
        """The tail of every process's output, for assertion messages."""
        parts = []
        for proc in self.servers + [n.proc for n in self.nodes]:
            text = proc.stdout() + proc.stderr()
            parts.append(f"----- {proc.name} (rc {proc.poll()})\n{text[-tail:]}")
        # unread bytes queued at the server's sockets (Recv-Q) tell "server stuck" from "network broken"
        ss = self.nl.run("pub", ["ss", "-tuan", f"( sport = :{SERVER_PORT} )"], check=False, timeout=5)
        parts.append(f"----- sockets of the server's port in pub\n{ss.stdout[-tail:]}")
        parts.append(self._diagnose())
        return "\n".join(parts)

    def _diagnose(self) -> str:
        """Where a stalled server is: its Python stacks, and whether the network still reaches it."""
        out = []
        for proc in self.servers:
            pid = proc.popen.pid
            if pid and shutil.which("py-spy"):
                r = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True,
                                   timeout=20)
                out.append(f"----- py-spy dump of the server\n{r.stdout[-4000:]}{r.stderr[-500:]}")
        if self.nodes:
            host = self.nodes[0].host
            r = self.nl.run(host, ["ping", "-c", "1", "-W", "1", "198.51.100.10"], check=False, timeout=5)
            out.append(f"----- ping server from {host}: rc {r.returncode}\n{r.stdout[-300:]}")
        for cmd in (["nft", "list", "ruleset"], ["conntrack", "-S"], ["ip", "-s", "link"]):
            r = self.nl.run("pub", cmd, check=False, timeout=5)
            out.append(f"----- pub: {' '.join(cmd)}\n{(r.stdout + r.stderr)[-3000:]}")
        text = "\n".join(out)
        with open("/tmp/overlay-lab-diagnosis.txt", "a") as f:
            f.write(text + "\n")
        return text


def tcp_listener(nl: natlab.NatLab, host: str) -> socket.socket:
    """A TCP listening socket on 127.0.0.1 inside lab host ``host`` (an app a node shares)."""
    s = nl.socket(host, type=socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    return s


def tcp_connect(nl: natlab.NatLab, host: str, port: int, timeout: float = 10) -> socket.socket:
    """A TCP connection from inside lab host ``host`` to its 127.0.0.1:``port``."""
    s = nl.socket(host, type=socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def serve_once(listener: socket.socket, data: bytes, timeout: float = 60) -> threading.Thread:
    """Accept one connection on ``listener`` (in a thread), send ``data``, close."""
    def run() -> None:
        listener.settimeout(timeout)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(timeout)
            try:
                conn.sendall(data)
            except OSError:
                pass
    t = threading.Thread(target=run, daemon=True, name="serve-once")
    t.start()
    return t


def fetch(conn: socket.socket, on_bytes: Callable[[int], None] = lambda n: None,
          deadline: float = 120) -> tuple[int, str]:
    """Read ``conn`` to EOF within ``deadline`` seconds; (byte count, sha256 hex). ``on_bytes``
    is called with the running count after every read (to act mid-transfer)."""
    h = hashlib.sha256()
    n = 0
    end = time.monotonic() + deadline
    while True:
        conn.settimeout(max(0.1, end - time.monotonic()))
        chunk = conn.recv(1 << 16)
        if not chunk:
            return n, h.hexdigest()
        h.update(chunk)
        n += len(chunk)
        on_bytes(n)
        if time.monotonic() > end:
            raise TimeoutError(f"transfer not finished after {deadline} s ({n} bytes)")


def stream_through_forward(ol: OverlayLab, client: LabNode, server: LabNode, local_port: int,
                           size: int = 1 << 20) -> None:
    """``server`` shares an app that sends ``size`` random bytes; ``client`` forwards
    ``local_port`` to it and reads them to the end; assert they arrived intact."""
    listener = tcp_listener(ol.nl, server.host)
    server.ok("share", str(listener.getsockname()[1]))
    client.ok("forward", str(local_port), f"{server.name}:{listener.getsockname()[1]}")
    data = os.urandom(size)
    serve_once(listener, data)
    with tcp_connect(ol.nl, client.host, local_port) as conn:
        assert fetch(conn, deadline=60) == (len(data), hashlib.sha256(data).hexdigest())


def time_to_direct(ol: OverlayLab, pairs: list[tuple[LabNode, LabNode]], window: float,
                   sites: list[natlab.Site] = ()) -> list[float | None]:
    """One run for every pair at once: fresh start (b, then a, whose arrival makes the server
    introduce them; the NAT mappings of ``sites`` forgotten meanwhile, so conntrack counts show
    this run alone); seconds from "a connected" to both showing a direct path, None if not within
    ``window``."""
    for a, b in pairs:
        a.stop()
        b.stop()
    for site in sites:
        ol.nl.flush_conntrack(site)
    for _, b in pairs:
        b.restart()
    ol.wait_connected(*(b for _, b in pairs), timeout=60)
    for a, _ in pairs:
        a.restart()
    online: list[float | None] = [None] * len(pairs)
    result: list[float | None] = [None] * len(pairs)
    start = time.monotonic()
    while True:
        now = time.monotonic()
        for i, (a, b) in enumerate(pairs):
            if online[i] is None:
                if a.connected():
                    online[i] = now
                continue
            if result[i] is None and a.path_to(b.name, direct=True) and b.path_to(a.name, direct=True):
                result[i] = now - online[i]
        if None not in online and all(r is not None or now - t > window for r, t in zip(result, online)):
            return result
        if now - start > window + 60:
            raise AssertionError(f"nodes did not come online\n{ol.dump()}")
        time.sleep(0.05)


def udp_mappings(site: natlab.Site, toward: str | None = None) -> int:
    """UDP conntrack entries (NAT mappings) on ``site``'s router; only those whose original
    destination is ``toward`` if given. 0 for a site without a router."""
    if site.router is None:
        return 0
    out = site.router.run("conntrack", "-L", "-p", "udp", *(("-d", toward) if toward else ()), check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("udp"))


def birthday(node: LabNode) -> dict:
    """The node's birthday-punching counters (``status`` udp.birthday)."""
    return node.status().get("udp", {}).get("birthday", {})


def sequential(node: LabNode) -> dict:
    """The node's sequential <-> sequential punching counters (``status`` udp.sequential)."""
    return node.status().get("udp", {}).get("sequential", {})
