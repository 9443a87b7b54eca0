"""Real processes started through the CLI: a mediation server and nodes on loopback.

    with Cluster(tmp_path) as c:
        c.start_server()
        a = c.start_node("alice"); b = c.start_node("bob")
        a.ok("create", "net", "--password", "pw")
        c.wait(lambda: b.status()["server"]["connected"])

Every process writes its output to a file under tmp_path (printed on failure by ``dump``) and is
killed at exit. ``wait`` polls a condition with a deadline instead of sleeping blindly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from polling import wait
from overlay.node import api

OVERLAY = [sys.executable, "-m", "overlay"]


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


class Proc:
    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.argv = argv
        self.log = log
        self._f = open(log, "ab")
        self.p = subprocess.Popen(argv, stdout=self._f, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        self._f.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Node:
    def __init__(self, cluster: "Cluster", name: str, home: Path):
        self.cluster = cluster
        self.name = name
        self.home = home
        self.proc: Proc | None = None

    def start(self, *extra: str, server: str | None = None) -> "Node":
        if "--socks" not in extra:
            extra = ("--socks", "127.0.0.1:0", *extra)  # many nodes on one machine: any free port
        self.proc = Proc([*OVERLAY, "up", "--server", server or self.cluster.server_addr, "--name", self.name,
                          "--home", str(self.home), *extra], self.home.parent / f"{self.home.name}.log")
        return self

    def run(self, *args: str, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*OVERLAY, *args, "--home", str(self.home)], capture_output=True, text=True,
                              timeout=timeout, input=input)

    def ok(self, *args: str) -> str:
        r = self.run(*args)
        assert r.returncode == 0, f"overlay {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}"
        return r.stdout

    def fails(self, *args: str) -> str:
        """Run a command that must fail; return its one-line error (asserting no traceback)."""
        r = self.run(*args)
        assert r.returncode != 0, f"overlay {' '.join(args)} unexpectedly succeeded: {r.stdout}"
        assert "Traceback" not in r.stderr + r.stdout, r.stderr
        return (r.stderr + r.stdout).strip()

    def status(self) -> dict:
        """The daemon's status, straight from its API socket (fast enough to poll)."""
        try:
            return api.call(self.home / "overlay.sock", "status", timeout=10)
        except (api.DaemonNotRunning, api.ApiError, OSError):
            return {"server": {"connected": False, "state": "down"}, "networks": [], "peers": []}

    def cli_status(self) -> dict:
        return json.loads(self.ok("status", "--json"))

    def peer(self, name: str) -> dict | None:
        for p in self.status().get("peers", []):
            if p["name"] == name:
                return p
        return None

    def network(self, name: str) -> dict | None:
        for n in self.status().get("networks", []):
            if n["name"] == name:
                return n
        return None

    def connected(self) -> bool:
        return self.status()["server"]["connected"]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc:
            self.proc.kill(sig)


class Cluster:
    def __init__(self, tmp: Path, database: str | None = None):
        self.tmp = Path(tmp)
        self.database = database            # postgresql://... for `overlay server --database`; None: SQLite
        self.port = free_port()
        self.server_addr = f"127.0.0.1:{self.port}"
        self.server: Proc | None = None
        self.nodes: list[Node] = []

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        for n in self.nodes:
            n.kill()
        if self.server:
            self.server.kill()
        if exc[0] is not None:
            self.dump()

    def dump(self) -> None:
        for log in sorted(self.tmp.glob("*.log")):
            print(f"----- {log.name}\n{log.read_text(errors='replace')[-4000:]}")

    def start_server(self, *extra: str, data: str = "server") -> Proc:
        db = ["--database", self.database] if self.database else []
        self.server = Proc([*OVERLAY, "server", "--listen", self.server_addr, "--data", str(self.tmp / data),
                            *db, *extra], self.tmp / "server.log")
        self.wait(lambda: _tcp_open(self.port), what="server listening")
        return self.server

    def stop_server(self) -> None:
        self.server.kill(signal.SIGTERM)

    def start_node(self, name: str, *extra: str, wait: bool = True) -> Node:
        n = Node(self, name, self.tmp / f"home-{name}")
        n.start(*extra)
        self.nodes.append(n)
        if wait:
            self.wait(n.connected, what=f"{name} connected")
        return n

    def wait(self, cond, timeout: float = 20.0, what: str = "condition", interval: float = 0.05):
        return wait(cond, timeout, what, interval)


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
