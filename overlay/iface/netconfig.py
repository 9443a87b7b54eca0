"""The kernel side of the node's interface: address, MTU, link state, limited-broadcast route.

Netlink through pyroute2 (imported only in TUN/TAP mode). Reading the current configuration needs
no privileges, so a node without CAP_NET_ADMIN whose administrator prepared the device once
(``overlay setup-interface``) checks that everything is in place and changes nothing; if something
is missing it fails with one message holding the exact command to run.

pyroute2's synchronous IPRoute drives an event loop of its own, which cannot run inside the node's
loop: every netlink call runs on one worker thread here, and the caller waits for it (a few
milliseconds, only when the configuration changes).

Everything this object adds is remembered and removed by ``undo()`` (addresses and routes on a
persistent device; a device the node created vanishes with its descriptor anyway).

Limited broadcast: Linux sends a datagram to 255.255.255.255 out of the interface its routing
table gives for that address, normally the default route's, so LAN games on the overlay would
broadcast onto the physical LAN instead. A host route ``255.255.255.255/32 dev ovl0`` sends them
to the overlay (``ip route add 255.255.255.255/32 dev ovl0``); the node adds it when it may.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from concurrent.futures import ThreadPoolExecutor

from overlay.iface.tuntap import DeviceError, setup_hint

log = logging.getLogger("overlay.iface")

LIMITED_BROADCAST = "255.255.255.255/32"


class NetConfig:
    def __init__(self, name: str, kind: str, *, broadcast_route: bool = True):
        from pyroute2 import IPRoute   # noqa: PLC0415 (imported only in TUN/TAP mode)
        from pyroute2.netlink.exceptions import NetlinkError   # noqa: PLC0415
        self._NetlinkError = NetlinkError
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self.ipr = self._thread.submit(IPRoute).result()
        self.name, self.kind = name, kind
        self.broadcast_route = broadcast_route
        self.index = self._index()
        self.added_addrs: list[tuple[str, int]] = []
        self.added_routes: list[str] = []
        self.mtu: int | None = None

    def _run(self, fn):
        return self._thread.submit(fn).result()

    def close(self) -> None:
        self._run(self.ipr.close)
        self._thread.shutdown()

    def _index(self) -> int:
        idx = self._run(lambda: self.ipr.link_lookup(ifname=self.name))
        if not idx:
            raise DeviceError(f"interface {self.name} vanished")
        return idx[0]

    def _state(self) -> tuple[int, bool, list[tuple[str, int]], str | None]:
        def read():
            link = self.ipr.get_links(self.index)[0]
            addrs = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in self.ipr.get_addr(index=self.index, family=2)]
            return link.get_attr("IFLA_MTU"), bool(link["flags"] & 1), addrs, link.get_attr("IFLA_ADDRESS")
        return self._run(read)

    def prepare(self, mtu: int) -> None:
        """MTU and link up, without an address (``overlay setup-interface`` before the first start)."""
        missing: list[str] = []
        self._try(lambda: self.ipr.link("set", index=self.index, mtu=mtu, state="up"), missing)
        if missing:
            raise DeviceError(f"cannot set up {self.name}: {missing[0]}")

    def apply(self, address: str, prefixlen: int, mtu: int, mac: str | None = None) -> None:
        """Make the device hold ``address/prefixlen`` (and no other address of ours), MTU at most
        ``mtu``, the MAC ``mac`` (TAP), up. Raises DeviceError naming the command to run when
        privileges are missing."""
        cur_mtu, up, addrs, cur_mac = self._state()
        missing: list[str] = []
        if mac and cur_mac != mac:
            self._try(lambda: self.ipr.link("set", index=self.index, address=mac), missing)
        net = ipaddress.IPv4Network(f"{address}/{prefixlen}", strict=False)
        for a, plen in list(self.added_addrs):
            if (a, plen) != (address, prefixlen):
                self._try(lambda: self.ipr.addr("del", index=self.index, address=a, prefixlen=plen), [])
                self.added_addrs.remove((a, plen))
        if (address, prefixlen) not in addrs:
            if self._try(lambda: self.ipr.addr("add", index=self.index, address=address, prefixlen=prefixlen,
                                               broadcast=str(net.broadcast_address)), missing):
                self.added_addrs.append((address, prefixlen))
        if cur_mtu != mtu:
            if cur_mtu > mtu:
                self._try(lambda: self.ipr.link("set", index=self.index, mtu=mtu), missing)
            else:
                log.info("%s keeps its smaller MTU %d (the tunnel allows %d)", self.name, cur_mtu, mtu)
        if not up:
            self._try(lambda: self.ipr.link("set", index=self.index, state="up"), missing)
        if missing:
            raise DeviceError(f"{self.kind.upper()} device {self.name} is not set up and changing it needs admin "
                              f"rights: run once as root: "
                              f"{setup_hint(self.kind, self.name, f'{address}/{prefixlen}', mac)}")
        self.mtu = min(cur_mtu, mtu)
        if self.broadcast_route and LIMITED_BROADCAST not in self.added_routes:
            try:
                self._run(lambda: self.ipr.route("add", dst=LIMITED_BROADCAST, oif=self.index))
                self.added_routes.append(LIMITED_BROADCAST)
            except self._NetlinkError as e:
                if e.code == errno.EEXIST:
                    log.info("a route for 255.255.255.255 exists already: limited broadcast keeps it")
                elif e.code == errno.EPERM:
                    log.info("no route for limited broadcast (255.255.255.255) through %s without admin rights; "
                             "games broadcasting there need: sudo ip route add %s dev %s",
                             self.name, LIMITED_BROADCAST, self.name)
                else:
                    log.warning("cannot route limited broadcast through %s: %s", self.name, e)

    def add_route(self, dst: str) -> None:
        """Route ``dst`` (a static WireGuard peer's allowed prefix) through the device."""
        if dst in self.added_routes:
            return
        missing: list[str] = []
        if self._try(lambda: self.ipr.route("add", dst=dst, oif=self.index), missing):
            self.added_routes.append(dst)
        elif missing:
            log.warning("no route for %s through %s without admin rights: sudo ip route add %s dev %s",
                        dst, self.name, dst, self.name)

    def remove_route(self, dst: str) -> None:
        if dst in self.added_routes:
            self.added_routes.remove(dst)
            try:
                self._run(lambda: self.ipr.route("del", dst=dst, oif=self.index))
            except (self._NetlinkError, OSError):
                pass

    def lan_ifnames(self, prefix: str) -> list[str]:
        """The interfaces packets to the subnet ``prefix`` leave through: those holding an address
        in it (the gateway's own LAN address may be any of the subnet's, the first one too, for
        which ``ip route get`` answers ``lo``), else the one the route to its first address uses."""
        net = ipaddress.IPv4Network(prefix)

        def lookup():
            names = []
            for a in self.ipr.get_addr(family=2):   # AF_INET
                ip = a.get_attr("IFA_ADDRESS") or a.get_attr("IFA_LOCAL")
                if ip and ipaddress.IPv4Address(ip) in net:
                    name = self.ipr.get_links(a["index"])[0].get_attr("IFLA_IFNAME")
                    if name and name not in names:
                        names.append(name)
            if names:
                return names
            r = self.ipr.route("get", dst=str(net.network_address + (1 if net.num_addresses > 1 else 0)))
            oif = r[0].get_attr("RTA_OIF") if r else None
            return [self.ipr.get_links(oif)[0].get_attr("IFLA_IFNAME")] if oif else []
        try:
            return self._run(lookup)
        except (self._NetlinkError, OSError, IndexError):
            return []

    def _try(self, op, missing: list[str]) -> bool:
        try:
            self._run(op)
            return True
        except self._NetlinkError as e:
            if e.code in (errno.EPERM, errno.EACCES):
                missing.append(str(e))
                return False
            if e.code == errno.EEXIST:
                return False
            raise DeviceError(f"cannot configure {self.name}: {e}") from None

    def undo(self) -> None:
        """Remove the addresses and routes this node added (the device may be gone already)."""
        for dst in self.added_routes:
            try:
                self._run(lambda: self.ipr.route("del", dst=dst, oif=self.index))
            except (self._NetlinkError, OSError):
                pass
        for a, plen in self.added_addrs:
            try:
                self._run(lambda: self.ipr.addr("del", index=self.index, address=a, prefixlen=plen))
            except (self._NetlinkError, OSError):
                pass
        self.added_routes.clear()
        self.added_addrs.clear()
        self.close()
