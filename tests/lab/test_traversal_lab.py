"""NAT traversal with real processes: an ``overlay server`` and ``overlay up`` nodes, started through
the CLI inside the real-kernel NAT lab (``natlab.py``: network namespaces, nftables NATs of every
RFC 4787 class), driven through their CLI / local API.

What is proven, against the Linux kernel's own NAT and conntrack:

- which NAT pairs get a direct path and which stay on the relay, and that traffic flows in every
  case (``overlay ping``); the time from both nodes online to direct is printed per pair;
- two hosts behind one NAT talk over their LAN addresses;
- keepalives hold a NAT mapping open past its timeout (and without them it does expire);
- a NAT rebinding in the middle of a TCP transfer through a port forward loses no byte, and the
  path comes back;
- a direct tunnel outlives its mediation server, and nodes reconnect when it returns;
- two sequential symmetric NATs go direct (predicted windows on both sides, 8 fresh pairs and a
  triangle), and a faster public path beats a slower private link while a near-tie goes private;
- a node whose UDP is blocked entirely still reaches its peer through the relay, over its TCP
  control connection.

One lab and one server serve the module; each test builds its own sites (so NAT state never leaks
between tests) and stops its nodes when done. Every wait is bounded; failure messages carry the tail
of every process log. Timings are printed (``-s``) and recorded as properties, never asserted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

import lab
import natlab
from lab_overlay import (SERVER_IP, LabNode, OverlayLab, birthday, fetch, sequential, serve_once,
                         stream_through_forward, tcp_connect, tcp_listener, time_to_direct, udp_mappings)

pytestmark = pytest.mark.netns

SHORT = {"none": "n", "full_cone": "fc", "restricted": "rc", "port_restricted": "pr",
         "symmetric_sequential": "ss", "symmetric_random": "sr"}

class WrongPath(AssertionError):
    """The product chose another path than expected (told apart from a broken lab or a crashed process)."""


# (NAT of node a, NAT of node b, direct expected): b comes online first, then a, whose hello makes
# the server introduce the two at once (before a's own STUN probe is over, as after any restart)
MATRIX = [
    ("none", "none", True),
    ("port_restricted", "port_restricted", True),
    ("full_cone", "port_restricted", True),
    pytest.param("symmetric_sequential", "port_restricted", True, id="ss-pr"),
    ("symmetric_sequential", "full_cone", True),
    ("symmetric_sequential", "symmetric_sequential", True),   # predicted windows on both sides at once
    ("symmetric_sequential", "symmetric_random", False),      # one side unpredictable, the other filters: relay
    ("symmetric_random", "symmetric_random", False),  # both ports unpredictable: only the relay
    ("symmetric_random", "port_restricted", True),    # birthday punching: sr opens 256 ports, pr probes 1024
    ("symmetric_random", "full_cone", True),          # ordinary punching (peer-reflexive): no birthday attempt
]
BIRTHDAY_PAIRS = {("symmetric_random", "port_restricted"), ("port_restricted", "symmetric_random")}
SEQ_PAIRS = {("symmetric_sequential", "symmetric_sequential")}
MATRIX_PAIRS = [m.values if hasattr(m, "values") else m for m in MATRIX]
OBSERVE = 20.0     # seconds after both nodes are online: the longest wait for a direct path
RELAY_WATCH = 12.0  # a relay pair is watched at least this long: punch rounds (5 s) + one re-probe (10 s)


@pytest.fixture(scope="module")
def env():
    lab.require_lab("conntrack")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    try:
        ol.start_server()
        yield nl, ol
    finally:
        ol.close()
        nl.close()


def direct_ip(path: str | None) -> str | None:
    """The IP of a ``"direct IP:PORT"`` status path, else None."""
    if not path or not path.startswith("direct "):
        return None
    return path.split()[1].rpartition(":")[0]


def wait_direct(ol: OverlayLab, a: LabNode, b: LabNode, timeout: float = 20) -> tuple[str, str]:
    """Wait (bounded) until a and b show a direct path to each other; return both paths."""
    return ol.wait(lambda: (a.path_to(b.name, direct=True), b.path_to(a.name, direct=True))
                   if a.path_to(b.name, direct=True) and b.path_to(a.name, direct=True) else None,
                   timeout, f"{a.name} <-> {b.name} direct")


def ping_paths(probes: list[dict]) -> list[str]:
    return [p["path"] for p in probes if p["rtt_ms"] is not None]


# ---------------------------------------------------------------------- 1. NAT pair matrix


@dataclass
class PairRun:
    nat_a: str
    nat_b: str
    a: LabNode
    b: LabNode
    site_a: natlab.Site
    site_b: natlab.Site
    t_online: float | None = None           # monotonic time both were connected
    to_direct: dict[str, float] = field(default_factory=dict)  # node name -> seconds to direct
    seen: dict[str, set] = field(default_factory=dict)         # node name -> every path observed
    final: dict[str, str | None] = field(default_factory=dict)
    pings: dict[str, list[dict]] = field(default_factory=dict)
    birthday: dict[str, dict] = field(default_factory=dict)  # node name -> birthday counters at the end
    sequential: dict[str, dict] = field(default_factory=dict)  # node name -> sequential-punching counters


@pytest.fixture(scope="module")
def matrix(env):
    """All pairs at once, each in its own two sites and network, against the one server."""
    nl, ol = env
    runs: dict[tuple[str, str], PairRun] = {}
    for i, (x, y, _) in enumerate(MATRIX_PAIRS):
        sa, sb = nl.add_site(f"m{i}a", x), nl.add_site(f"m{i}b", y)
        runs[(x, y)] = PairRun(x, y, ol.start_node(sa.hosts[0].name, f"m{i}a"),
                               ol.start_node(sb.hosts[0].name, f"m{i}b"), sa, sb)
    pairs = list(runs.values())
    try:
        for i, p in enumerate(pairs):
            ol.pair(p.a, p.b, f"mnet{i}")
        # now a fresh start of both, b first: no state from the first session survives
        for p in pairs:
            p.a.stop()
            p.b.stop()
        for p in pairs:
            p.b.restart()
        ol.wait_connected(*(p.b for p in pairs))
        for p in pairs:
            p.a.restart()
        start = time.monotonic()
        while True:
            now = time.monotonic()
            for p in pairs:
                if p.t_online is None:
                    if p.a.connected():
                        p.t_online = now
                    continue
                for me, peer in ((p.a, p.b), (p.b, p.a)):
                    path = me.path_to(peer.name)
                    p.seen.setdefault(me.name, set()).add(path)
                    p.final[me.name] = path
                    if direct_ip(path) and me.name not in p.to_direct:
                        p.to_direct[me.name] = now - p.t_online
            online = [p.t_online for p in pairs]
            if None not in online:
                settled = all(len(p.to_direct) == 2 or now - p.t_online >= RELAY_WATCH for p in pairs)
                if settled or now - max(online) > OBSERVE:
                    break
            elif now - start > 30:
                raise AssertionError(f"not every node came online in 30 s\n{ol.dump()}")
            time.sleep(0.1)
        with ThreadPoolExecutor(8) as ex:
            jobs = [(p, me.name, ex.submit(me.ping, peer.name, 3)) for p in pairs
                    for me, peer in ((p.a, p.b), (p.b, p.a))]
            for p, name, job in jobs:
                p.pings[name] = job.result()
        for p in pairs:
            for n in (p.a, p.b):
                p.birthday[n.name] = birthday(n)
                p.sequential[n.name] = sequential(n)
        yield runs
    finally:
        ol.stop_nodes(*(n for p in pairs for n in (p.a, p.b)))


@pytest.mark.parametrize("nat_a,nat_b,direct", [
    m if hasattr(m, "values") else pytest.param(*m, id=f"{SHORT[m[0]]}-{SHORT[m[1]]}") for m in MATRIX])
def test_nat_pair(env, matrix, nat_a, nat_b, direct):
    """Each pair ends on the path its NAT types allow, within the matrix's bounded watch (OBSERVE
    seconds); how long each took is benchmarks/bench_lab.py's table."""
    _, ol = env
    p = matrix[(nat_a, nat_b)]
    print(f"\n{SHORT[nat_a]}-{SHORT[nat_b]}: paths {p.final}")
    for me, peer, peer_site in ((p.a, p.b, p.site_b), (p.b, p.a, p.site_a)):
        answered = ping_paths(p.pings[me.name])
        assert answered, f"{me.name}: no ping answered by {peer.name}: {p.pings[me.name]}\n{ol.dump()}"
        if direct:
            # direct means: to the peer's public (NAT) address, confirmed, and used by the ping
            if direct_ip(p.final[me.name]) != peer_site.wan_ip or direct_ip(answered[-1]) != peer_site.wan_ip:
                raise WrongPath(f"{me.name} -> {peer.name}: expected a direct path to {peer_site.wan_ip}, got "
                                f"{p.final[me.name]} (seen {p.seen[me.name]}; pings {p.pings[me.name]})\n{ol.dump()}")
        elif p.seen[me.name] != {"relay"} or set(answered) != {"relay"}:
            raise WrongPath(f"{me.name} -> {peer.name}: expected the relay throughout, saw {p.seen[me.name]} "
                            f"(pings {p.pings[me.name]})\n{ol.dump()}")
    # birthday punching only where the NAT classes call for it, and never once a direct path works
    attempts = {n.name: p.birthday[n.name].get("attempts") for n in (p.a, p.b)}
    if (nat_a, nat_b) in BIRTHDAY_PAIRS:
        assert 1 <= max(attempts.values()) <= 2, attempts
    else:
        assert set(attempts.values()) == {0}, f"unexpected birthday attempts {attempts}"
    seq = {n.name: p.sequential[n.name].get("attempts") for n in (p.a, p.b)}
    if (nat_a, nat_b) in SEQ_PAIRS:
        assert all(1 <= v <= 2 for v in seq.values()), seq
    else:
        assert set(seq.values()) == {0}, f"unexpected sequential attempts {seq}"


