"""Two server instances on one PostgreSQL in the NAT lab: a pair that cannot punch relays through one.

Instance A runs in ``pub`` (198.51.100.10), instance B on a public host of its own; both share one
throw-away PostgreSQL database (a Unix socket, reachable from every namespace) and one server key
(one deployment); B names its relay address (``--relay-address``), A announces the address its
nodes reached it at (the default). Node a is behind a random-port symmetric NAT and connects to
A, node b behind another one and connects to B: no direct path can form (both ports
unpredictable, both routers drop unsolicited packets), and before this each instance's relay knew
only its own nodes, so the pair had no path at all. Now the pair relays through the instance of
the node with the smaller key; the other node registers there too (``status``: ``udp.relays``).
Ping answers, ``status`` shows ``relay`` both ways, and a few MB through a forward arrive intact.

Relay over the control connection stays per instance: where the node with the smaller key has no
UDP at all, its frames reach its own instance over TCP and that instance relays them to the other
node's registration there, and back.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import time

import pytest

import lab
import natlab
from overlay import crypto
from overlay.node.home import Home
from lab_overlay import (
    OVERLAY, SERVER_IP, SERVER_PORT, LabNode, OverlayLab, fetch, serve_once, stream_through_forward, tcp_connect,
    tcp_listener,
)

pytestmark = pytest.mark.netns

TRANSFER = 8 * 1024 * 1024
FORWARD = 18091
RATE = str(1 << 20)      # --relay-rate (KiB/s): the figure printed is the relay's own, not the cap


@pytest.fixture()
def two_instances(pg_url):
    """(nl, ol, relay addresses {"A": ..., "B": ...}) with both instances listening."""
    lab.require_lab("conntrack")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    try:
        ol.start_server("--database", pg_url, "--relay-rate", RATE)
        bhost = nl.add_site("xsrv", "none").hosts[0]
        bdata = ol.tmp / "server-b"
        bdata.mkdir(mode=0o700)
        shutil.copy2(ol.tmp / "server" / "server.key", bdata / "server.key")      # one deployment, one key
        server_b = nl.popen(bhost.name, [*OVERLAY, "server", "--listen", f"0.0.0.0:{SERVER_PORT}", "--data",
                                         str(bdata), "--database", pg_url, "--relay-rate", RATE,
                                         "--relay-address", f"{bhost.ip}:{SERVER_PORT}",   # A: the default
                                         "--log-level", "info"], label="server-b")
        ol.servers.append(server_b)
        server_b.wait_for("listening", timeout=15)
        yield nl, ol, {"A": f"{SERVER_IP}:{SERVER_PORT}", "B": f"{bhost.ip}:{SERVER_PORT}"}
    finally:
        ol.close()
        nl.close()


def public_key(n: LabNode) -> bytes:
    return base64.b64decode(n.status()["node"]["public_key"])


def relayed_and_answering(ol: OverlayLab, a: LabNode, b: LabNode) -> None:
    t0 = time.monotonic()
    ol.wait(lambda: a.path_to(b.name) == "relay" and b.path_to(a.name) == "relay"
            and any(p["rtt_ms"] is not None for p in a.ping(b.name, 1)),
            40, "the pair on the relay, answering", interval=0.3)
    print(f"\nrelayed across instances {time.monotonic() - t0:.1f} s after the pairing")
    assert {p["path"] for p in b.answered(a.name)} == {"relay"}


def test_symmetric_pair_on_two_instances_relays_through_one(two_instances):
    nl, ol, relay = two_instances
    sa, sb = nl.add_site("xa", "symmetric_random"), nl.add_site("xb", "symmetric_random")
    a = ol.start_node(sa.hosts[0].name, "xa")                                # on instance A
    b = ol.start_node(sb.hosts[0].name, "xb", server=relay["B"])            # on instance B
    ol.pair(a, b, "xnet")
    assert a.status()["server"]["address"] == relay["A"] and b.status()["server"]["address"] == relay["B"]
    relayed_and_answering(ol, a, b)

    # the pair rule: the instance of the smaller key carries them; the other node registered there
    larger, smaller, carrier = (b, a, "A") if public_key(a) < public_key(b) else (a, b, "B")
    want = [{"address": relay[carrier], "registered": True, "peers": 1}]
    ol.wait(lambda: larger.status()["udp"]["relays"] == want, 10, "the larger key registered at the carrier")
    assert smaller.status()["udp"]["relays"] == []
    assert "registered at the relay of another server instance" in larger.log()

    listener = tcp_listener(nl, b.host)
    b.ok("share", str(listener.getsockname()[1]))
    a.ok("forward", str(FORWARD), f"{b.name}:{listener.getsockname()[1]}")
    data = os.urandom(TRANSFER)
    serve_once(listener, data, timeout=120)
    t0 = time.monotonic()
    with tcp_connect(nl, a.host, FORWARD) as conn:
        got = fetch(conn, deadline=120)
    took = time.monotonic() - t0
    assert got == (TRANSFER, hashlib.sha256(data).hexdigest()), f"corrupt transfer\n{ol.dump()}"
    print(f"\n{TRANSFER >> 20} MB relayed through instance {carrier} (random-symmetric NATs both sides, "
          f"the pair on two instances): {took:.2f} s, {TRANSFER * 8 / took / 1e6:.0f} Mbit/s")
    assert a.path_to(b.name) == "relay" and b.path_to(a.name) == "relay"


def test_the_smaller_key_without_udp_relays_over_its_control_connection(two_instances):
    nl, ol, relay = two_instances
    sa, sb = nl.add_site("ua", "symmetric_random"), nl.add_site("ub", "symmetric_random")
    keys = {}
    for name in ("ua", "ub"):        # the identities made first: the node of the smaller key loses UDP
        home = Home(ol.tmp / name)
        home.ensure()
        keys[name] = crypto.public_key(home.private_key())
    nl.block_udp(sa if keys["ua"] < keys["ub"] else sb)          # all UDP across that site's WAN
    a = ol.start_node(sa.hosts[0].name, "ua")
    b = ol.start_node(sb.hosts[0].name, "ub", server=relay["B"])
    smaller, larger, carrier = (a, b, "A") if keys["ua"] < keys["ub"] else (b, a, "B")
    ol.pair(a, b, "unet")
    assert public_key(smaller) == min(keys.values())
    assert smaller.status()["udp"]["server_udp"] is False, "a node without UDP claims UDP to the server"
    relayed_and_answering(ol, a, b)
    ol.wait(lambda: larger.status()["udp"]["relays"] == [{"address": relay[carrier], "registered": True,
                                                          "peers": 1}],
            10, "the larger key registered at the carrier")
    stream_through_forward(ol, a, b, FORWARD + 1)
