"""Relaying through coturn (RFC 8656 TURN) in the NAT lab.

Two nodes behind random-port symmetric NATs (no direct path: both ports unpredictable, both
routers drop unsolicited packets) and Debian's coturn (``turnserver``) on a public host of its own,
started here with the shared-secret REST scheme (``use-auth-secret``, ``static-auth-secret``), no
TLS, a bounded relay port range. The mediation server runs with ``--turn`` / ``--turn-secret`` and
hands the nodes time-limited credentials; both allocate, exchange relayed addresses through the
server, and send their WireGuard datagrams through coturn: ``status`` shows ``turn HOST:PORT``, a
20 MB transfer through a port forward arrives intact, and coturn's own log shows the allocations.

A pair that can punch but whose direct UDP is dropped on the wire relays through coturn, and
goes direct once the wire lets it. The TURN client alone, against coturn with permission, channel
and nonce lifetimes cut to seconds, keeps its channels alive through refreshes and stale nonces
(a mutant without the channel refreshes loses the data at 15 s).

Without ``--turn`` the built-in relay carries such a pair as before
(``tests/lab/test_traversal_lab.py``: the matrix's symmetric_random pair and the UDP-blocked case).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import time

import pytest

import coturn as coturn_mod
import lab
import natlab
from lab_overlay import LabNode, OverlayLab, fetch, serve_once, tcp_connect, tcp_listener
from overlay.nat.turn import ALLOCATED, TurnClient, TurnConfig
from overlay.server.turn_credentials import TurnSettings, node_id

pytestmark = pytest.mark.netns

TURN_PORT = coturn_mod.PORT
SECRET = coturn_mod.SECRET
TRANSFER = 20 * 1024 * 1024
FORWARD = 18090


@pytest.fixture()
def turn_lab(tmp_path):
    lab.require_lab("conntrack")
    if shutil.which("turnserver") is None:
        pytest.skip("coturn (turnserver) is not installed")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    try:
        turn_host = nl.add_site("turn", "none").hosts[0]
        coturn = coturn_mod.start(nl, turn_host, str(tmp_path))
        yield nl, ol, turn_host, coturn
    finally:
        ol.close()
        nl.close()


def transfer(nl: natlab.NatLab, ol: OverlayLab, a: LabNode, b: LabNode) -> float:
    """a fetches TRANSFER random bytes from an app shared by b, through ``overlay forward``;
    asserts they arrived intact; returns the seconds it took."""
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
    return took


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (for the figures printed, never asserted)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def symmetric_pair(nl: natlab.NatLab, ol: OverlayLab, tag: str) -> tuple[LabNode, LabNode]:
    sa, sb = nl.add_site(f"{tag}a", "symmetric_random"), nl.add_site(f"{tag}b", "symmetric_random")
    a, b = ol.start_node(sa.hosts[0].name, f"{tag}a"), ol.start_node(sb.hosts[0].name, f"{tag}b")
    ol.pair(a, b, f"{tag}net")
    return a, b


def test_symmetric_pair_relays_through_coturn(turn_lab):
    nl, ol, turn_host, coturn = turn_lab
    ol.start_server("--turn", f"turn:{turn_host.ip}:{TURN_PORT}", "--turn-secret", SECRET)
    a, b = symmetric_pair(nl, ol, "tr")
    want = f"turn {turn_host.ip}:{TURN_PORT}"

    def both_turn():
        pa, pb = a.path_to(b.name), b.path_to(a.name)
        return (pa, pb) if pa == want and pb == want else None
    t0 = time.monotonic()
    ol.wait(both_turn, 40, "both peers on the TURN path", interval=0.3)
    print(f"\non the TURN path {time.monotonic() - t0:.1f} s after the pairing")
    st = a.status()["udp"]["turn"]
    assert st["server"] == f"{turn_host.ip}:{TURN_PORT}" and st["state"] == "allocated", st
    assert st["relayed"].startswith(turn_host.ip + ":") and st["ready"] == 1, st
    assert {p["path"] for p in a.answered(b.name)} == {want}
    assert f"{turn_host.ip}:{TURN_PORT} (allocated, relayed address {st['relayed']})" in a.ok("netcheck")

    cpu = cpu_seconds(coturn.pid), cpu_seconds(ol.server.pid)
    took = transfer(nl, ol, a, b)
    print(f"\n20 MB through coturn (random-symmetric NATs both sides): {took:.2f} s, "
          f"{TRANSFER * 8 / took / 1e6:.0f} Mbit/s; CPU: coturn {cpu_seconds(coturn.pid) - cpu[0]:.2f} s, "
          f"mediation server {cpu_seconds(ol.server.pid) - cpu[1]:.2f} s")
    assert a.path_to(b.name) == want and b.path_to(a.name) == want
    for n in (a, b):
        stats = n.status()["udp"]["turn"]["stats"]
        assert stats["data_out"] > 1000 and stats["data_in"] > 1000, stats    # the bytes went through coturn
        assert stats["integrity_failed"] == stats["malformed"] == 0, stats

    # coturn's view: each node allocated under its own REST username (EXPIRY:NODEID), bound a channel
    log = coturn.stdout()
    ids = {n.name: node_id(base64.b64decode(n.status()["node"]["public_key"])) for n in (a, b)}
    for nid in ids.values():
        assert f":{nid}>: incoming packet ALLOCATE processed, success" in log, log[-3000:]
        assert f":{nid}>: incoming packet CHANNEL_BIND processed, success" in log, log[-3000:]

    # stopping a node deallocates (a Refresh with lifetime 0)
    a.stop()
    nid = ids[a.name]
    ol.wait(lambda: f":{nid}>: incoming packet REFRESH processed, success" in coturn.stdout(), 10,
            "coturn saw the deallocation")


def test_without_turn_the_builtin_relay_carries_the_pair(turn_lab):
    """The same pair with a server that names no TURN server: the built-in relay, as before (its
    per-node cap raised so that the figure printed is the relay's own, for comparison)."""
    nl, ol, _, coturn = turn_lab
    ol.start_server("--relay-rate", str(1 << 20))
    a, b = symmetric_pair(nl, ol, "br")
    ol.wait(lambda: a.path_to(b.name) == "relay" and b.path_to(a.name) == "relay" and a.answered(b.name), 30,
            "both peers on the built-in relay")
    assert a.status()["udp"]["turn"] is None
    cpu = cpu_seconds(ol.server.pid)
    took = transfer(nl, ol, a, b)
    print(f"\n20 MB through the built-in relay (random-symmetric NATs both sides): {took:.2f} s, "
          f"{TRANSFER * 8 / took / 1e6:.0f} Mbit/s; CPU: mediation server {cpu_seconds(ol.server.pid) - cpu:.2f} s")
    assert a.path_to(b.name) == "relay" and b.path_to(a.name) == "relay"
    assert "ALLOCATE" not in coturn.stdout()


def test_turn_path_upgrades_to_direct_when_one_appears(turn_lab):
    """Two port-restricted sites, which punch at once, while UDP between their routers is dropped
    on the wire: they relay through coturn; once the wire lets them, the TURN path gives way to a
    direct one (the relay state keeps probing), as the built-in relay does."""
    nl, ol, turn_host, _ = turn_lab
    ol.start_server("--turn", f"turn:{turn_host.ip}:{TURN_PORT}", "--turn-secret", SECRET)
    sa, sb = nl.add_site("upa", "port_restricted"), nl.add_site("upb", "port_restricted")
    pair = "{ " + f"{sa.wan_ip}, {sb.wan_ip}" + " }"
    block = f"""
table bridge turnlab_block
delete table bridge turnlab_block
table bridge turnlab_block {{
  chain forward {{
    type filter hook forward priority -20; policy accept;
    ip saddr {pair} ip daddr {pair} meta l4proto udp drop
  }}
}}"""
    nl.pub.nft(block)
    a, b = ol.start_node(sa.hosts[0].name, "upa"), ol.start_node(sb.hosts[0].name, "upb")
    ol.pair(a, b, "upnet")
    want = f"turn {turn_host.ip}:{TURN_PORT}"
    ol.wait(lambda: a.path_to(b.name) == want and b.path_to(a.name) == want, 40, "both on the TURN path",
            interval=0.3)
    assert {p["path"] for p in a.answered(b.name)} == {want}
    nl.pub.nft("table bridge turnlab_block\ndelete table bridge turnlab_block\n")
    ol.wait(lambda: a.path_to(b.name, direct=True) and b.path_to(a.name, direct=True), 60,
            "the pair direct once the wire lets it", interval=0.3)
    assert all(p["path"].startswith("direct ") for p in a.answered(b.name))


def test_turn_client_keeps_permissions_channels_and_allocation_alive_on_coturn(tmp_path):
    """The sans-I/O client against coturn itself, with coturn's lifetimes cut short (permissions
    8 s, channels 15 s, nonces 4 s): two clients behind random-port symmetric NATs, each with a
    channel to the other's relayed address, trade datagrams for 25 s. Without the refreshes
    (every 3 s here) and the stale-nonce retries, the data would stop within 15 s."""
    lab.require_lab("conntrack")
    if shutil.which("turnserver") is None:
        pytest.skip("coturn (turnserver) is not installed")
    import select
    with natlab.NatLab() as nl:
        host = nl.add_site("turn", "none").hosts[0]
        coturn = coturn_mod.start(nl, host, str(tmp_path), "--permission-lifetime=8", "--channel-lifetime=15",
                                  "--stale-nonce=4")
        settings = TurnSettings(f"turn:{host.ip}:{TURN_PORT}", SECRET, ttl=3600)
        server = (host.ip, TURN_PORT)
        config = TurnConfig(refresh_interval=3.0, allocation_refresh=5.0, keepalive_interval=2.0)
        sides = []
        for tag in ("ca", "cb"):
            site = nl.add_site(tag, "symmetric_random")
            creds = settings.credentials(tag, time.time())
            sock = nl.udp_socket(site.hosts[0].name, timeout=0.05)
            sides.append((TurnClient(server, creds["username"], creds["password"], config=config), sock))
        t0 = time.monotonic()
        received = {0: 0, 1: 0}
        last_rx = {0: 0.0, 1: 0.0}
        for c, _ in sides:
            c.start(0.0)
        sent_at = 0.0
        while (now := time.monotonic() - t0) < 25.0:
            for c, sock in sides:
                t = c.get_timer()
                if t is not None and t <= now:
                    c.handle_timer(now)
                for d in c.datagrams_to_send(now):
                    sock.sendto(d, server)
            if all(c.state == ALLOCATED for c, _ in sides):
                (ca, _), (cb, _) = sides
                ca.permit(cb.relayed, now)
                cb.permit(ca.relayed, now)
                if now - sent_at >= 0.1:
                    sent_at = now
                    for i, (c, sock) in enumerate(sides):
                        other = sides[1 - i][0].relayed
                        if (d := c.wrap(other, b"ping %d" % i)) is not None:
                            sock.sendto(d, server)
            ready, _, _ = select.select([s for _, s in sides], [], [], 0.02)
            for i, (c, sock) in enumerate(sides):
                if sock in ready:
                    data, _ = sock.recvfrom(2048)
                    got = c.receive(data, time.monotonic() - t0)
                    if got is not None and bytes(got[1]) == b"ping %d" % (1 - i):
                        received[i] += 1
                        last_rx[i] = time.monotonic() - t0
            assert all(c.state != "failed" for c, _ in sides), [(c.error, c.stats) for c, _ in sides]
        for i, (c, _) in enumerate(sides):
            s = c.stats
            print(f"\nclient {i}: received {received[i]}, last at {last_rx[i]:.1f} s, {s.as_dict()}")
            assert received[i] > 50 and last_rx[i] > 24.0, (received, last_rx, coturn.stdout()[-3000:])
            assert s.stale_nonce > 0 and s.integrity_failed == 0 and s.malformed == 0, s
            assert c.channel_of(sides[1 - i][0].relayed) is not None
        log = coturn.stdout()
        assert log.count("REFRESH processed, success") >= 4 and "error 438" in log, log[-3000:]