# ---------------------------------------------------------------------- 1b. birthday punching, repeated

BIRTHDAY_RUNS = 10      # random-symmetric <-> port-restricted pairs, all at once, half each way round
BIRTHDAY_WINDOW = 12.0  # one attempt (1 s wait + 4 s) with margin; the next one comes 30 s later


def test_birthday_punching_success_rate_and_cost(env, record_property):
    """sr <-> pr pairs go direct through birthday punching (at least 8 of 10 fresh pairs, within
    one attempt; the core's odds are 98 % a pair), and the cost stays within the caps: at most 256
    extra mappings on the hard side's router and 1,024 on the easy side's toward the peer. One more
    pair runs with ``--no-hard-nat-punch`` on the hard side: it stays on the relay, no attempt."""
    nl, ol = env
    specs = [("symmetric_random", "port_restricted") if i % 2 == 0 else ("port_restricted", "symmetric_random")
             for i in range(BIRTHDAY_RUNS)]
    sites, pairs = [], []
    for i, (x, y) in enumerate(specs + [("symmetric_random", "port_restricted")]):
        sa, sb = nl.add_site(f"bd{i}a", x), nl.add_site(f"bd{i}b", y)
        opt_out = ("--no-hard-nat-punch",) if i == BIRTHDAY_RUNS else ()
        sites.append((sa, sb))
        pairs.append((ol.start_node(sa.hosts[0].name, f"bd{i}a", *opt_out), ol.start_node(sb.hosts[0].name, f"bd{i}b")))
    try:
        for i, (a, b) in enumerate(pairs):
            ol.pair(a, b, f"bdnet{i}")
        times = time_to_direct(ol, pairs, BIRTHDAY_WINDOW, [s for ab in sites for s in ab])
        rows = []
        for (x, y), (a, b), (sa, sb), t in zip(specs, pairs, sites, times):
            hard, easy = (sa, sb) if x == "symmetric_random" else (sb, sa)
            hard_node, easy_node = (a, b) if x == "symmetric_random" else (b, a)
            rows.append((t, udp_mappings(hard, easy.wan_ip), udp_mappings(easy, hard.wan_ip),
                         birthday(hard_node), birthday(easy_node)))
        opt_a, opt_b = pairs[-1]
        opt_paths = (opt_a.path_to(opt_b.name), opt_b.path_to(opt_a.name), birthday(opt_a), birthday(opt_b))
        direct = [r[0] for r in rows if r[0] is not None]
        summary = {"direct": f"{len(direct)}/{len(rows)}", "went_direct": [t is not None for t in times[:-1]],
                   "hard_mappings": [r[1] for r in rows], "easy_mappings": [r[2] for r in rows],
                   "easy_probes": [r[4].get("probes") for r in rows]}
        record_property("birthday", summary)
        print(f"\nbirthday sr-pr: {summary}; opt-out pair: {opt_paths[:2]}")
        for (t, hard_map, easy_map, hb, eb), (x, _), (a, b) in zip(rows, specs, pairs):
            assert hard_map <= 256 + 8 and easy_map <= 1024 + 8, (hard_map, easy_map)
            assert hb.get("attempts", 0) <= 2 and eb.get("attempts", 0) <= 2 and hb.get("sockets", 0) <= 512
            # the attempt's sockets close: only the winner stays, and only while it carries the
            # direct path (a path lost later, e.g. on a loaded machine, closes it too)
            hard_node, easy_node = (a, b) if x == "symmetric_random" else (b, a)
            st = hard_node.status()
            direct_now = (hard_node.peer(easy_node.name) or {}).get("path", "").startswith("direct")
            open_socks = st["udp"]["birthday"]["open_sockets"]
            # (a hit may also land on the main socket's own mapping: then none stays)
            assert open_socks <= (1 if direct_now else 0), \
                f"{st['udp']['birthday']} direct now: {direct_now}\n{hard_node.log()[-4000:]}"
        # direct within BIRTHDAY_WINDOW: the first attempt (the time it took: benchmarks/bench_lab.py)
        assert len(direct) >= 8, f"only {len(direct)} of {len(rows)} sr-pr pairs went direct: {summary}\n{ol.dump()}"
        # opt-out: relay, and no attempt on either side (the easy side learns it through the server)
        assert opt_paths[0] == "relay" and opt_paths[1] == "relay", opt_paths
        assert opt_paths[2].get("attempts") == 0 and opt_paths[2].get("enabled") is False, opt_paths
        assert opt_paths[3].get("attempts") == 0 and opt_paths[3].get("enabled") is True, opt_paths
        for a, b in pairs[:-1]:
            if a.path_to(b.name, direct=True):
                assert ping_paths(a.answered(b.name))[-1].startswith("direct"), "traffic takes the birthday path"
                break
    finally:
        ol.stop_nodes(*(n for p in pairs for n in p))


