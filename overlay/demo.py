"""``overlay demo``: the whole thing on one machine, through the real CLI.

Starts a mediation server and two node daemons (each with its own home) on loopback, creates a
network on one node, joins it from the other, shows both seeing each other, exchanges chat, and
stops everything. Every step is a real ``overlay`` process, exactly as a user would type it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OVERLAY = [sys.executable, "-m", "overlay"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"demo: timed out waiting for {what}")
        time.sleep(0.1)


def run_demo(workdir: Path | None = None, say=print) -> int:
    tmp = Path(workdir or tempfile.mkdtemp(prefix="overlay-demo-"))
    tmp.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    server = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []

    def spawn(args, log):
        f = open(tmp / log, "wb")
        p = subprocess.Popen([*OVERLAY, *args], stdout=f, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    def cli(home: str, *args: str, show: bool = True) -> str:
        cmd = ["overlay", *args, "--home", str(tmp / home)]
        if show:
            say(f"$ {' '.join(cmd)}")
        r = subprocess.run([*OVERLAY, *args, "--home", str(tmp / home)], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"demo: {' '.join(cmd)} failed: {r.stderr.strip()}")
        if show and r.stdout.strip():
            say(r.stdout.rstrip())
        return r.stdout

    def status(home: str) -> dict:
        r = subprocess.run([*OVERLAY, "status", "--json", "--home", str(tmp / home)], capture_output=True,
                           text=True, timeout=60)
        return json.loads(r.stdout) if r.returncode == 0 else {}

    try:
        say(f"== mediation server on {server} (data in {tmp / 'server'})")
        spawn(["server", "--listen", server, "--data", str(tmp / "server")], "server.log")
        for name in ("alice", "bob"):
            say(f"== node {name}: overlay up --server {server} --name {name} --home {tmp / name}")
            spawn(["up", "--server", server, "--name", name, "--home", str(tmp / name)], f"{name}.log")
        for name in ("alice", "bob"):
            _wait(lambda: status(name).get("server", {}).get("connected"), f"{name} to connect")
        cli("alice", "create", "demo", "--password", "demo-password")
        cli("bob", "join", "demo", "--password", "demo-password")
        _wait(lambda: any(p["name"] == "alice" and p["online"] for p in status("bob").get("peers", [])),
              "bob to see alice online")
        cli("bob", "status")
        cli("alice", "chat", "demo", "hello bob, this is alice")
        cli("bob", "chat", "demo", "--history")
        peers = status("alice")["peers"]
        say(f"== alice sees {', '.join(p['name'] + ' at ' + p['ip'] for p in peers)}")
        say("== demo finished: server and nodes stop now (logs in %s)" % tmp)
        return 0
    finally:
        for p in procs[1:]:
            p.terminate()
        for p in procs[1:]:
            p.wait(10)
        if procs:
            procs[0].terminate()
            procs[0].wait(10)
