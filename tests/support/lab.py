"""Real-kernel lab helpers: network namespaces, veth pairs, nftables (the NAT recipes are in natlab.py).

Every address used lives inside namespaces the test creates. Tests using this module are marked
``netns`` and skipped, with the reason, when not root or when a tool is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

REQUIRED_TOOLS = ("ip", "nft")


def lab_skip_reason(*tools: str) -> str | None:
    if os.geteuid() != 0:
        return "real-kernel lab needs root (network namespaces); .ci/run runs it as root"
    for t in REQUIRED_TOOLS + tools:
        if t == "tun":
            continue  # a device, checked below
        if shutil.which(t) is None:
            return f"real-kernel lab needs `{t}` (apt-get install it; .ci/run does)"
    if not os.path.exists("/dev/net/tun") and "tun" in tools:
        return "needs /dev/net/tun"
    return _netns_probe()


_probe_result: list[str | None] = []


def _netns_probe() -> str | None:
    """Can this machine really make a namespace with a veth pair? (Root in a container may not.)"""
    if not _probe_result:
        name = f"ovprobe-{uuid.uuid4().hex[:6]}"
        try:
            sh("ip", "netns", "add", name)
            sh("ip", "netns", "exec", name, "ip", "link", "add", "pa", "type", "veth", "peer", "name", "pb")
            _probe_result.append(None)
        except (subprocess.SubprocessError, OSError) as e:
            err = getattr(e, "stderr", "") or str(e)
            _probe_result.append(f"network namespaces are not usable here ({err.strip()[:120]})")
        finally:
            sh("ip", "netns", "del", name, check=False)
    return _probe_result[0]


def require_lab(*tools: str) -> None:
    reason = lab_skip_reason(*tools)
    if reason:
        pytest.skip(reason)


def sh(*args: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, timeout=timeout, capture_output=True, text=True, **kw)


class Netns:
    """A network namespace with a unique name; ``close()`` deletes it (and its veths)."""

    def __init__(self, tag: str):
        self.name = f"ov{tag}-{uuid.uuid4().hex[:6]}"
        sh("ip", "netns", "add", self.name)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.name, *args, check=check, timeout=timeout)

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *args], **kw)

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside this namespace."""
        return ["ip", "netns", "exec", self.name]

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def nft(self, ruleset: str) -> None:
        sh("ip", "netns", "exec", self.name, "nft", "-f", "-", input=ruleset)

    def close(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)


def veth(a: Netns, a_if: str, a_addr: str, b: Netns, b_if: str, b_addr: str) -> None:
    """Connect two namespaces with a veth pair and address both ends (CIDR strings)."""
    sh("ip", "link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if, "netns", b.name)
    a.run("ip", "addr", "add", a_addr, "dev", a_if)
    b.run("ip", "addr", "add", b_addr, "dev", b_if)
    a.run("ip", "link", "set", a_if, "up")
    b.run("ip", "link", "set", b_if, "up")
