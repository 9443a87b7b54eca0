"""``overlay demo``: the whole thing on one machine, through the real CLI.

Starts a mediation server and two node daemons (each with its own home) on loopback, creates a
network on one node, joins it from the other, serves a file on bob and shares its port, and
fetches it from alice through alice's SOCKS5 proxy by bob's name, over the encrypted tunnel
and bob's userspace TCP/IP stack. Every step is a real ``overlay`` process, as a user would type it.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import socket
import threading
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


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _fetch_via_socks(proxy: str, host: str, port: int, path: str) -> str:
    """An HTTP GET through a SOCKS5 proxy with remote name resolution (what curl --socks5-hostname does)."""
    from python_socks.sync import Proxy
    s = Proxy.from_url(f"socks5://{proxy}", rdns=True).connect(dest_host=host, dest_port=port, timeout=20)
    with s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n")[0]:
        raise RuntimeError(f"demo: fetch through the proxy failed: {head[:200]!r}")
    return body.decode()


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
        socks = {}
        for name in ("alice", "bob"):
            socks[name] = f"127.0.0.1:{_free_port()}"
            say(f"== node {name}: overlay up --server {server} --name {name} --socks {socks[name]} "
                f"--home {tmp / name}")
            spawn(["up", "--server", server, "--name", name, "--socks", socks[name], "--home", str(tmp / name)],
                  f"{name}.log")
        for name in ("alice", "bob"):
            _wait(lambda: status(name).get("server", {}).get("connected"), f"{name} to connect")
        cli("alice", "create", "demo", "--password", "demo-password")
        cli("bob", "join", "demo", "--password", "demo-password")
        _wait(lambda: any(p["name"] == "alice" and p["online"] for p in status("bob").get("peers", [])),
              "bob to see alice online")
        cli("alice", "chat", "demo", "hello bob, this is alice")
        cli("bob", "chat", "demo", "--history")

        # bob serves a file on 127.0.0.1 only, and shares that port with the overlay
        www = tmp / "www"
        www.mkdir(exist_ok=True)
        (www / "hello.txt").write_text("hello from bob, fetched through the overlay\n")
        handler = functools.partial(_QuietHandler, directory=str(www))
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        web_port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        say(f"== bob serves {www} on 127.0.0.1:{web_port}")
        cli("bob", "share", str(web_port))
        url = f"http://bob:{web_port}/hello.txt"
        curl = shutil.which("curl")
        say(f"== alice fetches {url} through her SOCKS5 proxy, by bob's name")
        if curl:
            say(f"$ curl -sS --socks5-hostname {socks['alice']} {url}")
            r = subprocess.run([curl, "-sS", "--max-time", "30", "--socks5-hostname", socks["alice"], url],
                               capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"demo: curl through the proxy failed: {r.stderr.strip()}")
            body = r.stdout
        else:
            say("(curl not installed: the same request with python-socks)")
            body = _fetch_via_socks(socks["alice"], "bob", web_port, "/hello.txt")
        say(body.rstrip())
        httpd.shutdown()
        cli("alice", "ping", "bob", "-c", "3")
        cli("alice", "status")
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
