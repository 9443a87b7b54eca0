"""Real programs nobody here wrote, across ``overlay up --tap`` nodes in the real-kernel NAT lab.

Two TAP nodes, each behind its own port-restricted NAT (``natlab``), started through the CLI and
joined to one network, hold ``ovl0`` with their virtual IPs. Across them:

1. **A game's LAN browser**: Debian's OpenArena dedicated server (the ioquake3 engine ``ioq3ded``
   through ``/usr/games/openarena-server``) runs headless on one host; the other host finds it the
   way the game client's "Local" server list does (``CL_LocalServers``): the connectionless packet
   ``\\xff\\xff\\xff\\xffgetinfo xxx`` broadcast to 255.255.255.255, ports 27960-27963. The
   ``infoResponse`` must come from the server's virtual IP with the challenge, host name and map;
   a getinfo to the pool's broadcast address 100.127.255.255 finds it too.
2. **mDNS / DNS-SD**: an ``avahi-daemon`` (with its own D-Bus daemon, run directory and services
   directory, all private to the host) on each host, bound to ``ovl0``; a static service published
   on one is resolved by ``avahi-browse -rtp`` on the other, with the first node's virtual IP.
3. **IPX**: Ethernet II (0x8137), 802.2 LLC (DSAP/SSAP 0xE0) and raw 802.3 (0xFFFF) IPX frames sent
   with an AF_PACKET socket on one ``ovl0`` to the broadcast MAC (short ones, long ones, one as
   large as the MTU allows, and one unicast to the peer's MAC) arrive byte-identical on the
   other's (an ETH_P_ALL socket); frames under 60 bytes arrive without padding.

Each program's missing piece skips its test with the reason (``apt-get install openarena-server
avahi-daemon avahi-utils dbus-daemon``). Namespaces share the filesystem, so every path a program
writes is per host, under this module's temporary directory; programs that insist on fixed paths
(avahi's pid file and services directory) get a private mount namespace with a tmpfs / bind mount.
Every wait is bounded; every process is stopped by its test and again by the lab on exit.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import lab
import lab_overlay
import natlab
from lab_overlay import LabNode, OverlayLab

pytestmark = pytest.mark.netns

DEV = "ovl0"


@dataclass
class Pair:
    nl: natlab.NatLab
    ol: OverlayLab
    a: LabNode          # alice in host a1
    b: LabNode          # bob in host b1
    vip_a: str
    vip_b: str
    tmp: Path           # per-module scratch (homes of the programs, configs, sockets)


def _dev_addr(nl: natlab.NatLab, host: str) -> str | None:
    """The IPv4 address ``ovl0`` holds in ``host`` (None while absent or down)."""
    r = nl.run(host, ["ip", "-4", "-o", "addr", "show", "dev", DEV, "up"], check=False, timeout=5)
    for line in r.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    return None


@pytest.fixture(scope="module")
def pair():
    lab.require_lab("conntrack", "tun")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    tmp = Path(tempfile.mkdtemp(prefix="ovtap-"))   # short: Unix socket paths live here
    try:
        nl.add_site("a", "port_restricted")
        nl.add_site("b", "port_restricted")
        ol.start_server()
        a = ol.start_node("a1", "alice", "--tap")
        b = ol.start_node("b1", "bob", "--tap")
        ol.pair(a, b, "lan")
        ol.wait(lambda: a.path_to("bob", direct=True) and b.path_to("alice", direct=True), 25,
                "alice <-> bob direct")
        vip_a = ol.wait(lambda: a.status()["node"].get("virtual_ip"), 10, "alice's virtual IP")
        vip_b = ol.wait(lambda: b.status()["node"].get("virtual_ip"), 10, "bob's virtual IP")
        ol.wait(lambda: _dev_addr(nl, "a1") == vip_a, 10, f"{DEV} in a1 holding {vip_a}")
        ol.wait(lambda: _dev_addr(nl, "b1") == vip_b, 10, f"{DEV} in b1 holding {vip_b}")
        for host in ("a1", "b1"):   # as root the node routes limited broadcast to the overlay
            ol.wait(lambda: f"dev {DEV} " in nl.run(host, ["ip", "-4", "route", "get", "255.255.255.255"],
                                                    check=False, timeout=5).stdout,
                    10, f"{host}: route 255.255.255.255/32 dev {DEV}")
        yield Pair(nl, ol, a, b, vip_a, vip_b, tmp)
    finally:
        ol.close()
        nl.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _host_dir(p: Pair, test: str, host: str) -> Path:
    d = p.tmp / test / host
    d.mkdir(parents=True, exist_ok=True)
    return d


def _logs(*procs: natlab.Proc, tail: int = 3000) -> str:
    return "\n".join(f"--- {pr.name} (rc {pr.poll()})\n{(pr.stdout() + pr.stderr())[-tail:]}" for pr in procs)


# ---------------------------------------------------------------------- 1. a game's LAN browser

OPENARENA = "/usr/games/openarena-server"          # Debian's wrapper: ioq3ded + the baseoa data
OPENARENA_DATA = "/usr/lib/openarena-server/baseoa/pak0.pk3"
Q3_PORT = 27960                                    # PORT_SERVER; the LAN browser tries 4 ports from it
Q3_MAP = "oa_dm1"                                  # in pak1-maps.pk3 (openarena-data)
POOL_BROADCAST = "100.127.255.255"                 # broadcast address of the pool 100.64.0.0/10


def _q3_info(packet: bytes) -> dict[str, str] | None:
    """The info string of a connectionless ``infoResponse`` (``\\key\\value...``), else None."""
    head = b"\xff\xff\xff\xffinfoResponse\n"
    if not packet.startswith(head):
        return None
    fields = packet[len(head):].decode("latin-1").split("\\")
    if fields and fields[0] == "":
        fields = fields[1:]
    return dict(zip(fields[0::2], fields[1::2]))


def _getinfo_until(sock: socket.socket, targets: list[tuple[str, int]], timeout: float) -> tuple[dict, tuple]:
    """Send ``getinfo xxx`` to ``targets`` every second, like a refreshing server browser, until an
    infoResponse arrives (bounded); return (info, sender)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        for t in targets:
            sock.sendto(b"\xff\xff\xff\xffgetinfo xxx", t)
        resend = min(deadline, time.monotonic() + 1.0)
        while time.monotonic() < resend:
            sock.settimeout(max(0.05, resend - time.monotonic()))
            try:
                data, addr = sock.recvfrom(4096)
            except (TimeoutError, socket.timeout):
                break
            info = _q3_info(data)
            if info is not None:
                return info, addr
            seen.append((addr, data[:60]))
    raise AssertionError(f"no infoResponse to getinfo within {timeout:.0f} s (other datagrams: {seen[:5]})")


