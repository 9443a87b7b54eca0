"""Proves the real-kernel NAT lab (``natlab.py``): every NAT type maps and filters as labelled,
and the controls (conntrack flush, timeouts, loss, UDP block, processes, cleanup) do what they say.

One lab (all NAT types + a reflector in ``pub``) is shared by the module; tests that change a
site's controls restore them in ``finally``. Every network wait is bounded.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from repo_paths import SUPPORT
import lab
import natlab
import natlab_tools

pytestmark = pytest.mark.netns

S0, S1 = natlab.SERVER_IPS
PORTS = (3478, 3479)
TOOLS = str(SUPPORT / "natlab_tools.py")

# site name -> (NAT type, hosts)
SITES = {
    "n": ("none", 1),
    "fc": ("full_cone", 1),
    "rc": ("restricted", 1),
    "pr": ("port_restricted", 2),  # pr1 + pr2: a LAN pair
    "ss": ("symmetric_sequential", 1),
    "sr": ("symmetric_random", 1),
}
BY_NAT = {nat: name for name, (nat, _) in SITES.items()}
ALL_DESTS = [(ip, port) for ip in (S0, S1) for port in PORTS]


@pytest.fixture(scope="module")
def nl():
    lab.require_lab("conntrack")
    lab_ = natlab.NatLab()
    try:
        for name, (nat, hosts) in SITES.items():
            lab_.add_site(name, nat, hosts=hosts)
        lab_.add_site("pp", "port_restricted", preserve_ports=True)
        # same LAN addresses as site "pr": the classic "both homes are 10.0.x.0/24" trap
        lab_.add_site("dup", "port_restricted", lan_subnet=str(lab_.sites["pr"].lan))
        lab_.add_site("uw", "port_restricted", unreserved_wan=True)
        argv = [sys.executable, TOOLS, "reflect", "--tcp", f"{S0}:{PORTS[0]}"]
        for ip, port in ALL_DESTS:
            argv += ["--udp", f"{ip}:{port}"]
        lab_.popen("pub", argv, label="reflector").wait_for("ready", timeout=10)
        yield lab_
    finally:
        lab_.close()  # raises if a namespace of this lab survived
        assert not _namespaces_with(lab_.prefix)


def _namespaces_with(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def mapped_ports(nl, host: str, dests=ALL_DESTS) -> tuple[int, list[tuple[str, int]]]:
    """(local port, [mapped address per destination]) for one fresh socket in ``host``."""
    s = nl.udp_socket(host)
    return s.getsockname()[1], [natlab_tools.query(s, d).mapped for d in dests]


# ---------------------------------------------------------------------- topology


def test_topology_and_in_namespace_sockets(nl):
    out = nl.run("pub", ["ip", "-4", "-o", "addr", "show", "dev", "br0"]).stdout
    assert f"{S0}/24" in out and f"{S1}/24" in out
    for name, host in nl.hosts.items():
        assert f"inet {host.ip}/" in nl.run(name, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert nl.hosts["dup1"].ip == nl.hosts["pr1"].ip  # same LAN address, different sites
    # a socket from nl.socket lives in the namespace: the server address is bindable only there
    s = nl.socket("pub")
    s.bind((S1, 0))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as here, pytest.raises(OSError):
        here.bind((S1, 0))
    # IPv6 is off inside the lab (no link-local path around the NATs)
    assert "inet6" not in nl.run("pr1", ["ip", "-o", "addr"]).stdout


def test_unreserved_wan_site_shares_the_internet_with_the_others(nl):
    """A router on the unreserved subnet reaches the server and the other sites on-link, and its
    NAT shows the unreserved address (what STUN, and a port-mapping daemon, see)."""
    uw = nl.sites["uw"]
    assert uw.wan_ip == str(ipaddress.ip_network(natlab.UNRESERVED_NET)[natlab.ROUTER_IP_BASE + uw.index])
    _, mapped = mapped_ports(nl, "uw1")
    assert {ip for ip, _ in mapped} == {uw.wan_ip}
    pr = nl.sites["pr"]
    assert nl.run(pr.name, ["ping", "-c1", "-W2", uw.wan_ip], check=False).returncode == 0
    assert nl.run("uw", ["ping", "-c1", "-W2", pr.wan_ip], check=False).returncode == 0


# ---------------------------------------------------------------------- mapping


@pytest.mark.parametrize("nat", ["none", "full_cone", "restricted", "port_restricted"])
def test_endpoint_independent_mapping(nl, nat):
    site = nl.sites[BY_NAT[nat]]
    local, mapped = mapped_ports(nl, site.hosts[0].name)
    assert {ip for ip, _ in mapped} == {site.wan_ip}
    ports = {p for _, p in mapped}
    assert len(ports) == 1, f"{nat}: one socket must keep one mapping for all destinations: {mapped}"
    if nat == "none":
        assert ports == {local}
    else:
        # default: not port-preserving, so a fresh mapping is visible as a new port
        (port,) = ports
        assert port != local and natlab.MAPPED_PORTS[0] <= port <= natlab.MAPPED_PORTS[1]


def test_port_preserving_option(nl):
    local, mapped = mapped_ports(nl, "pp1")
    assert set(mapped) == {(nl.sites["pp"].wan_ip, local)}


def test_symmetric_sequential_mapping_counts_up(nl):
    site = nl.sites["ss"]
    _, mapped = mapped_ports(nl, "ss1")
    assert {ip for ip, _ in mapped} == {site.wan_ip}
    ports = [p for _, p in mapped]
    # a new port per destination, each the next value of the NAT's counter
    assert [b - a for a, b in zip(ports, ports[1:])] == [1, 1, 1], ports
    # the counter is shared: another socket's first flow takes the next port (port prediction)
    _, (nxt,) = mapped_ports(nl, "ss1", [ALL_DESTS[0]])
    assert nxt[1] == ports[-1] + 1


def test_symmetric_random_mapping(nl):
    site = nl.sites["sr"]
    _, mapped = mapped_ports(nl, "sr1")
    _, mapped2 = mapped_ports(nl, "sr1")
    assert {ip for ip, _ in mapped + mapped2} == {site.wan_ip}
    ports = [p for _, p in mapped + mapped2]
    assert len(set(ports)) == len(ports), f"a new mapping per flow: {ports}"
    steps = {b - a for a, b in zip(ports, ports[1:])}
    assert steps != {1}, f"random NAT must not count up: {ports}"


# ---------------------------------------------------------------------- filtering

# unsolicited source relative to the contacted (S0, 3478): itself, same IP other port, other IP
FILTER_CASES = [(S0, PORTS[0]), (S0, PORTS[1]), (S1, PORTS[0])]
EXPECTED_FILTER = {
    "none": (True, True, True),
    "full_cone": (True, True, True),  # endpoint-independent filtering
    "restricted": (True, True, False),  # address-dependent filtering
    "port_restricted": (True, False, False),  # address-and-port-dependent filtering
    "symmetric_sequential": (True, False, False),
    "symmetric_random": (True, False, False),
}


@pytest.mark.parametrize("nat", list(EXPECTED_FILTER))
def test_filtering(nl, nat):
    host = nl.sites[BY_NAT[nat]].hosts[0].name
    got = []
    for alt in FILTER_CASES:
        s = nl.udp_socket(host)  # fresh mapping per case: only (S0, 3478) was ever contacted
        got.append(natlab_tools.query(s, (S0, PORTS[0]), alt=alt).alt_received)
    assert tuple(got) == EXPECTED_FILTER[nat], f"{nat}: delivered {dict(zip(FILTER_CASES, got))}"


@pytest.mark.parametrize("nat,alt", [("full_cone", (S1, PORTS[1])), ("restricted", (S0, PORTS[1]))])
def test_inbound_flow_answers_from_same_mapping(nl, nat, alt):
    """After an unsolicited packet got in, the host's answer to it leaves from the same external
    address (the DNAT of the full-cone map is undone on the way out)."""
    s = nl.udp_socket(nl.sites[BY_NAT[nat]].hosts[0].name)
    first = natlab_tools.query(s, (S0, PORTS[0]))
    assert natlab_tools.query(s, (S0, PORTS[0]), alt=alt).alt_received
    assert natlab_tools.query(s, alt).mapped == first.mapped


def test_hole_punch_between_sites(nl):
    """A public peer reaches a port-restricted host only after the host sent to it first, and
    reaches a full-cone host as soon as the mapping exists."""
    peer = nl.udp_socket("n1", timeout=0.5)
    peer_addr = (nl.hosts["n1"].ip, peer.getsockname()[1])
    for nat, open_before in (("full_cone", True), ("port_restricted", False)):
        host = nl.udp_socket(nl.sites[BY_NAT[nat]].hosts[0].name, timeout=0.5)
        mapped = natlab_tools.query(host, (S0, PORTS[0])).mapped
        peer.sendto(b"knock", mapped)
        assert _recv_payload(host, b"knock") == open_before, nat
        host.sendto(b"punch", peer_addr)  # opens the port-restricted filter towards the peer
        assert _recv_payload(peer, b"punch")
        peer.sendto(b"knock2", mapped)
        assert _recv_payload(host, b"knock2"), nat


def _recv_payload(sock: socket.socket, payload: bytes, tries: int = 2) -> bool:
    for _ in range(tries):
        try:
            data, _ = sock.recvfrom(256)
        except (TimeoutError, socket.timeout):
            continue
        if data == payload:
            return True
    return False


# ---------------------------------------------------------------------- rebinding and expiry


@pytest.mark.parametrize("nat", ["none", "full_cone", "restricted", "port_restricted",
                                 "symmetric_sequential", "symmetric_random"])
def test_flush_conntrack_gives_new_mapping(nl, nat):
    site = nl.sites[BY_NAT[nat]]
    s = nl.udp_socket(site.hosts[0].name)
    before = natlab_tools.query(s, (S0, PORTS[0])).mapped
    assert natlab_tools.query(s, (S0, PORTS[0])).mapped == before  # stable while the mapping lives
    nl.flush_conntrack(site)
    after = natlab_tools.query(s, (S0, PORTS[0])).mapped
    if nat == "none":
        assert after == before
    else:
        assert after[0] == before[0] and after[1] != before[1], f"{nat}: {before} -> {after}"


@pytest.mark.parametrize("nat", ["full_cone", "port_restricted"])
def test_mapping_expires_with_lowered_timeout(nl, nat):
    site = nl.sites[BY_NAT[nat]]
    host = site.hosts[0].name
    nl.set_udp_timeouts(unreplied=1, stream=1, site=site)
    try:
        s = nl.udp_socket(host)
        before = natlab_tools.query(s, (S0, PORTS[0])).mapped
        time.sleep(2.5)  # longer than the 1 s lifetime: only ever makes expiry more certain
        after = natlab_tools.query(s, (S0, PORTS[0])).mapped
        assert after != before, f"{nat}: mapping survived its timeout"
        if nat == "full_cone":
            # the old external port no longer leads to the host
            s.settimeout(0.5)
            peer = nl.udp_socket("n1")
            peer.sendto(b"stale", before)
            assert not _recv_payload(s, b"stale", tries=1)
    finally:
        nl.set_udp_timeouts(30, 120, site=site)


# ---------------------------------------------------------------------- LAN


def test_lan_pair_talks_directly(nl):
    a, b = nl.udp_socket("pr1"), nl.udp_socket("pr2")
    b_addr = (nl.hosts["pr2"].ip, b.getsockname()[1])
    a.sendto(b"hello", b_addr)
    data, src = b.recvfrom(256)
    assert data == b"hello" and src == (nl.hosts["pr1"].ip, a.getsockname()[1])  # untranslated
    b.sendto(b"back", src)
    assert a.recvfrom(256) == (b"back", b_addr)


def test_sites_with_same_lan_subnet_are_separate(nl):
    _, (m_pr,) = mapped_ports(nl, "pr1", [ALL_DESTS[0]])
    _, (m_dup,) = mapped_ports(nl, "dup1", [ALL_DESTS[0]])
    assert m_pr[0] == nl.sites["pr"].wan_ip and m_dup[0] == nl.sites["dup"].wan_ip
    # dup1 sending to pr2's LAN address stays on dup's own LAN (where nobody has it)
    recv = nl.udp_socket("pr2", timeout=0.3)
    nl.udp_socket("dup1").sendto(b"wrong lan", (nl.hosts["pr2"].ip, recv.getsockname()[1]))
    assert not _recv_payload(recv, b"wrong lan", tries=1)


# ---------------------------------------------------------------------- controls


@pytest.mark.parametrize("site", ["pr", "n"])
def test_block_udp_leaves_tcp(nl, site):
    host = nl.sites[site].hosts[0].name
    nl.block_udp(site)
    try:
        with pytest.raises(TimeoutError):
            natlab_tools.query(nl.udp_socket(host), (S0, PORTS[0]), tries=2, wait=0.4)
        tcp = nl.socket(host, type=socket.SOCK_STREAM)
        assert natlab_tools.tcp_query(tcp, (S0, PORTS[0]))[0] == nl.sites[site].wan_ip
    finally:
        nl.block_udp(site, False)
    natlab_tools.query(nl.udp_socket(host), (S0, PORTS[0]))  # UDP flows again


def test_loss_drops_a_fraction(nl):
    n = 100
    nl.loss("pr", 30)  # each way: a round trip survives with p = 0.7 * 0.7 = 0.49
    try:
        lossy = _burst(nl, "pr1", n)
    finally:
        nl.loss("pr", 0)
    clean = _burst(nl, "pr1", n)
    assert 20 <= lossy <= 80, f"{lossy}/{n} answered at 30% loss each way"
    assert clean >= n - 2, f"{clean}/{n} answered without loss"


def _burst(nl, host: str, n: int, chunk: int = 25) -> int:
    """Send ``n`` distinct requests in chunks; count the answers (bounded waits)."""
    s = nl.udp_socket(host, timeout=0.4)
    answered = 0
    for base in range(0, n, chunk):
        tokens = {uuid.uuid4().hex[:12] for _ in range(chunk)}
        for t in tokens:
            s.sendto(f"NLQ1 {t}".encode(), (S0, PORTS[0]))
        while tokens:
            try:
                data, _ = s.recvfrom(256)
            except (TimeoutError, socket.timeout):
                break
            parts = data.split()
            if len(parts) == 4 and parts[1].decode() in tokens:
                tokens.discard(parts[1].decode())
                answered += 1
    return answered


# ---------------------------------------------------------------------- processes and cleanup


def test_processes_env_logs_and_cleanup_on_failure():
    lab.require_lab("conntrack")
    code = "import os, sys, time; print(os.environ['NATLAB_PROBE'], flush=True); " \
           "print('err-line', file=sys.stderr, flush=True); time.sleep(60)"
    with pytest.raises(RuntimeError, match="boom"):
        with natlab.NatLab() as nl2:
            nl2.add_site("x", "symmetric_random")
            prefix, log_dir = nl2.prefix, nl2.log_dir
            p = nl2.popen("x1", [sys.executable, "-c", code], env={"NATLAB_PROBE": "hello-env"},
                          label="probe")
            p.wait_for("hello-env", timeout=10)
            p.wait_for("err-line", timeout=10)
            assert p.poll() is None
            assert nl2.leftover_namespaces()  # sanity: the check sees live namespaces
            echoed = nl2.run("x1", ["sh", "-c", "echo $NATLAB_PROBE"], env={"NATLAB_PROBE": "x"})
            assert echoed.stdout == "x\n"
            raise RuntimeError("boom")
    assert p.poll() is not None, "process outlived the lab"
    assert not nl2.leftover_namespaces()
    assert not _namespaces_with(prefix)
    # logs are kept when the block failed, for debugging
    assert (log_dir / "probe.out").read_text() == "hello-env\n"
    assert "err-line" in (log_dir / "probe.err").read_text()
    shutil.rmtree(log_dir)
    # a clean exit removes the temporary log directory
    with natlab.NatLab() as nl3:
        nl3.popen("pub", ["true"], label="t").popen.wait(10)
        log_dir3 = nl3.log_dir
    assert not log_dir3.exists()


def test_wait_for_reports_early_exit():
    lab.require_lab("conntrack")
    with natlab.NatLab() as nl2:
        p = nl2.popen("pub", [sys.executable, "-c", "print('bye')"], label="short")
        with pytest.raises(RuntimeError, match="exited before"):
            p.wait_for("never printed", timeout=10)
        assert "bye" in p.stdout()
