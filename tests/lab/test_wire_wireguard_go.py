"""Conformance: our Device against Debian's stock wireguard-go, in two network namespaces.

    [ns "wg"]  wireguard-go, TUN wgX 10.100.0.1/24, UDP 10.99.0.1:51820
        | veth
    [ns "py"]  python -m overlay.wire.standalone, UDP 10.99.0.2:51821, inner 10.100.0.2

wireguard-go's side is configured only with ``wg`` and ``ip``; the kernel's ping is the traffic.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from repo_paths import REPO
import lab
from overlay import crypto

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]

WG_UDP, PY_UDP = ("10.99.0.1", 51820), ("10.99.0.2", 51821)
WG_INNER, PY_INNER = "10.100.0.1", "10.100.0.2"


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


class Standalone:
    """Our endpoint in its namespace; JSON lines from its stdout are collected by a thread."""

    def __init__(self, ns: lab.Netns, args: list[str]):
        self.lines: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = ns.popen(sys.executable, "-m", "overlay.wire.standalone", *args,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                pass

    def wait_for(self, event: str, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        for seen in self.seen:
            if seen["event"] == event:
                return seen
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {event!r} from standalone; saw {self.seen}; stderr: {self.stop_stderr()}")
            try:
                item = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(item)
            if item["event"] == event:
                return item

    def stop(self) -> dict:
        """Terminate and return the final counters it prints."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.wait_for("stats", timeout=5)

    def stop_stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self.proc.stderr.read()[-2000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class WgLab:
    def __init__(self) -> None:
        self.wg_ns = lab.Netns("wg")
        self.py_ns = lab.Netns("py")
        self.ifname = f"wgt{uuid.uuid4().hex[:8]}"
        self.wg_private = crypto.generate_private_key()
        self.py_private = crypto.generate_private_key()
        self.wgo: subprocess.Popen | None = None
        self.ours: list[Standalone] = []
        lab.veth(self.wg_ns, "v0", f"{WG_UDP[0]}/24", self.py_ns, "v1", f"{PY_UDP[0]}/24")

    def start_wireguard_go(self, *, endpoint: bool = True, persistent_keepalive: int = 0) -> None:
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="verbose")
        self.wgo = self.wg_ns.popen("wireguard-go", "-f", self.ifname, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=env)
        sock = Path(f"/var/run/wireguard/{self.ifname}.sock")
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert self.wgo.poll() is None, "wireguard-go exited at start"
            assert time.monotonic() < deadline, "wireguard-go did not create its UAPI socket"
            time.sleep(0.05)
        keyfile = Path(f"/tmp/{self.ifname}.key")
        keyfile.write_text(b64(self.wg_private) + "\n")
        keyfile.chmod(0o600)
        try:
            cmd = ["wg", "set", self.ifname, "private-key", str(keyfile), "listen-port", str(WG_UDP[1]),
                   "peer", b64(crypto.public_key(self.py_private)), "allowed-ips", f"{PY_INNER}/32"]
            if endpoint:
                cmd += ["endpoint", f"{PY_UDP[0]}:{PY_UDP[1]}"]
            if persistent_keepalive:
                cmd += ["persistent-keepalive", str(persistent_keepalive)]
            self.wg_ns.run(*cmd)
        finally:
            keyfile.unlink()
        self.wg_ns.run("ip", "addr", "add", f"{WG_INNER}/24", "dev", self.ifname)
        self.wg_ns.run("ip", "link", "set", self.ifname, "up")

    def start_ours(self, *extra: str) -> Standalone:
        ours = Standalone(self.py_ns, [
            "--key", b64(self.py_private), "--peer", b64(crypto.public_key(self.wg_private)),
            "--listen", f"{PY_UDP[0]}:{PY_UDP[1]}", "--endpoint", f"{WG_UDP[0]}:{WG_UDP[1]}",
            "--address", PY_INNER, *extra,
        ])
        self.ours.append(ours)
        ours.wait_for("listening")
        return ours

    def latest_handshake(self) -> int:
        out = self.wg_ns.run("wg", "show", self.ifname, "latest-handshakes").stdout.split()
        return int(out[1]) if len(out) == 2 else 0

    def transfer(self) -> tuple[int, int]:
        out = self.wg_ns.run("wg", "show", self.ifname, "transfer").stdout.split()
        return int(out[1]), int(out[2])

    def ping(self, count: int = 3) -> subprocess.CompletedProcess:
        return self.wg_ns.run("ping", "-c", str(count), "-i", "0.3", "-W", "3", PY_INNER, check=False)

    def close(self) -> None:
        for ours in self.ours:
            ours.kill()
        if self.wgo is not None and self.wgo.poll() is None:
            self.wgo.terminate()
            try:
                self.wgo.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.wgo.kill()
                self.wgo.wait()
        self.wg_ns.close()
        self.py_ns.close()
        Path(f"/var/run/wireguard/{self.ifname}.sock").unlink(missing_ok=True)