def test_openarena_server_found_by_lan_broadcast(pair: Pair):
    """The OpenArena LAN browser's broadcast from bob's host finds the dedicated server at alice's."""
    for path in (OPENARENA, OPENARENA_DATA, "/usr/bin/timeout"):
        if not os.path.exists(path):
            pytest.skip(f"needs {path} (apt-get install openarena-server openarena-data)")
    nl = pair.nl
    home = _host_dir(pair, "openarena", "a1")
    hostname = f"ovl-{os.urandom(4).hex()}"
    srv = nl.popen("a1", [
        "timeout", "90", OPENARENA,               # bounded lifetime whatever happens to this test
        "+set", "dedicated", "1",                 # LAN server: no master server heartbeats
        "+set", "net_enabled", "1",               # IPv4 only (the lab has no IPv6)
        "+set", "net_port", str(Q3_PORT),
        "+set", "sv_hostname", hostname,
        "+set", "com_homepath", "oa",             # $HOME/oa: configs and logs stay in our temp dir
        "+map", Q3_MAP,
    ], env={"HOME": str(home)}, label="openarena-server")
    try:
        # first the server itself, from its own host: a failure here is the game's, not the overlay's
        local = nl.socket("a1")
        local.bind(("127.0.0.1", 0))
        try:
            info, _ = _getinfo_until(local, [("127.0.0.1", Q3_PORT)], 25)
        except AssertionError as e:
            raise AssertionError(f"the OpenArena server did not come up in a1: {e}\n{_logs(srv)}") from None
        assert info.get("hostname") == hostname, info

        # then the LAN browser in bob's host: limited broadcast, the four ports the client tries
        client = nl.socket("b1")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        client.bind(("0.0.0.0", 0))
        targets = [("255.255.255.255", Q3_PORT + i) for i in range(4)]
        t0 = time.monotonic()
        try:
            info, addr = _getinfo_until(client, targets, 15)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{_logs(srv)}\n{pair.ol.dump()}") from None
        print(f"\nOpenArena ({info.get('version', 'ioq3ded')}) found over the overlay in "
              f"{(time.monotonic() - t0) * 1000:.0f} ms: {addr} {info}")
        assert addr == (pair.vip_a, Q3_PORT), f"answer from {addr}, expected alice's {pair.vip_a}:{Q3_PORT}"
        assert info.get("challenge") == "xxx", info
        assert info.get("hostname") == hostname, info
        assert info.get("mapname") == Q3_MAP, info
        assert info.get("clients") == "0", info

        # games that broadcast on the interface's own broadcast address (the pool's) find it too
        info, addr = _getinfo_until(client, [(POOL_BROADCAST, Q3_PORT)], 10)
        assert addr == (pair.vip_a, Q3_PORT) and info.get("hostname") == hostname, (addr, info)
    finally:
        srv.stop()


