"""Real-kernel NAT lab: network namespaces + veth + nftables NATs of every RFC 4787 class.

The traversal tests start real ``overlay`` processes inside this lab, so the lab itself is proven by
``tests/lab/test_natlab.py`` (each NAT type behaves as labelled). Needs root, ``ip``, ``nft`` and
``conntrack``; call ``lab.require_lab("conntrack")`` first so tests skip elsewhere.

Topology (every address lives only inside the namespaces the lab creates)::

    [a1]──┐                                   ┌── 198.51.100.10, .11  (pub: server, STUN)
    [a2]──┴─ lan bridge ─[router a: NAT]─ wan ┤
                  10.0.1.0/24       198.51.100.101         br0 (pub's bridge = "the Internet")
    [b1]──── lan bridge ─[router b: NAT]─ wan ┤
                  10.0.2.0/24       198.51.100.102
    [n1] ──────────────────────────── eth0 ───┘  198.51.100.201 (nat "none": directly public)

    (a router of ``add_site(..., unreserved_wan=True)`` sits on the same bridge at 11.11.0.(101 + k),
    ``UNRESERVED_NET``: every namespace on the bridge reaches both subnets on-link)

Usage (the ``overlay`` command lines are illustrative)::

    import lab, natlab
    lab.require_lab("conntrack")
    with natlab.NatLab() as nl:                        # unique namespace names; all deleted on exit
        a = nl.add_site("a", "port_restricted", hosts=2)   # hosts "a1", "a2" (a LAN pair)
        b = nl.add_site("b", "symmetric_sequential")       # host "b1"
        srv = nl.popen("pub", [sys.executable, "-m", "overlay", "server",
                               "--listen", f"{natlab.SERVER_IPS[0]}:7000"], label="server")
        srv.wait_for("listening", timeout=10)         # bounded; raises with both captured logs
        node = nl.popen("a1", [sys.executable, "-m", "overlay", "up", ...],
                        env={"OVERLAY_HOME": "/tmp/x"})   # added to this process's environment
        nl.hosts["a1"].ip, a.wan_ip, b.hosts[0].name   # "10.0.1.2", "198.51.100.101", "b1"
        nl.flush_conntrack("a")                        # router reboot: new mappings (rebinding)
        nl.set_udp_timeouts(unreplied=3, stream=5)     # short mapping lifetime (keepalive tests)
        nl.loss("b", 20)                               # 20 % UDP loss on b's WAN, each direction
        nl.block_udp("b")                              # only TCP leaves b (relay-over-TCP case)
        sock = nl.udp_socket("b1")                     # a socket living in b1's namespace, usable here
        nl.run("a1", ["ping", "-c1", "-W1", b.wan_ip]).check_returncode()
        print(node.stdout(), node.stderr())            # also in nl.log_dir/<label>.out|.err

Node names for ``run``/``popen``/``socket``: ``"pub"``, a host (``"a1"``) or a site (its router).
Loss and UDP blocking act on the wire (pub's bridge port of the site), invisible to the machines.

NAT types (``nat=`` of ``add_site``; RFC 4787 terms, mapping / filtering):

- ``none``: the hosts sit directly on the public link with public addresses (no NAT).
- ``full_cone``: endpoint-independent mapping and filtering: once a host sent from a port, anyone
  may send to its external port. nftables has no such NAT, so it is built: after masquerade a
  dynamic map records external port -> internal ip:port, and UDP arriving on the WAN is DNATed
  through that map.
- ``restricted``: endpoint-independent mapping, address-dependent filtering (the full-cone map, plus
  a dynamic set of the remote addresses each external port has sent to).
- ``port_restricted``: endpoint-independent mapping, address-and-port-dependent filtering: plain
  Linux ``masquerade``, like most home routers.
- ``symmetric_sequential``: address-and-port-dependent mapping; every new UDP flow takes the next
  port of one counter shared by the whole router (``numgen inc``, from ``SEQUENTIAL_BASE``):
  predictable ports, as long as nobody else behind that router opens flows meanwhile.
- ``symmetric_random``: address-and-port-dependent mapping with random ports (``fully-random``).

Mapped ports: NATs other than ``none`` do NOT preserve the local port by default: new mappings take
a random port in ``MAPPED_PORTS`` (so ``flush_conntrack`` or a mapping expiry visibly changes the
external address, as after a router reboot). ``add_site(..., preserve_ports=True)`` gives the
port-preserving behaviour of plain masquerade instead (not for the symmetric types).

The special filtering of ``full_cone``/``restricted`` and the counter of ``symmetric_sequential``
apply to UDP; TCP (and ICMP) leave every NAT through plain masquerade. Routers drop unsolicited
packets to themselves silently (no ICMP port unreachable), like home routers; they answer ping.

Dual-stack sites (``add_site(..., ipv6=True)``, NAT sites only): pub's bridge also carries
``PUBLIC_NET6`` (2001:db8:ffff::/64, documentation space) with the server's ``SERVER_IPS6`` and pub
routing between sites (the ISP core); the router gets ``2001:db8:ffff::<101 + k>`` on its WAN and
routes the LAN prefix ``2001:db8:<k + 1>::/64`` to its hosts (``Host.ip6``: ``::2``, ``::3``...)
without NAT66, behind a stateful ip6 firewall like a home router's: established / related flows
in, ICMPv6 errors in, everything else unsolicited from the WAN dropped. So IPv6 between two
dual-stack sites needs hole punching too (without a NAT in the way: ports stay as bound).
``block_ipv4(site)`` drops the site's IPv4 on the wire (an IPv6-only uplink).

Known limits: IPv6 is disabled in every namespace of an IPv4-only site (no link-local path sneaks
around the NATs); no hairpinning (a host cannot reach its own NAT's public address); the full-cone/restricted
filter entries live for the ``stream`` timeout after the last outbound packet, slightly longer than
the conntrack mapping itself when it was never answered.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

from lab import Netns, sh
from polling import wait

NAT_TYPES = (
    "none",
    "full_cone",
    "restricted",
    "port_restricted",
    "symmetric_sequential",
    "symmetric_random",
)
SERVER_IPS = ("198.51.100.10", "198.51.100.11")
PUBLIC_NET = "198.51.100.0/24"
SERVER_IPS6 = ("2001:db8:ffff::10",)
PUBLIC_NET6 = "2001:db8:ffff::/64"
PUB_GW6 = "2001:db8:ffff::1"  # pub itself: the core router between dual-stack sites
# A second "Internet" subnet on pub's bridge, outside every range reserved for documentation or
# private use: routers of ``add_site(..., unreserved_wan=True)`` take their WAN address from it
# (router k: 11.11.0.(101 + k)), for daemons that refuse to work behind a reserved address
# (Debian 12's miniupnpd). Every namespace on the bridge reaches both subnets on-link; no packet
# leaves the lab's namespaces.
UNRESERVED_NET = "11.11.0.0/24"
ROUTER_IP_BASE = 101  # router k gets 198.51.100.(101 + k)
PUBLIC_HOST_IP_BASE = 201  # public ("none") host k gets 198.51.100.(201 + k)
MAPPED_PORTS = (20000, 29999)  # external ports of non-preserving EIM NATs
SEQUENTIAL_BASE = 40000  # symmetric_sequential hands out SEQUENTIAL_BASE + (counter mod SEQUENTIAL_SPAN)
SEQUENTIAL_SPAN = 1000
DEFAULT_UDP_TIMEOUTS = (30, 120)  # Linux nf_conntrack_udp_timeout / _stream defaults
NS_PREFIX = "ovnat"  # every lab namespace name starts with this, then the lab id

_WAN = "wan"  # router's public interface (names are per namespace, so they can repeat)
_LAN = "lan"  # router's LAN bridge


def _fixed_mac() -> str:
    """A random locally administered unicast MAC, set on a bridge so it never changes."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)
