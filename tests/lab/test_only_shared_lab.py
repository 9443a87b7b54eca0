"""``--only-shared`` refuses at once: a TUN node's inbound filter answers a connection to a port it
does not share with a reset, so the caller's proxy reports "guard does not share port N" right
away instead of waiting for its 10 s connect timeout. Real daemons in the NAT lab, real curl.
"""

from __future__ import annotations

import os
import socket

import pytest

import lab
import natlab
from lab_overlay import OverlayLab

pytestmark = pytest.mark.netns

SHARED, UNSHARED = 7101, 7102


@pytest.fixture(scope="module")
def world():
    lab.require_lab("nft", "ip", "curl")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    ok = False
    try:
        nl.add_site("us", "port_restricted")
        nl.add_site("os", "full_cone")
        ol.start_server()
        user = ol.start_node("us1", "caller", "--http-proxy", "127.0.0.1:0")
        guard = ol.start_node("os1", "guard", "--tun", "--only-shared")
        ol.pair(user, guard, "lan")
        for n in (user, guard):
            ol.wait(lambda n=n: any(p["online"] for p in n.status()["peers"]), 20, f"{n.name} sees its peer")
        ok = True
        yield nl, ol, user, guard
    finally:
        if not ok:
            print(ol.dump())
        ol.close()
        nl.close(failed=not ok)


def test_unshared_port_of_an_only_shared_tun_node_is_refused_at_once(world):
    nl, ol, user, guard = world
    listeners = []
    for port in (SHARED, UNSHARED):   # something listens on both: only the filter makes a difference
        s = nl.socket(guard.host, type=socket.SOCK_STREAM)
        s.bind(("0.0.0.0", port))
        s.listen(4)
        listeners.append(s)
    try:
        guard.ok("share", str(SHARED))
        proxies = {p["kind"]: p["address"] for p in user.status()["proxies"]}
        # --max-time 8 stays below the caller's 10 s connect timeout: only an answer gets through
        curl = ["curl", "-sS", "--max-time", "8", "-o", "/dev/null", "-w", "%{http_code}"]
        # the shared port connects (our listener never answers: curl's own time-out, exit 28)
        r = nl.run(user.host, [*curl, "--max-time", "3", "--socks5-hostname", proxies["socks5"],
                               f"http://guard:{SHARED}/"], check=False, timeout=30)
        assert r.returncode == 28, f"{r.returncode} {r.stderr}\n{ol.dump()}"
        # the unshared one: SOCKS5 reply 0x05 (connection refused), not 0x06 (TTL expired: timed out)
        r = nl.run(user.host, [*curl, "--socks5-hostname", proxies["socks5"], f"http://guard:{UNSHARED}/"],
                   check=False, timeout=30)
        assert r.returncode == 97 and "(5)" in r.stderr, f"{r.returncode} {r.stderr}\n{ol.dump()}"
        ol.wait(lambda: f"guard does not share port {UNSHARED}" in user.log(), 10, "the reason in the caller's log")
        # the HTTP proxy says it in its answer: 502 with the message (a time-out would be 504)
        r = nl.run(user.host, ["curl", "-sS", "--max-time", "8", "-x", f"http://{proxies['http']}",
                               f"http://guard:{UNSHARED}/"], check=False, timeout=30)
        assert r.returncode == 0 and f"guard does not share port {UNSHARED}" in r.stdout, r.stdout + r.stderr
        assert guard.status()["interface"] is not None
    finally:
        guard.cli("unshare", str(SHARED))
        for s in listeners:
            s.close()