@pytest.fixture
def wglab():
    lab.require_lab("wireguard-go", "wg", "ping")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("wireguard-go needs /dev/net/tun")
    setup = WgLab()
    try:
        yield setup
    finally:
        setup.close()


def test_ping_from_wireguard_go_handshake_initiated_by_them(wglab):
    wglab.start_wireguard_go()
    ours = wglab.start_ours()
    result = wglab.ping(3)
    assert result.returncode == 0, result.stdout + result.stderr
    ours.wait_for("handshake-completed")
    assert wglab.latest_handshake() > 0
    stats = ours.stop()
    assert stats["device"]["initiations_rx"] >= 1
    assert stats["device"]["initiations_tx"] == 0
    assert stats["echo_replies_sent"] >= 3
    assert stats["device"]["auth_failed"] == 0 and stats["device"]["malformed"] == 0


def test_handshake_initiated_by_us_then_traffic_both_ways(wglab):
    # wireguard-go has no endpoint for us: only our initiation can teach it where we are.
    wglab.start_wireguard_go(endpoint=False)
    ours = wglab.start_ours("--initiate", "--ping", WG_INNER)
    ours.wait_for("handshake-completed")
    assert wglab.latest_handshake() > 0
    ours.wait_for("echo-reply")  # their kernel answered our ping through their TUN
    result = wglab.ping(3)
    assert result.returncode == 0, result.stdout + result.stderr
    stats = ours.stop()
    assert stats["device"]["initiations_tx"] >= 1
    assert stats["device"]["responses_rx"] >= 1
    assert stats["echo_replies_received"] >= 1
    assert stats["echo_replies_sent"] >= 3


@pytest.mark.parametrize("sender", ["wireguard-go", "ours"])
def test_persistent_keepalives(wglab, sender):
    # Only one side keeps alive: each keepalive (sent or received) resets the other side's timer.
    # The keepalive sender starts last, so its first initiation is not lost (a retry costs 5 s).
    if sender == "ours":
        wglab.start_wireguard_go()
        ours = wglab.start_ours("--persistent-keepalive", "1")
    else:
        ours = wglab.start_ours()
        wglab.start_wireguard_go(persistent_keepalive=1)
    ours.wait_for("handshake-completed")
    rx_before, _ = wglab.transfer()
    # 1 s keepalives, at least 3 asked for in 5.5 s: room for a loaded machine's late timers
    # (in 3.5 s a half-second delay of each was enough to miss one)
    time.sleep(5.5)
    rx_after, _ = wglab.transfer()
    stats = ours.stop()
    assert stats["device"]["auth_failed"] == 0 and stats["device"]["replayed"] == 0
    if sender == "wireguard-go":
        assert stats["device"]["keepalives_rx"] >= 3  # authenticated empty transport messages
    else:
        assert stats["device"]["keepalives_tx"] >= 3
        assert rx_after - rx_before >= 3 * 32  # wireguard-go authenticated our 32-byte keepalives


def test_cookie_reply_understood_by_wireguard_go(wglab):
    # We demand mac2: wireguard-go must decrypt our cookie reply, and its retry (5 s later)
    # must carry a mac2 we accept.
    ours = wglab.start_ours("--under-load")
    wglab.start_wireguard_go(persistent_keepalive=1)
    ours.wait_for("handshake-completed", timeout=20)
    stats = ours.stop()
    assert stats["device"]["cookie_sent"] >= 1
    assert stats["device"]["initiations_rx"] >= 1
    assert wglab.latest_handshake() > 0