_ETH = "eth0"  # a host's only interface
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


@dataclass
class Host:
    """A machine: a namespace with one interface, behind its site's NAT (or public for ``none``)."""

    name: str
    ip: str
    ns: Netns
    site: "Site"
    ip6: str | None = None  # global IPv6 address on a dual-stack site


@dataclass
class Site:
    """A NAT router (absent for ``none``) and the hosts behind it."""

    name: str
    nat: str
    index: int
    wan_ip: str  # the public address the site's traffic comes from (router, or first host for none)
    lan: ipaddress.IPv4Network | None
    router: Netns | None
    preserve_ports: bool
    hosts: list[Host] = field(default_factory=list)
    pub_ports: list[str] = field(default_factory=list)  # the site's ports on pub's bridge
    udp_blocked: bool = False
    ipv4_blocked: bool = False
    lan6: ipaddress.IPv6Network | None = None  # dual-stack sites: the routed LAN prefix
    wan_ip6: str | None = None
    loss_percent: float = 0.0
    loss_udp_only: bool = True


class Proc:
    """A process started by ``NatLab.popen``: output captured to files, killed when the lab closes."""

    def __init__(self, name: str, popen: subprocess.Popen, stdout_path: Path, stderr_path: Path):
        self.name = name
        self.popen = popen
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        """Both captured streams, for assertion messages."""
        return (
            f"--- {self.name} (pid {self.pid}, rc {self.poll()}) stdout:\n{self.stdout()}"
            f"--- {self.name} stderr:\n{self.stderr()}"
        )

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        """Wait (bounded) until ``text`` appears in stdout or stderr; raise with the logs if not
        (RuntimeError at once if the process exited without printing it)."""
        def printed() -> bool:
            exited = self.poll() is not None  # read before the logs: no race with a last line
            if text in self.stdout() or text in self.stderr():
                return True
            if exited:
                raise RuntimeError(f"{self.name} exited before printing {text!r}\n{self.describe()}")
            return False
        wait(printed, timeout, f"{self.name} to print {text!r}", interval=0.02, on_fail=self.describe)

    def stop(self, timeout: float = 3.0) -> int:
        """SIGTERM the process group, SIGKILL it after ``timeout``; return the exit code."""
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(timeout)
        # children that outlived the leader still belong to its group
        self._signal(signal.SIGKILL)
        return self.popen.returncode

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)  # start_new_session: the group id is our pid
        except ProcessLookupError:
            pass


