"""Relaying through coturn (RFC 8656 TURN) in the NAT lab.

Two nodes behind random-port symmetric NATs (no direct path: both ports unpredictable, both
routers drop unsolicited packets) and Debian's coturn (``turnserver``) on a public host of its own,
started here with the shared-secret REST scheme (``use-auth-secret``, ``static-auth-secret``), no
TLS, a bounded relay port range. The mediation server runs with ``--turn`` / ``--turn-secret`` and
hands the nodes time-limited credentials; both allocate, exchange relayed addresses through the
server, and send their WireGuard datagrams through coturn: ``status`` shows ``turn HOST:PORT``, a
20 MB transfer through a port forward arrives intact, and coturn's own log shows the allocations.

Without ``--turn`` the built-in relay carries such a pair as before
(``tests/lab/test_traversal_lab.py``: the matrix's symmetric_random pair and the UDP-blocked case).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import pytest

import lab
import natlab
from lab_overlay import OverlayLab, fetch, serve_once, tcp_connect, tcp_listener

pytestmark = pytest.mark.netns

TURN_PORT = 3478
SECRET = "lab-turn-secret"
TRANSFER = 20 * 1024 * 1024
FORWARD = 18090


def start_coturn(nl: natlab.NatLab, host: natlab.Host, workdir: str) -> natlab.Proc:
    """Debian's turnserver in ``host``'s namespace: REST credentials, UDP only, 200 relay ports."""
    argv = ["turnserver", "-n", "--listening-ip", host.ip, "--relay-ip", host.ip, "--external-ip", host.ip,
            "--listening-port", str(TURN_PORT), "--min-port", "49152", "--max-port", "49351",
            "--use-auth-secret", "--static-auth-secret", SECRET, "--realm", "overlay.lab",
            "--no-tls", "--no-dtls", "--no-tcp-relay", "--no-cli", "--no-multicast-peers",
            "--fingerprint", "--log-file", "stdout", "--simple-log", "--verbose",
            "--pidfile", os.path.join(workdir, "turnserver.pid"), "--userdb", os.path.join(workdir, "turndb")]
    proc = nl.popen(host.name, argv, label="coturn", cwd=workdir)

    def listening() -> bool:
        r = nl.run(host.name, ["ss", "-uln", f"( sport = :{TURN_PORT} )"], check=False, timeout=5)
        return f"{host.ip}:{TURN_PORT}" in r.stdout
    lab_wait(listening, 15, "coturn listening", proc)
    return proc


def lab_wait(cond, timeout: float, what: str, proc: natlab.Proc) -> None:
    from polling import wait
    wait(cond, timeout, what, 0.1, on_fail=lambda: proc.describe())


@pytest.fixture()
def turn_lab(tmp_path):
    lab.require_lab("conntrack")
    if shutil.which("turnserver") is None:
        pytest.skip("coturn (turnserver) is not installed")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    try:
        turn_host = nl.add_site("turn", "none").hosts[0]
        coturn = start_coturn(nl, turn_host, str(tmp_path))
        yield nl, ol, turn_host, coturn
    finally:
        ol.close()
        nl.close()


def test_symmetric_pair_relays_through_coturn(turn_lab):
    nl, ol, turn_host, coturn = turn_lab
    url = f"turn:{turn_host.ip}:{TURN_PORT}"
    ol.start_server("--turn", url, "--turn-secret", SECRET)
    sa, sb = nl.add_site("tra", "symmetric_random"), nl.add_site("trb", "symmetric_random")
    a, b = ol.start_node(sa.hosts[0].name, "tra"), ol.start_node(sb.hosts[0].name, "trb")
    ol.pair(a, b, "turnnet")
    want = f"turn {turn_host.ip}:{TURN_PORT}"

    def both_turn():
        pa, pb = a.path_to("trb"), b.path_to("tra")
        return (pa, pb) if pa == want and pb == want else None
    ol.wait(both_turn, 40, "both peers on the TURN path", interval=0.3)
    st = a.status()["udp"]["turn"]
    assert st["server"] == f"{turn_host.ip}:{TURN_PORT}" and st["state"] == "allocated", st
    assert st["relayed"].startswith(turn_host.ip + ":"), st
    assert [p["path"] for p in a.answered("trb")] and set(p["path"] for p in a.answered("trb")) == {want}

    # 20 MB through a forward, over the TURN path, intact
    listener = tcp_listener(nl, b.host)
    b.ok("share", str(listener.getsockname()[1]))
    a.ok("forward", str(FORWARD), f"trb:{listener.getsockname()[1]}")
    data = os.urandom(TRANSFER)
    serve_once(listener, data, timeout=120)
    t0 = time.monotonic()
    with tcp_connect(nl, a.host, FORWARD) as conn:
        got = fetch(conn, deadline=120)
    took = time.monotonic() - t0
    assert got == (TRANSFER, hashlib.sha256(data).hexdigest()), f"corrupt transfer\n{ol.dump()}"
    print(f"\n20 MB through coturn: {took:.2f} s, {TRANSFER * 8 / took / 1e6:.1f} Mbit/s")
    assert a.path_to("trb") == want and b.path_to("tra") == want
    stats = a.status()["udp"]["turn"]["stats"]
    assert stats["data_out"] > 1000 and stats["data_in"] > 1000, stats
    # coturn saw our allocations (its log names the REST usernames: EXPIRY:NODEID)
    assert coturn.stdout().count("ALLOCATE processed, success") >= 2 or "success" in coturn.stdout(), coturn.stdout()[-3000:]