# ---------------------------------------------------------------------- 2. avahi (mDNS / DNS-SD)

SERVICE_TYPE = "_overlaytest._tcp"
SERVICE_PORT = 4242

DBUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

AVAHI_CONF = """[server]
host-name={hostname}
domain-name=local
use-ipv4=yes
use-ipv6=no
allow-interfaces={dev}
enable-dbus=yes
ratelimit-interval-usec=1000000
ratelimit-burst=1000

[wide-area]
enable-wide-area=no

[publish]
publish-hinfo=no
publish-workstation=no
publish-addresses=yes

[reflector]
enable-reflector=no

[rlimits]
"""

SERVICE_XML = """<?xml version="1.0" standalone='no'?>
<!DOCTYPE service-group SYSTEM "avahi-service.dtd">
<service-group>
  <name>{name}</name>
  <service>
    <type>{type}</type>
    <port>{port}</port>
    <txt-record>token={token}</txt-record>
  </service>
</service-group>
"""


@dataclass
class Avahi:
    dbus: natlab.Proc
    daemon: natlab.Proc
    bus: str          # DBUS_SYSTEM_BUS_ADDRESS for clients


def _start_avahi(p: Pair, host: str, hostname: str, services: dict[str, str],
                 procs: list[natlab.Proc]) -> Avahi:
    """A private D-Bus system bus and an avahi-daemon on ``ovl0`` in ``host``. avahi-daemon keeps its
    pid file in /run/avahi-daemon and reads /etc/avahi/services, fixed paths every host would share:
    it runs in its own mount namespace with a tmpfs on /run and a per-host services directory."""
    d = _host_dir(p, "avahi", host)
    sock = d / "bus"
    (d / "dbus.conf").write_text(DBUS_CONF.format(socket=sock))
    (d / "avahi-daemon.conf").write_text(AVAHI_CONF.format(hostname=hostname, dev=DEV))
    svc = d / "services"
    svc.mkdir(exist_ok=True)
    for fname, text in services.items():
        (svc / fname).write_text(text)
    bus = f"unix:path={sock}"
    dbus = p.nl.popen(host, ["dbus-daemon", f"--config-file={d / 'dbus.conf'}", "--nofork", "--print-address"],
                      label=f"dbus-{host}")
    procs.append(dbus)
    try:
        dbus.wait_for(bus, timeout=10)
    except (RuntimeError, TimeoutError) as e:
        raise AssertionError(f"private dbus-daemon in {host} did not start: {e}") from None
    script = ("set -e; mount -t tmpfs -o size=1m,mode=755 ovl-avahi-run /run; "
              f"mount --bind {svc} /etc/avahi/services; "
              f"exec avahi-daemon --file={d / 'avahi-daemon.conf'} --no-drop-root --no-chroot --no-rlimits "
              "--no-proc-title")
    daemon = p.nl.popen(host, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                        env={"DBUS_SYSTEM_BUS_ADDRESS": bus}, label=f"avahi-{host}")
    procs.append(daemon)
    return Avahi(dbus, daemon, bus)