class NatLab:
    """Builds the lab; use as a context manager (or call ``close()``): everything goes on exit.

    ``log_dir``: where process output goes; by default a temporary directory that is removed on a
    clean exit and kept (its path printed to stderr) when the ``with`` block raised.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None):
        self.id = uuid.uuid4().hex[:6]
        self.prefix = f"{NS_PREFIX}{self.id}-"
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix=f"natlab-{self.id}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.sites: dict[str, Site] = {}
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[Netns] = []
        self._procs: list[Proc] = []
        self._sockets: list[socket.socket] = []
        self._udp_timeouts = DEFAULT_UDP_TIMEOUTS
        self._pub_ports = 0  # bridge ports made so far (names p0, p1...)
        self._pub_ipv6 = False  # pub carries PUBLIC_NET6 (since the first dual-stack site)
        self._closed = False
        try:
            self.pub = self._netns("pub")
            self._ip(
                self.pub,
                # A bridge without an address of its own takes its lowest port's MAC, and changes it
                # when ports come and go: every neighbour's ARP entry for the server then points at
                # a MAC nobody has, and the whole lab goes silent for the ARP cache's lifetime.
                f"link add br0 address {_fixed_mac()} type bridge",
                *(f"addr add {ip}/24 dev br0" for ip in SERVER_IPS),
                "link set br0 up",
                f"route add {UNRESERVED_NET} dev br0",
            )
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ building

    def add_site(
        self,
        name: str,
        nat: str,
        hosts: int = 1,
        lan_subnet: str | None = None,
        preserve_ports: bool = False,
        ipv6: bool = False,
        unreserved_wan: bool = False,
    ) -> Site:
        """Add a site: a router with NAT ``nat`` (see module doc) and ``hosts`` hosts behind it.

        Hosts are named ``f"{name}{i}"`` from 1 and addressed ``.2``, ``.3``... of ``lan_subnet``
        (default ``10.0.<site number>.0/24``; give two sites the same subnet to model the common
        "both LANs are 192.168.1.0/24" trap). For ``none`` hosts get public addresses instead.
        ``ipv6``: a dual-stack site (see the module doc; not for ``none``).
        ``unreserved_wan``: the router's WAN address comes from ``UNRESERVED_NET`` instead of
        ``PUBLIC_NET`` (its NAT then shows that address to the world).
        """
        if nat not in NAT_TYPES:
            raise ValueError(f"unknown NAT type {nat!r}; choose from {NAT_TYPES}")
        if not 1 <= hosts <= 50:
            raise ValueError("a site has 1..50 hosts")
        if ipv6 and nat == "none":
            raise ValueError("dual-stack sites have a router: not for nat 'none'")
        if preserve_ports and nat.startswith("symmetric"):
            raise ValueError("symmetric NATs choose their own ports; preserve_ports does not apply")
        if not name.isalnum() or len(name) > 8 or name in self.sites or name == "pub":
            raise ValueError(f"site name {name!r} must be new, alphanumeric, at most 8 characters")
        clash = {f"{name}{i}" for i in range(1, hosts + 1)} & (set(self.hosts) | set(self.sites))
        if clash or name in self.hosts:
            raise ValueError(f"site {name!r}: names {sorted(clash) or [name]} already taken")
        index = len(self.sites)
        if index >= PUBLIC_HOST_IP_BASE - ROUTER_IP_BASE:
            raise ValueError("too many sites")  # router addresses would run into the public hosts'
        if nat == "none":
            site = Site(name, nat, index, "", None, None, preserve_ports)
            self.sites[name] = site
            for i in range(1, hosts + 1):
                ip = self._public_host_ip()
                site.hosts.append(self._attach_public_host(site, f"{name}{i}", ip))
            site.wan_ip = site.hosts[0].ip
        else:
            lan = ipaddress.IPv4Network(lan_subnet or f"10.0.{index + 1}.0/24")
            if lan.num_addresses < hosts + 3 or lan.overlaps(ipaddress.IPv4Network(PUBLIC_NET)):
                raise ValueError(f"LAN {lan} too small or overlapping the public network")
            net = UNRESERVED_NET if unreserved_wan else PUBLIC_NET
            wan_ip = str(ipaddress.IPv4Network(net)[ROUTER_IP_BASE + index])
            router = self._netns(f"{name}-nat")
            site = Site(name, nat, index, wan_ip, lan, router, preserve_ports)
            self.sites[name] = site
            site.pub_ports.append(self._link_to_pub(router, _WAN, wan_ip))
            gw = lan[1]
            self._ip(
                router,
                f"link add {_LAN} address {_fixed_mac()} type bridge",
                f"addr add {gw}/{lan.prefixlen} dev {_LAN}",
                f"link set {_LAN} up",
            )
            router.sysctl("net.ipv4.ip_forward", "1")
            for i in range(1, hosts + 1):
                hname = f"{name}{i}"
                ns = self._netns(hname)
                port = f"h{i}"
                sh("ip", "link", "add", _ETH, "netns", ns.name, "type", "veth", "peer", "name", port,
                   "netns", router.name)
                self._ip(router, f"link set {port} master {_LAN}", f"link set {port} up")
                ip = str(lan[i + 1])
                self._ip(
                    ns,
                    f"addr add {ip}/{lan.prefixlen} dev {_ETH}",
                    f"link set {_ETH} up",
                    f"route add default via {gw}",
                )
                host = Host(hname, ip, ns, site)
                site.hosts.append(host)
                self.hosts[hname] = host
            router.nft(_nat_ruleset(site, self._udp_timeouts[1]))
            self._apply_sysctl_timeouts(router)
            if ipv6:
                self._dual_stack(site)
        self._load_controls(site)
        return site

    def _dual_stack(self, site: Site) -> None:
        """IPv6 for a NAT site: a routed /64 on the LAN, the router's WAN address on pub's bridge,
        pub's route to the prefix, and the router's stateful ip6 firewall (no NAT66)."""
        if not self._pub_ipv6:
            self._pub_ipv6 = True
            _enable_ipv6(self.pub, "br0")
            self.pub.sysctl("net.ipv6.conf.all.forwarding", "1")
            self._ip(self.pub, *(f"addr add {ip}/64 dev br0 nodad" for ip in (PUB_GW6, *SERVER_IPS6)))
        k = site.index
        site.lan6 = ipaddress.IPv6Network(f"2001:db8:{k + 1:x}::/64")
        site.wan_ip6 = f"2001:db8:ffff::{ROUTER_IP_BASE + k}"
        gw6 = str(site.lan6[1])
        router = site.router
        _enable_ipv6(router, _WAN, _LAN)
        router.sysctl("net.ipv6.conf.all.forwarding", "1")
        self._ip(router, f"addr add {site.wan_ip6}/64 dev {_WAN} nodad", f"addr add {gw6}/64 dev {_LAN} nodad",
                 f"route add ::/0 via {PUB_GW6}")
        self._ip(self.pub, f"route add {site.lan6} via {site.wan_ip6}")
        for i, host in enumerate(site.hosts, start=2):
            host.ip6 = str(site.lan6[i])
            _enable_ipv6(host.ns, _ETH)
            self._ip(host.ns, f"addr add {host.ip6}/64 dev {_ETH} nodad", f"route add ::/0 via {gw6}")
        router.nft(_firewall6_ruleset())

    def _public_host_ip(self) -> str:
        used = sum(len(s.hosts) for s in self.sites.values() if s.nat == "none")
        if PUBLIC_HOST_IP_BASE + used > 254:
            raise ValueError("too many public hosts")
        return f"198.51.100.{PUBLIC_HOST_IP_BASE + used}"

    def _attach_public_host(self, site: Site, name: str, ip: str) -> Host:
        ns = self._netns(name)
        site.pub_ports.append(self._link_to_pub(ns, _ETH, ip))
        # a default route like a real machine's (the "connect a UDP socket to find my address"
        # trick works); unknown destinations only ever see unanswered ARP on the lab bridge
        self._ip(ns, f"route add default dev {_ETH}")
        host = Host(name, ip, ns, site)
        self.hosts[name] = host
        return host

    def _link_to_pub(self, ns: Netns, ifname: str, ip: str) -> str:
        """Wire ``ns`` to pub's bridge; return the bridge port's name."""
        port = f"p{self._pub_ports}"
        self._pub_ports += 1
        sh("ip", "link", "add", ifname, "netns", ns.name, "type", "veth", "peer", "name", port,
           "netns", self.pub.name)
        self._ip(self.pub, f"link set {port} master br0", f"link set {port} up")
        other = UNRESERVED_NET if ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(PUBLIC_NET) else PUBLIC_NET
        self._ip(ns, f"addr add {ip}/24 dev {ifname}", f"link set {ifname} up", f"route add {other} dev {ifname}")
        return port

    def _netns(self, role: str) -> Netns:
        ns = Netns(f"{NS_PREFIX[2:]}{self.id}-{role}")  # Netns prepends "ov": names start with prefix
        self._namespaces.append(ns)
        # IPv4 lab: no IPv6 (link-local paths would bypass the NATs); bridged frames must not be
        # fed through the IP hooks (br_netfilter), or LAN traffic would meet the NAT rules
        ns.run(
            "sh", "-c",
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1; "
            "[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] && "
            "sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-arptables=0; true",
        )
        return ns

    @staticmethod
    def _ip(ns: Netns, *commands: str) -> None:
        sh("ip", "-n", ns.name, "-batch", "-", input="\n".join(commands) + "\n")

    # ------------------------------------------------------------------ lookups

    def ns(self, name: str) -> Netns:
        """Namespace of ``"pub"``, a host name (``"a1"``) or a site name (its router)."""
        if name == "pub":
            return self.pub
        if name in self.hosts:
            return self.hosts[name].ns
        site = self.sites.get(name)
        if site is not None and site.router is not None:
            return site.router
        raise KeyError(f"no lab node {name!r} (have pub, {', '.join(self.hosts)}, routers "
                       f"{', '.join(s for s in self.sites if self.sites[s].router)})")

    def site(self, site: str | Site) -> Site:
        return site if isinstance(site, Site) else self.sites[site]

    # ------------------------------------------------------------------ controls

    def flush_conntrack(self, site: str | Site) -> None:
        """Forget every NAT mapping of ``site`` (a router reboot): the next packet is mapped anew."""
        s = self.site(site)
        if s.router is None:
            return  # nothing is translated, nothing to forget
        if s.nat in ("full_cone", "restricted"):
            s.router.run("nft", "flush map ip natlab fc")
            if s.nat == "restricted":
                s.router.run("nft", "flush set ip natlab ar")
        s.router.run("conntrack", "-F")

    def start_port_mapper(self, site: str | Site, ext_ip: str | None = None) -> Proc:
        """Run Debian's miniupnpd (package miniupnpd-nftables) on ``site``'s router, answering UPnP
        IGD, NAT-PMP and PCP on the LAN side, its rules in its own ``inet miniupnpd`` table (forward
        policy accept: the lab's other rules stay as they are). Stopped with the lab.

        Debian 12's miniupnpd (2.3.1) refuses to map behind a reserved WAN address, and the lab's
        public network is one (198.51.100.0/24, TEST-NET-2; newer versions have
        ``ext_allow_private_ipv4``): its log says "Reserved / private IP address ... Port forwarding
        is impossible", NAT-PMP answers "network failure" and PCP ``NO_RESOURCES``, as a router
        behind carrier-grade NAT does. A site made with ``unreserved_wan=True`` has a WAN address
        it accepts: there it maps. ``ext_ip`` (a public address) makes it map ports and
        report that address: a router that believes it is public while another NAT sits between it
        and the Internet."""
        s = self.site(site)
        if s.router is None or s.lan is None:
            raise ValueError(f"site {s.name} has no router")
        s.router.nft(
            "table inet miniupnpd {\n"
            "  chain forward { type filter hook forward priority 0; policy accept; jump forward_upnp; }\n"
            "  chain forward_upnp { }\n"
            "  chain prerouting { type nat hook prerouting priority -100; policy accept; jump pre_upnp; }\n"
            "  chain pre_upnp { }\n"
            "  chain postrouting { type nat hook postrouting priority 100; policy accept; jump post_upnp; }\n"
            "  chain post_upnp { }\n"
            "}\n")
        conf = self.log_dir / f"miniupnpd-{s.name}.conf"
        conf.write_text(
            (f"ext_ip={ext_ip}\n" if ext_ip else "") +
            f"ext_ifname={_WAN}\nlistening_ip={_LAN}\nhttp_port=0\nenable_natpmp=yes\nenable_upnp=yes\n"
            f"secure_mode=yes\nsystem_uptime=yes\nuuid={uuid.uuid4()}\n"
            "upnp_table_name=miniupnpd\nupnp_nat_table_name=miniupnpd\nupnp_forward_chain=forward_upnp\n"
            "upnp_nat_chain=pre_upnp\nupnp_nat_postrouting_chain=post_upnp\n"
            f"allow 1024-65535 {s.lan} 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n")
        return self.popen(s.name, ["miniupnpd", "-d", "-f", str(conf),
                                   "-P", str(self.log_dir / f"miniupnpd-{s.name}.pid")], label=f"miniupnpd-{s.name}")

    def set_udp_timeouts(self, unreplied: int, stream: int, site: str | Site | None = None) -> None:
        """Set UDP mapping lifetimes (seconds; Linux: 30 unreplied, 120 once answered) of one site
        or, by default, of every current and later site."""
        if not (1 <= unreplied <= 86400 and 1 <= stream <= 86400):
            raise ValueError("timeouts must be 1..86400 s")
        if site is None:
            self._udp_timeouts = (unreplied, stream)
        targets = [self.site(site)] if site is not None else list(self.sites.values())
        for s in targets:
            if s.router is None:
                continue
            self._apply_sysctl_timeouts(s.router, (unreplied, stream))
            if s.nat in ("full_cone", "restricted"):
                s.router.nft(_track_rules(s, stream, replace=True))

    def _apply_sysctl_timeouts(self, router: Netns, timeouts: tuple[int, int] | None = None) -> None:
        unreplied, stream = timeouts or self._udp_timeouts
        router.sysctl("net.netfilter.nf_conntrack_udp_timeout", str(unreplied))
        router.sysctl("net.netfilter.nf_conntrack_udp_timeout_stream", str(stream))

    def loss(self, site: str | Site, percent: float, udp_only: bool = True) -> None:
        """Drop ``percent`` % of the site's WAN packets in each direction (UDP only by default)."""
        if not 0 <= percent <= 100:
            raise ValueError("percent must be 0..100")
        s = self.site(site)
        s.loss_percent = percent
        s.loss_udp_only = udp_only
        self._load_controls(s)

    def block_ipv4(self, site: str | Site, blocked: bool = True) -> None:
        """Drop all IPv4 crossing the site's WAN (a dual-stack site then reaches pub over IPv6 only)."""
        s = self.site(site)
        s.ipv4_blocked = blocked
        self._load_controls(s)

    def block_udp(self, site: str | Site, blocked: bool = True) -> None:
        """Drop all UDP crossing the site's WAN (only TCP leaves); ``blocked=False`` undoes it."""
        s = self.site(site)
        s.udp_blocked = blocked
        self._load_controls(s)

    def _load_controls(self, s: Site) -> None:
        self.pub.nft(_controls_ruleset(s))

    # ------------------------------------------------------------------ processes and sockets

    def run(
        self,
        name: str,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command to completion inside node ``name``; output captured as text."""
        return subprocess.run(
            [*self.ns(name).prefix(), *argv], check=check, timeout=timeout, capture_output=True,
            text=True, env=_env(env), input=input,
        )

    def popen(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        label: str | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> Proc:
        """Start a long-running process inside node ``name`` (``env`` is added to this process's
        environment). stdout/stderr go to ``<log_dir>/<label>.out|.err``; stopped on close."""
        label = label or f"{name}-{Path(argv[0]).name}-{len(self._procs)}"
        out = self.log_dir / f"{label}.out"
        err = self.log_dir / f"{label}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            p = subprocess.Popen(
                [*self.ns(name).prefix(), *argv], stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                env=_env(env), cwd=cwd, start_new_session=True,
            )
        proc = Proc(label, p, out, err)
        self._procs.append(proc)
        return proc

    def socket(self, name: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket created inside node ``name``'s namespace, usable from this process; closed on
        exit. Lets tests probe the lab without spawning programs."""
        sock = _in_netns(self.ns(name).name, lambda: socket.socket(family, type))
        self._sockets.append(sock)
        return sock

    def udp_socket(
        self, name: str, port: int = 0, ip: str = "0.0.0.0", timeout: float = 1.0
    ) -> socket.socket:
        """A bound UDP socket in node ``name`` with a receive timeout."""
        sock = self.socket(name)
        sock.bind((ip, port))
        sock.settimeout(timeout)
        return sock

    # ------------------------------------------------------------------ teardown

    def close(self, failed: bool = False) -> None:
        """Stop processes, close sockets, delete namespaces (idempotent)."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for proc in self._procs:
            try:
                proc.stop()
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"stopping {proc.name}: {exc}")
        for sock in self._sockets:
            sock.close()
        for ns in reversed(self._namespaces):
            ns.close()
        left = self.leftover_namespaces()
        if left:
            errors.append(f"namespaces left behind: {left}")
        if failed or errors:
            print(f"natlab {self.id}: logs kept in {self.log_dir}", file=sys.stderr)
        elif self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        if errors:
            raise RuntimeError("; ".join(errors))

    def leftover_namespaces(self) -> list[str]:
        """Namespaces with this lab's prefix that still exist."""
        out = sh("ip", "netns", "list", check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(self.prefix)]

    def __enter__(self) -> "NatLab":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


# ---------------------------------------------------------------------- helpers


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    if extra:
        env.update(extra)
    return env


def _in_netns(ns_name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a throwaway thread switched into namespace ``ns_name`` (setns(2) on a network
    namespace only moves the calling thread, so the rest of the process stays where it is)."""
    result: list = []

    def target() -> None:
        try:
            with open(f"/run/netns/{ns_name}") as f:
                if _libc.setns(f.fileno(), _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns_name}): {os.strerror(err)}")
            result.append((True, fn()))
        except BaseException as exc:
            result.append((False, exc))

    t = threading.Thread(target=target, name=f"netns-{ns_name}")
    t.start()
    t.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def _enable_ipv6(ns: Netns, *ifaces: str) -> None:
    """IPv6 on these interfaces of a lab namespace (it is off everywhere by default); no router
    advertisements are accepted, addresses are static and usable at once (no duplicate detection)."""
    keys = ["net.ipv6.conf.default.accept_dad=0"]
    keys += [f"net.ipv6.conf.{i}.{k}=0" for i in ifaces for k in ("accept_dad", "accept_ra")]
    keys += ["net.ipv6.conf.all.disable_ipv6=0", *(f"net.ipv6.conf.{i}.disable_ipv6=0" for i in ifaces)]
    ns.run("sysctl", "-qw", *keys)


def _firewall6_ruleset() -> str:
    """A dual-stack router's ``table ip6 natlab6``: a home router's stateful IPv6 firewall (RFC 6092
    style, no NAT66): the LAN may send anything out, the WAN only gets answers in."""
    return f"""
table ip6 natlab6 {{
  chain forward {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "{_LAN}" oifname "{_WAN}" accept
    icmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded, parameter-problem }} accept
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{_WAN}" ct state established,related accept
    iifname "{_WAN}" meta l4proto ipv6-icmp accept
    iifname "{_WAN}" drop
  }}
}}
"""


def _nat_ruleset(site: Site, map_timeout: int) -> str:
    """The router's ``table ip natlab``: NAT for the site's type plus a silent WAN input filter."""
    masq = "masquerade" if site.preserve_ports else f"masquerade to :{MAPPED_PORTS[0]}-{MAPPED_PORTS[1]}"
    post: list[str] = []
    if site.nat == "symmetric_random":
        post.append(f'oifname "{_WAN}" masquerade fully-random')
    else:
        if site.nat == "symmetric_sequential":
            ports = ", ".join(f"{i} : {SEQUENTIAL_BASE + i}" for i in range(SEQUENTIAL_SPAN))
            post.append(
                f'oifname "{_WAN}" meta l4proto udp snat ip to {site.wan_ip} : '
                f"numgen inc mod {SEQUENTIAL_SPAN} map {{ {ports} }}"
            )
        post.append(f'oifname "{_WAN}" meta l4proto {{ tcp, udp }} {masq}')
        post.append(f'oifname "{_WAN}" masquerade')
    pre: list[str] = []
    sets = ""
    if site.nat in ("full_cone", "restricted"):
        sets = "map fc { type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; }\n"
        allowed = ""
        if site.nat == "restricted":
            sets += "set ar { type inet_service . ipv4_addr; flags dynamic,timeout; }\n"
            allowed = "udp dport . ip saddr @ar "
        pre.append(f'iifname "{_WAN}" meta l4proto udp {allowed}dnat ip to udp dport map @fc')
    nl = "\n    "
    return f"""