# ---------------------------------------------------------------------- 1b'. sequential on both sides, repeated

SEQ_RUNS = 8         # ss <-> ss pairs, all at once
SEQ_WINDOW = 10.0    # one attempt (0.5 s wait, measurement, 4 s of bursts) with margin


def test_sequential_both_sides_success_rate_and_cost(env, record_property):
    """ss <-> ss pairs go direct by spraying predicted windows on both sides at once (every one of
    8 fresh pairs, within one attempt), each through the attempt's socket (a hit counted), and the
    cost stays within the caps: per router, the window (16) plus the measurement plus ordinary
    punching's flows toward the peer. One more pair runs with ``--no-hard-nat-punch`` on one side:
    ordinary punching alone leaves it on the relay."""
    nl, ol = env
    sites, pairs = [], []
    for i in range(SEQ_RUNS + 1):
        sa, sb = nl.add_site(f"sq{i}a", "symmetric_sequential"), nl.add_site(f"sq{i}b", "symmetric_sequential")
        opt_out = ("--no-hard-nat-punch",) if i == SEQ_RUNS else ()
        sites.append((sa, sb))
        pairs.append((ol.start_node(sa.hosts[0].name, f"sq{i}a", *opt_out), ol.start_node(sb.hosts[0].name, f"sq{i}b")))
    try:
        for i, (a, b) in enumerate(pairs):
            ol.pair(a, b, f"sqnet{i}")
        times = time_to_direct(ol, pairs, SEQ_WINDOW, [s for ab in sites for s in ab])
        rows = [(t, udp_mappings(sa, sb.wan_ip), udp_mappings(sb, sa.wan_ip), sequential(a), sequential(b))
                for t, (a, b), (sa, sb) in zip(times, pairs, sites)]
        opt = rows.pop()
        direct = [r[0] for r in rows if r[0] is not None]
        summary = {"direct": f"{len(direct)}/{len(rows)}", "went_direct": [t is not None for t in times[:-1]],
                   "mappings": [(r[1], r[2]) for r in rows],
                   "probes": [r[3].get("probes", 0) + r[4].get("probes", 0) for r in rows]}
        record_property("sequential", summary)
        print(f"\nsequential ss-ss: {summary}; opt-out pair: {opt}")
        for t, map_a, map_b, sa_, sb_ in rows:
            assert map_a <= 16 + 1 + 24 and map_b <= 16 + 1 + 24, (map_a, map_b)
            assert 1 <= sa_.get("attempts", 0) <= 2 and 1 <= sb_.get("attempts", 0) <= 2, (sa_, sb_)
            if t is not None:
                assert sa_.get("hits", 0) + sb_.get("hits", 0) >= 1, (sa_, sb_)
        # direct within SEQ_WINDOW: the first attempt (the time it took: benchmarks/bench_lab.py)
        assert len(direct) == len(rows), f"only {len(direct)} of {len(rows)} ss-ss pairs went direct: {summary}\n{ol.dump()}"
        assert opt[0] is None and opt[3].get("attempts") == 0 and opt[4].get("attempts") == 0, opt
        a, b = pairs[0]
        assert ping_paths(a.answered(b.name))[-1].startswith("direct"), "traffic takes the sprayed path"
    finally:
        ol.stop_nodes(*(n for p in pairs for n in p))