def _browse(p: Pair, host: str, bus: str, last: list[str]) -> list[list[str]]:
    """``avahi-browse -rtp _overlaytest._tcp`` in ``host``: the resolved ("=") records, split
    (``last`` keeps the raw output for the failure message)."""
    r = p.nl.run(host, ["timeout", "10", "avahi-browse", "-rtp", SERVICE_TYPE],
                 env={"DBUS_SYSTEM_BUS_ADDRESS": bus}, check=False, timeout=15)
    last[:] = [f"avahi-browse rc {r.returncode}:\n{r.stdout}{r.stderr}"]
    return [line.split(";") for line in r.stdout.splitlines() if line.startswith("=;")]


def test_avahi_service_resolved_across_tap(pair: Pair):
    """A DNS-SD service published by avahi at alice's is browsed and resolved by avahi at bob's."""
    for tool in ("avahi-daemon", "avahi-browse", "dbus-daemon", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (apt-get install avahi-daemon avahi-utils dbus-daemon util-linux)")
    token = os.urandom(6).hex()
    name = f"overlay-test-{token}"   # no spaces: avahi-browse -p prints them as \032
    host_a, host_b = f"ovl-alice-{token[:4]}", f"ovl-bob-{token[:4]}"
    procs: list[natlab.Proc] = []
    try:
        av_a = _start_avahi(pair, "a1", host_a, {
            "overlaytest.service": SERVICE_XML.format(name=name, type=SERVICE_TYPE, port=SERVICE_PORT,
                                                      token=token)}, procs)
        av_b = _start_avahi(pair, "b1", host_b, {}, procs)
        try:
            for av in (av_a, av_b):
                av.daemon.wait_for("Server startup complete", timeout=15)
            av_a.daemon.wait_for("successfully established", timeout=15)   # probed and announced
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"avahi did not start: {e}\n{_logs(*procs)}") from None
        t0 = time.monotonic()
        found: list[list[str]] = []
        last: list[str] = []

        def resolved():
            found[:] = [rec for rec in _browse(pair, "b1", av_b.bus, last) if rec[3] == name]
            return found
        lab_overlay.wait(resolved, 20, f"avahi-browse in b1 resolving {name!r}", interval=0.2,
                         on_fail=lambda: f"{''.join(last)}\n{_logs(*procs)}\n{pair.ol.dump()}")
        print(f"\navahi at bob resolved alice's service in {(time.monotonic() - t0) * 1000:.0f} ms: {found}")
        rec = found[0]
        # =;IFACE;PROTO;NAME;TYPE;DOMAIN;HOSTNAME;ADDRESS;PORT;TXT
        assert rec[1] == DEV and rec[2] == "IPv4", rec
        assert rec[4] == SERVICE_TYPE and rec[5] == "local", rec
        assert rec[6] == f"{host_a}.local", rec
        assert rec[7] == pair.vip_a, f"resolved to {rec[7]}, expected alice's virtual IP {pair.vip_a}: {rec}"
        assert rec[8] == str(SERVICE_PORT), rec
        assert rec[9] == f'"token={token}"', rec
        # and the reverse direction knows bob's host by its virtual IP (A record over mDNS)
        r = pair.nl.run("a1", ["timeout", "10", "avahi-resolve", "-4", "-n", f"{host_b}.local"],
                        env={"DBUS_SYSTEM_BUS_ADDRESS": av_a.bus}, check=False, timeout=15)
        assert r.stdout.split() == [f"{host_b}.local", pair.vip_b], f"{r.stdout}{r.stderr}\n{_logs(*procs)}"
    finally:
        for pr in procs:
            pr.stop()


# ---------------------------------------------------------------------- 3. IPX frames

ETH_P_ALL = 0x0003
ETH_P_IPX = 0x8137
PACKET_HOST, PACKET_BROADCAST, PACKET_OUTGOING = 0, 1, 4
ETH_MIN = 60   # a minimum Ethernet frame without FCS: shorter ones may be zero-padded to it


def _ipx(payload: bytes, src_node: bytes) -> bytes:
    """An IPX header (checksum 0xFFFF, length, hops 0, type 4 = PEP) to the broadcast node of
    network 0, socket 0x4000, then ``payload``."""
    return struct.pack(">HHBB4s6sH4s6sH", 0xFFFF, 30 + len(payload), 0, 4,
                       b"\0\0\0\0", b"\xff" * 6, 0x4000, b"\0\0\0\0", src_node, 0x4001) + payload