table ip natlab {{
  {sets}
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    {nl.join(pre)}
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    {nl.join(post)}
  }}
  chain track {{
    type filter hook postrouting priority 200; policy accept;
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{_WAN}" ct state established,related accept
    iifname "{_WAN}" meta l4proto icmp accept
    iifname "{_WAN}" drop
  }}
}}
""" + (_track_rules(site, map_timeout, replace=False) if site.nat in ("full_cone", "restricted") else "")


def _track_rules(site: Site, timeout: int, replace: bool) -> str:
    """Rules after source NAT that record, per external UDP port, the internal endpoint (``fc``)
    and, for ``restricted``, the remote addresses it talked to (``ar``). At priority 200 the
    packet already carries its translated source; ``ct`` gives the untranslated one."""
    rules = [
        f'add rule ip natlab track oifname "{_WAN}" meta l4proto udp ct direction original '
        f"update @fc {{ udp sport timeout {timeout}s : ct original ip saddr . ct original proto-src }}",
        # replies of flows that came in through the map keep that map entry alive
        f'add rule ip natlab track oifname "{_WAN}" meta l4proto udp ct direction reply '
        f"update @fc {{ udp sport timeout {timeout}s : ct reply ip saddr . ct reply proto-src }}",
    ]
    if site.nat == "restricted":
        rules.append(
            f'add rule ip natlab track oifname "{_WAN}" meta l4proto udp '
            f"update @ar {{ udp sport . ip daddr timeout {timeout}s }}"
        )
    head = ["flush chain ip natlab track"] if replace else []
    return "\n".join(head + rules) + "\n"


def _controls_ruleset(site: Site) -> str:
    """A bridge table in pub on the site's bridge port(s): UDP block and random loss "on the wire",
    invisible to the site's machines (no local EPERM), the same for routers and public hosts.
    Reloaded whole (delete + add in one transaction) whenever a control changes."""
    rules: list[str] = []
    if site.udp_blocked:
        rules.append("meta l4proto udp drop")
    if site.ipv4_blocked:
        rules.append("meta protocol { ip, arp } drop")
    if site.loss_percent > 0:
        match = "meta l4proto udp " if site.loss_udp_only else ""
        rules.append(f"{match}numgen random mod 10000 < {int(round(site.loss_percent * 100))} drop")
    body = "\n    ".join(rules)
    ports = "{ " + ", ".join(f'"{p}"' for p in site.pub_ports) + " }"
    table = f"bridge natlab_ctl_{site.name}"
    return f"""
table {table}
delete table {table}
table {table} {{
  chain wire {{
    {body}
  }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname {ports} jump wire
    oifname {ports} jump wire
  }}
  chain input {{
    type filter hook input priority -10; policy accept;
    iifname {ports} jump wire
  }}
  chain output {{
    type filter hook output priority -10; policy accept;
    oifname {ports} jump wire
  }}
}}
"""