def test_sequential_triangle_all_direct(env):
    """Three nodes, each behind its own sequential symmetric NAT, in one network: each has two
    such peers at once but one attempt at a time; the one that waits joins when the other side
    starts (its base comes through the server), so all three pairs go direct."""
    nl, ol = env
    sites = [nl.add_site(f"tri{i}", "symmetric_sequential") for i in range(3)]
    nodes = [ol.start_node(s.hosts[0].name, f"tri{i}") for i, s in enumerate(sites)]
    try:
        ol.pair(nodes[0], nodes[1], "trinet", nodes[2])
        pairs = [(nodes[i], nodes[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
        for a, b in pairs:      # (how long it takes: benchmarks/bench_lab.py --scenarios)
            wait_direct(ol, a, b, timeout=40)
        stats = {n.name: sequential(n) for n in nodes}
        print(f"\nss triangle: all direct; {stats}")
        for n in nodes:
            assert stats[n.name]["attempts"] <= 4 and stats[n.name]["mappings"] <= 4 * 17, stats
            for peer in nodes:
                if peer is not n:
                    assert direct_ip(n.path_to(peer.name)) == sites[nodes.index(peer)].wan_ip
    finally:
        ol.stop_nodes(*nodes)


def test_easy_sequential_pair_goes_direct_after_a_missed_prediction(env):
    """Two sequential symmetric sites and an easy (port-restricted) one, in one network at once:
    the sequential node ``rxa`` spends its NAT's next ports on its predicted window toward ``rxb``
    while ``rxe`` punches it at the ports ``rxa`` published (predicted from its last probe). To make
    that miss certain, ``rxa``'s host first opens 40 other flows. The easy <-> sequential pair must
    not stay relayed: ``rxa`` measures again from a fresh socket and ``rxe`` sprays that window, so
    it goes direct, after a bounded number of attempts."""
    nl, ol = env
    sa, sb = nl.add_site("rxa", "symmetric_sequential"), nl.add_site("rxb", "symmetric_sequential")
    se = nl.add_site("rxe", "port_restricted")
    a, b, e = (ol.start_node(s.hosts[0].name, s.name) for s in (sa, sb, se))
    try:
        ol.wait_connected(a, b, e)
        ol.wait(lambda: a.status()["udp"]["nat"].get("sequential"), 20, "rxa classified sequential")
        sock = nl.socket(sa.hosts[0].name)
        for port in range(20000, 20040):          # 40 new flows: rxa's published prediction is stale
            sock.sendto(b"x", (SERVER_IP, port))
        ol.pair(a, b, "rxnet", e)
        wait_direct(ol, e, a, timeout=90)   # (how long it takes: benchmarks/bench_lab.py --scenarios)
        stats = {n.name: sequential(n) for n in (a, e)}
        print(f"\neasy <-> sequential after a missed prediction: direct; {stats}")
        assert direct_ip(e.path_to(a.name)) == sa.wan_ip
        assert stats["rxa"]["attempts"] <= 6 and stats["rxa"]["mappings"] <= 6 * 17, stats
    finally:
        ol.stop_nodes(a, b, e)


# ---------------------------------------------------------------------- 1c. port mapping


def test_netcheck_reports_which_port_mapping_protocols_answered(env):
    """A node behind a router running miniupnpd asks it for a mapping (PCP, NAT-PMP, UPnP IGD) and
    ``overlay netcheck`` says what each answered (this router's miniupnpd refuses to map behind
    the lab's reserved public address: "network failure"; see natlab.start_port_mapper), and
    advertises nothing from it; a node behind a router without a mapping daemon reports no answer.
    Nothing is sent on loopback (the other tests' nodes there have no gateway to ask).
    tests/lab/test_portmap_lab.py has the routers that do map."""
    nl, ol = env
    if not shutil.which("miniupnpd"):
        pytest.skip("miniupnpd not installed (apt-get install miniupnpd-nftables)")
    up, plain, cgn = (nl.add_site("pm1", "symmetric_random"), nl.add_site("pm2", "port_restricted"),
                      nl.add_site("pm3", "symmetric_random"))
    daemon = nl.start_port_mapper(up)
    nl.start_port_mapper(cgn, ext_ip="11.22.33.44")   # maps, but its "public" address is not ours
    a, b = ol.start_node(up.hosts[0].name, "pma"), ol.start_node(plain.hosts[0].name, "pmb")
    c = ol.start_node(cgn.hosts[0].name, "pmc")
    try:
        ol.wait_connected(a, b, c)

        def netcheck(n: LabNode) -> dict | None:
            r = json.loads(n.ok("netcheck", "--json"))
            pm = r["port_mapping"]
            return r if pm is not None and all(pm[k]["answered"] is not None for k in ("pcp", "nat_pmp")) else None

        ra, rb = ol.wait(lambda: netcheck(a), 15, "PCP / NAT-PMP answers"), ol.wait(lambda: netcheck(b), 15, "gave up")
        pa, pb = ra["port_mapping"], rb["port_mapping"]
        for k in ("pcp", "nat_pmp"):
            assert pa[k]["answered"] is True and pa[k]["mapped"] is None, pa
            assert pb[k]["answered"] is False and pb[k]["mapped"] is None, pb
        # miniupnpd 2.3.1 behind a reserved address: NAT-PMP says "network failure"; its PCP server
        # tries to add the rule, fails, and answers NO_RESOURCES (its log: "PCP MAP: failed to add mapping")
        assert "network failure" in pa["nat_pmp"]["error"] and "NO_RESOURCES" in pa["pcp"]["error"], pa
        assert pa["mapped"] is None and pb["mapped"] is None
        assert "NAT-PMP public address request" in daemon.stderr() + daemon.stdout()
        assert all(c["kind"] != "magic" for c in ra["candidates"] + rb["candidates"])
        text = a.ok("netcheck")
        assert "port mapping (NAT-PMP):   answered yes, error: network failure" in text, text
        assert "port mapping (PCP):       answered yes, error: NO_RESOURCES" in text, text
        assert "port mapping (PCP):       answered no" in b.ok("netcheck")
        # a mapping whose external address is not the one the server sees: reported, not advertised,
        # and removed from the router when the node stops
        rc = ol.wait(lambda: (r := netcheck(c)) and r["port_mapping"]["mapped"] and r, 15, "a mapping")
        pc = rc["port_mapping"]
        port = rc["local_port"]
        assert pc["mapped"] == f"11.22.33.44:{port}" and pc["usable"] is False and "not advertised" in pc["note"], pc
        assert not any(x["addr"].startswith("11.22.33.44") for x in rc["candidates"]), rc["candidates"]
        rules = lambda: cgn.router.run("nft", "list", "chain", "inet", "miniupnpd", "pre_upnp").stdout  # noqa: E731
        assert f"dport {port} dnat ip to {cgn.hosts[0].ip}:{port}" in rules(), rules()
        assert "not advertised" in c.ok("netcheck")
        c.stop()
        ol.wait(lambda: "dnat" not in rules(), 5, "mapping removed on exit")
    finally:
        ol.stop_nodes(a, b, c)


# ---------------------------------------------------------------------- 2. LAN pair


def test_lan_pair_goes_direct_over_lan(env):
    nl, ol = env
    site = nl.add_site("lan", "port_restricted", hosts=2)
    h1, h2 = site.hosts
    a, b = ol.start_node(h1.name, "lana"), ol.start_node(h2.name, "lanb")
    try:
        ol.pair(a, b, "lannet")
        pa, pb = wait_direct(ol, a, b)
        # the LAN address, not the NAT's public one (which would need hairpinning anyway)
        assert direct_ip(pa) == h2.ip and direct_ip(pb) == h1.ip, (pa, pb)
        assert direct_ip(ping_paths(a.answered("lanb"))[-1]) == h2.ip
    finally:
        ol.stop_nodes(a, b)


def test_faster_public_path_beats_slower_private_one(env):
    """Two public hosts also linked by a private 10.77.0.0/24 link (another VPN's addresses). While
    that link is slow (a kernel tbf shaper at 100 kbit/s kept full by a filler flow: hundreds of
    ms of queue), the nodes take and keep the public path, which answers in well under a
    millisecond; with the link idle (as fast as the public one: a near-tie) the private path wins
    the tie-break."""
    nl, ol = env
    if not shutil.which("tc"):
        pytest.skip("tc (iproute2) not installed")
    site = nl.add_site("vp", "none", hosts=2)
    h1, h2 = site.hosts
    lab.sh("ip", "link", "add", "vpn0", "netns", h1.ns.name, "type", "veth", "peer", "name", "vpn0",
           "netns", h2.ns.name)
    for h, ip in ((h1, "10.77.0.1"), (h2, "10.77.0.2")):
        h.ns.run("ip", "addr", "add", f"{ip}/24", "dev", "vpn0")
        h.ns.run("ip", "link", "set", "vpn0", "up")
    h1.ns.run("tc", "qdisc", "add", "dev", "vpn0", "root", "tbf", "rate", "100kbit", "burst", "1600",
              "latency", "400ms")
    filler = nl.udp_socket(h1.name)
    stop = threading.Event()

    def fill() -> None:   # 1000-byte datagrams at 160 kbit/s: the shaper's queue stays full
        while not stop.wait(0.05):
            filler.sendto(b"x" * 1000, ("10.77.0.2", 9))

    t = threading.Thread(target=fill, daemon=True)
    t.start()
    a, b = ol.start_node(h1.name, "vpa"), ol.start_node(h2.name, "vpb")
    try:
        time.sleep(1.0)     # the queue is full before the first probe
        ol.pair(a, b, "vpnet")
        wait_direct(ol, a, b)
        seen = set()
        end = time.monotonic() + 7.0     # past the punch rounds: every path sampled several times
        while time.monotonic() < end:
            seen |= {direct_ip(a.path_to("vpb")), direct_ip(b.path_to("vpa"))}
            time.sleep(0.2)
        assert seen == {h1.ip, h2.ip}, f"the slow private path was taken: {seen}\n{ol.dump()}"
        stop.set()
        t.join()
        h1.ns.run("tc", "qdisc", "del", "dev", "vpn0", "root")
        time.sleep(1.0)
        a.restart()     # a fresh introduction: now both paths are equally fast
        ol.wait(lambda: direct_ip(a.path_to("vpb")) == "10.77.0.2" and direct_ip(b.path_to("vpa")) == "10.77.0.1",
                15, "the tie broken for the private path")
    finally:
        stop.set()
        ol.stop_nodes(a, b)


# ---------------------------------------------------------------------- 3. keepalive vs mapping expiry


def test_keepalive_outlives_nat_mapping_timeout(env):
    """Mappings that expire after 10 s unreplied / 15 s answered: with ``--keepalive 7`` the direct
    path (the very same NAT mappings) survives more than twice that. (That these lab timeouts do
    expire idle mappings is proven by tests/lab/test_natlab.py::test_mapping_expires_with_lowered_timeout.)"""
    nl, ol = env
    unreplied, stream = 10, 15
    main = [nl.add_site("kaa", "port_restricted"), nl.add_site("kab", "port_restricted")]
    a, b = (ol.start_node(s.hosts[0].name, s.name, keepalive=7) for s in main)
    try:
        ol.pair(a, b, "kanet")
        before = wait_direct(ol, a, b)
        for s in main:
            nl.set_udp_timeouts(unreplied, stream, site=s)
        end = time.monotonic() + 2 * stream + 3
        while time.monotonic() < end:
            now = (a.path_to("kab"), b.path_to("kaa"))
            assert now == before, f"direct path changed despite keepalives: {before} -> {now}\n{ol.dump()}"
            time.sleep(0.5)
        assert ping_paths(a.answered("kab"))[-1] == before[0]
    finally:
        for s in main:
            nl.set_udp_timeouts(*natlab.DEFAULT_UDP_TIMEOUTS, site=s)
        ol.stop_nodes(a, b)


# ---------------------------------------------------------------------- 4. NAT rebinding mid-transfer

TRANSFER = 8 << 20
FORWARD_PORT = 18080  # each scenario's client lives in its own namespace: no clash


@dataclass
class Rebind:
    name: str
    site_a: natlab.Site
    a: LabNode
    b: LabNode
    before: tuple[str, str] = ("", "")
    sha_sent: str = ""
    received: int = 0
    sha_received: str = ""
    flushed_at: int | None = None
    recovered: tuple[str, str] | None = None
    error: str = ""


def _rebind_run(nl: natlab.NatLab, ol: OverlayLab, r: Rebind) -> Rebind:
    """a fetches TRANSFER bytes from an app shared by b, through ``overlay forward``; a's NAT is
    flushed (a router reboot: new external port) once a quarter has arrived. Then: is the path
    direct again, with b reaching a at a new external port?"""
    a, b = r.a, r.b
    r.before = wait_direct(ol, a, b)
    listener = tcp_listener(nl, b.host)
    b.ok("share", str(listener.getsockname()[1]))
    a.ok("forward", str(FORWARD_PORT), f"{b.name}:{listener.getsockname()[1]}")
    data = os.urandom(TRANSFER)
    r.sha_sent = hashlib.sha256(data).hexdigest()
    server = serve_once(listener, data)

    def progress(n: int) -> None:
        if r.flushed_at is None and n >= TRANSFER // 4:
            r.flushed_at = n
            nl.flush_conntrack(r.site_a)

    try:
        with tcp_connect(nl, a.host, FORWARD_PORT) as conn:
            r.received, r.sha_received = fetch(conn, progress, deadline=90)
    except OSError as e:
        r.error = f"transfer failed: {e!r}"
    server.join(5)
    deadline = time.monotonic() + 12  # a dead path is declared after 5 s; the fixed product recovers in ~6
    while time.monotonic() < deadline:
        pa, pb = a.path_to(b.name, direct=True), b.path_to(a.name, direct=True)
        if pa and pb and pb != r.before[1]:
            r.recovered = (pa, pb)
            break
        time.sleep(0.2)
    return r


@pytest.fixture(scope="module")
def rebinding(env):
    """Two scenarios side by side: a behind a port-restricted NAT that reboots, b behind a full-cone
    ("fc") or another port-restricted ("pr") NAT."""
    nl, ol = env
    runs: dict[str, Rebind] = {}
    try:
        for key, nat_b in (("fc", "full_cone"), ("pr", "port_restricted")):
            name = f"rb{key}"
            sa, sb = nl.add_site(f"{name}a", "port_restricted"), nl.add_site(f"{name}b", nat_b)  # lab: one thread
            runs[key] = Rebind(name, sa, ol.start_node(sa.hosts[0].name, f"{name}a"),
                               ol.start_node(sb.hosts[0].name, f"{name}b"))
            ol.pair(runs[key].a, runs[key].b, f"{name}net")
        with ThreadPoolExecutor(len(runs)) as ex:
            for job in [ex.submit(_rebind_run, nl, ol, r) for r in runs.values()]:
                job.result()
        yield runs
    finally:
        ol.stop_nodes(*(n for r in runs.values() for n in (r.a, r.b)))


@pytest.mark.parametrize("peer", ["fc", "pr"])
def test_rebinding_mid_transfer_loses_no_byte(env, rebinding, peer):
    _, ol = env
    r = rebinding[peer]
    assert not r.error, f"{r.error}\n{ol.dump()}"
    assert r.flushed_at is not None and r.flushed_at < TRANSFER, "the NAT was not flushed mid-transfer"
    assert (r.received, r.sha_received) == (TRANSFER, r.sha_sent), f"corrupt transfer\n{ol.dump()}"


@pytest.mark.parametrize("peer", ["fc", "pr"])
def test_rebinding_path_recovers_direct(env, rebinding, peer):
    _, ol = env
    r = rebinding[peer]
    assert not r.error, f"{r.error}\n{ol.dump()}"
    if not r.recovered:
        raise WrongPath(f"{r.name}: no direct path to the new mapping within 12 s of the transfer (before: "
                        f"{r.before}; now {r.a.path_to(r.b.name)}, {r.b.path_to(r.a.name)})\n{ol.dump()}")
    print(f"\nrebinding {peer}: {r.before} -> {r.recovered}")
    assert direct_ip(ping_paths(r.a.answered(r.b.name))[-1]) is not None


# ---------------------------------------------------------------------- 6. UDP blocked


def test_udp_blocked_node_uses_relay_over_tcp(env):
    nl, ol = env
    blocked, other = nl.add_site("udpa", "port_restricted"), nl.add_site("udpb", "full_cone")
    nl.block_udp(blocked)
    a = ol.start_node(blocked.hosts[0].name, "udpa")
    b = ol.start_node(other.hosts[0].name, "udpb")
    try:
        ol.pair(a, b, "udpnet")
        assert a.status()["udp"]["server_udp"] is False, "a node without UDP claims UDP to the server"
        end = time.monotonic() + RELAY_WATCH
        while time.monotonic() < end:  # through the punch rounds and a re-probe: never direct
            paths = (a.path_to("udpb"), b.path_to("udpa"))
            assert paths == ("relay", "relay"), f"{paths}\n{ol.dump()}"
            time.sleep(0.5)
        assert set(ping_paths(a.answered("udpb"))) == {"relay"}
        assert set(ping_paths(b.answered("udpa"))) == {"relay"}
        # a stream too, both ways of the relay-over-TCP path carrying it
        stream_through_forward(ol, a, b, FORWARD_PORT)
    finally:
        nl.block_udp(blocked, False)
        ol.stop_nodes(a, b)


# ---------------------------------------------------------------------- 5. server restart (last: it
# takes the module's server down)


def test_direct_tunnel_survives_server_restart(env):
    nl, ol = env
    sa, sb = nl.add_site("rsa", "port_restricted"), nl.add_site("rsb", "port_restricted")
    a = ol.start_node(sa.hosts[0].name, "rsa", keepalive=7)
    b = ol.start_node(sb.hosts[0].name, "rsb", keepalive=7)
    try:
        ol.pair(a, b, "rsnet")
        before = wait_direct(ol, a, b)
        ol.stop_server()
        ol.wait(lambda: not a.connected() and not b.connected(), 10, "nodes noticing the server is gone")
        assert ping_paths(a.answered("rsb"))[-1] == before[0]
        # longer than a keepalive interval without the server: the path maintains itself
        end = time.monotonic() + 8
        while time.monotonic() < end:
            assert (a.path_to("rsb"), b.path_to("rsa")) == before, ol.dump()
            time.sleep(0.5)
        assert ping_paths(b.answered("rsa"))[-1] == before[1]
        ol.start_server()
        ol.wait(lambda: a.connected() and b.connected(), 45, "nodes reconnected to the restarted server")
        ol.wait(lambda: a.status()["udp"]["server_udp"] and b.status()["udp"]["server_udp"], 20,
                "relay registrations acknowledged again")
        assert ping_paths(a.answered("rsb"))[-1] == before[0]
        assert ping_paths(b.answered("rsa"))[-1] == before[1]
    finally:
        ol.stop_nodes(a, b)