def _frames(src_mac: bytes, peer_mac: bytes, mtu: int) -> dict[str, tuple[bytes, int]]:
    """The three IPX framings to the broadcast MAC, each with a long and a short (< 60 bytes)
    random payload, one Ethernet II frame as large as the device's MTU allows, and one unicast to
    the peer's MAC: label -> (frame, the packet type the receiver must see)."""
    out = {}
    dst = b"\xff" * 6
    for size, tag in ((300, "long"), (4, "short")):
        eth2 = dst + src_mac + struct.pack(">H", ETH_P_IPX) + _ipx(os.urandom(size), src_mac)
        llc_body = b"\xe0\xe0\x03" + _ipx(os.urandom(size), src_mac)   # 802.2 LLC: DSAP E0, SSAP E0, UI
        llc = dst + src_mac + struct.pack(">H", len(llc_body)) + llc_body
        raw_body = _ipx(os.urandom(size), src_mac)                     # "raw 802.3": IPX right away
        raw = dst + src_mac + struct.pack(">H", len(raw_body)) + raw_body
        out[f"ethernet_ii-{tag}"] = (eth2, PACKET_BROADCAST)
        out[f"802.2_llc-{tag}"] = (llc, PACKET_BROADCAST)
        out[f"802.3_raw-{tag}"] = (raw, PACKET_BROADCAST)
    out["ethernet_ii-mtu"] = (dst + src_mac + struct.pack(">H", ETH_P_IPX) + _ipx(os.urandom(mtu - 30), src_mac),
                              PACKET_BROADCAST)
    out["ethernet_ii-unicast"] = (peer_mac + src_mac + struct.pack(">H", ETH_P_IPX)
                                  + _ipx(os.urandom(100), src_mac), PACKET_HOST)
    return out


def test_ipx_frames_cross_byte_identical(pair: Pair):
    """IPX in its three Ethernet framings, broadcast on alice's ovl0 (and once unicast to bob's MAC),
    reaches bob's ovl0 unchanged."""
    nl = pair.nl
    rx = nl.socket("b1", socket.AF_PACKET, socket.SOCK_RAW)
    rx.bind((DEV, ETH_P_ALL))          # every frame of b1's ovl0, 802.3 length-field frames too
    tx = nl.socket("a1", socket.AF_PACKET, socket.SOCK_RAW)
    tx.bind((DEV, ETH_P_IPX))
    src_mac = tx.getsockname()[4]      # ovl0's MAC: a TAP peer only accepts frames from the node's own
    mtu = int(nl.run("a1", ["cat", f"/sys/class/net/{DEV}/mtu"], timeout=5).stdout)
    frames = _frames(src_mac, rx.getsockname()[4], mtu)
    padded = {}
    for label, (frame, pkttype) in frames.items():
        got = None
        for _attempt in range(3):     # a lost UDP datagram is not the product's fault: resend twice
            tx.send(frame)
            deadline = time.monotonic() + 2.0
            while got is None and time.monotonic() < deadline:
                rx.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    data, addr = rx.recvfrom(65535)
                except (TimeoutError, socket.timeout):
                    break
                if addr[2] == PACKET_OUTGOING or data[6:12] != src_mac:
                    continue
                if data[14:] and frame[-8:] in data:   # the random payload's tail identifies it
                    got = (data, addr)
            if got is not None:
                break
        assert got is not None, f"{label}: frame {frame.hex()} never reached b1's {DEV}\n{pair.ol.dump()}"
        data, addr = got
        assert addr[0] == DEV and addr[2] == pkttype and addr[4] == src_mac, (label, addr)
        if data != frame:
            pad = data[len(frame):]
            assert data[:len(frame)] == frame, (f"{label}: frame changed on the way\n sent {frame.hex()}\n"
                                                f"  got {data.hex()}")
            assert len(frame) < ETH_MIN and len(data) == ETH_MIN and pad == bytes(len(pad)), (
                f"{label}: {len(pad)} unexpected trailing bytes {pad.hex()} after a {len(frame)}-byte frame")
            padded[label] = len(pad)
    print(f"\nIPX frames received intact on b1's {DEV} (MTU {mtu}): {sorted(frames)}; "
          f"zero-padded to {ETH_MIN} bytes on the way: {padded or 'none (all byte-identical)'}")
