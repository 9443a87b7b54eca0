"""A connection flood does not lock real nodes out of the server (issue 9.1)."""

from __future__ import annotations

import logging
import resource
import subprocess
import sys


from overlay.ratelog import LogLimiter
from overlay.server.admission import MEMBER, STRANGER, UNAUTH, Admission, max_conns_for


# ---------------------------------------------------------------------------- sans-I/O cores
def test_per_source_cap_sheds_that_source_first_then_refuses():
    a = Admission(max_conns=100, per_source=3)
    for c in "abc":
        assert a.admit(c, "10.0.0.1") == (True, [])
    a.registered("a", member=True)
    a.registered("b", member=False)
    # the fourth from that address: its unauthenticated "c" goes, then the stranger "b"
    assert a.admit("d", "10.0.0.1") == (True, ["c"])
    a.registered("d", member=True)
    assert a.admit("e", "10.0.0.1") == (True, ["b"])
    a.registered("e", member=True)
    # only members left there: refused; other addresses are unaffected
    assert a.admit("f", "10.0.0.1") == (False, [])
    assert a.admit("g", "10.0.0.2") == (True, [])
    assert a.count("10.0.0.1") == 3 and a.refused == 1


def test_global_cap_sheds_unauthenticated_then_idle_strangers_never_members():
    a = Admission(max_conns=4, per_source=10)
    for c, src in (("m", "1.1.1.1"), ("s1", "2.2.2.2"), ("s2", "3.3.3.3"), ("u", "4.4.4.4")):
        a.admit(c, src)
    a.registered("m", member=True)
    a.registered("s1", member=False)
    a.registered("s2", member=False)
    assert a.admit("n1", "5.5.5.5") == (True, ["u"])          # unauthenticated first
    assert a.admit("n2", "6.6.6.6") == (True, ["n1"])         # even a new one
    a.registered("n2", member=False)
    assert a.admit("n3", "7.7.7.7") == (True, ["s1"])         # then the strangers, oldest first
    a.registered("n3", member=False)
    a.touch("s2")                                              # s2 made a request: n2 idles longest
    # a stranger approved into a network since is found out, and kept
    assert a.admit("n4", "8.8.8.8", still_stranger=lambda c: c != "n2") == (True, ["n3"])
    assert a.state("n2") == MEMBER
    a.registered("n4", member=True)
    assert a.admit("n5", "9.9.9.9") == (True, ["s2"])
    a.registered("n5", member=True)
    assert a.admit("n6", "9.9.9.9") == (False, [])            # members only: refused
    assert {c: a.state(c) for c in ("m", "n2", "n4", "n5")} == dict.fromkeys(("m", "n2", "n4", "n5"), MEMBER)
    a.closed("m")
    assert a.admit("n6", "9.9.9.9") == (True, [])
    assert a.state("n6") == UNAUTH and len(a) == 4


def test_the_address_holding_most_connections_is_shed_first():
    a = Admission(max_conns=10, per_source=10)
    a.admit("newcomer", "192.0.2.1")
    a.registered("newcomer", member=False)
    for i in range(9):
        a.admit(f"f{i}", f"198.51.100.{i % 3}")
        a.registered(f"f{i}", member=False)
    shed = []
    for i in range(9):          # a flood from three addresses: each newcomer of theirs sheds one of theirs
        ok, victims = a.admit(f"g{i}", f"198.51.100.{i % 3}")
        a.registered(f"g{i}", member=False)
        shed += victims
    assert "newcomer" not in shed and a.state("newcomer") == STRANGER
    assert sorted(shed) == sorted(f"f{i}" for i in range(9))


def test_connection_cap_leaves_descriptors_free():
    assert max_conns_for(1024) == 1024 - 128
    assert max_conns_for(256) == 192
    assert max_conns_for(1 << 20) == 10_000
    assert max_conns_for(1 << 20, 50) == 50


def test_log_limiter_bounds_lines_and_counts_the_suppressed(caplog):
    now = [0.0]
    lim = LogLimiter(rate=1.0, burst=5, clock=lambda: now[0])
    log = logging.getLogger("test.ratelog")
    with caplog.at_level(logging.INFO, logger="test.ratelog"):
        for i in range(10_000):
            lim.log(log, logging.INFO, "%s: refused", f"10.0.0.{i % 250}")
        lim.log(log, logging.INFO, "another kind")
        now[0] = 3.0
        lim.log(log, logging.INFO, "%s: refused", "10.0.0.1")
    lines = caplog.messages
    assert len(lines) == 7
    assert lines[5] == "another kind"
    assert lines[6] == "10.0.0.1: refused (9995 similar lines suppressed)"


def test_server_raises_its_descriptor_limit_to_the_hard_limit():
    code = ("import resource; from overlay.server.app import raise_nofile_limit; "
            "n = raise_nofile_limit(); print(n, resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)))
    assert r.stdout.split() == ["4096", "4096"], r.stdout + r.stderr
