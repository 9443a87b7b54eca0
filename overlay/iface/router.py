"""A TUN/TAP node as the gateway to its LAN: the kernel forwards the members' packets.

With ``--advertise-routes`` and ``--tun`` / ``--tap``, packets from members to an approved route
are written to the device (``overlay.node.kernel_device`` checks each one against the approved routes
first) and the kernel forwards them to the LAN; the replies reach the device through the
kernel's route to the pool and go back to the member. What the kernel needs is set up here while
routes are approved, and undone on exit:

- forwarding on the device and on the interfaces the approved routes leave through
  (``net.ipv4.conf.<if>.forwarding=1``, not the global ``net.ipv4.ip_forward``: other interfaces
  stay as they were); those this node switched on are switched off again on exit;
- an nftables table of the node's own, ``ip overlay_<dev>``: source NAT (masquerade) from the
  pool toward the approved routes, so LAN hosts answer the gateway machine and need no route to
  the pool; and a forward filter: from the device only the pool to approved routes, to the device
  only replies (established / related), and an interface this node switched forwarding on for
  forwards nothing else (the machine does not become a router for its LAN). The table is deleted
  on exit. One left behind by a crash is replaced at the next start, and the interfaces its rule
  names (marked with a comment) count as switched on by this node, so they are switched off again
  at the next exit.

nftables through the ``nft`` command (``nft -f -``, one atomic transaction per change): pyroute2
has no usable nftables support, and the Python bindings of libnftables come with the
distribution's nftables package (python3-nftables), not from PyPI; the ``nft`` command is part
of that package anyway. Without ``nft`` or without CAP_NET_ADMIN the node says so in one line
and forwards nothing.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess

log = logging.getLogger("overlay.iface")

SYSCTL = "/proc/sys/net/ipv4/conf/{}/forwarding"
OPENED = "forwarding switched on by overlay"


def table_name(dev: str) -> str:
    return "overlay_" + re.sub(r"[^A-Za-z0-9_]", "_", dev)


def ruleset(dev: str, pool: str, routes: list[str], opened: list[str]) -> str:
    """The node's nftables table for ``routes`` (replacing any previous one, atomically)."""
    t = table_name(dev)
    dsts = ", ".join(routes)
    lines = [f"table ip {t} {{}}", f"delete table ip {t}", f"table ip {t} {{",
             "  chain forward {",
             "    type filter hook forward priority filter; policy accept;",
             f'    iifname "{dev}" ip saddr {pool} ip daddr {{ {dsts} }} accept',
             f'    iifname "{dev}" drop',
             f'    oifname "{dev}" ct state established,related accept',
             f'    oifname "{dev}" drop']
    if opened:
        names = ", ".join(f'"{i}"' for i in opened)
        lines.append(f'    iifname {{ {names} }} drop comment "{OPENED}"')
    lines += ["  }",
              "  chain postrouting {",
              "    type nat hook postrouting priority srcnat; policy accept;",
              f'    oifname != "{dev}" ip saddr {pool} ip daddr {{ {dsts} }} masquerade',
              "  }",
              "}"]
    return "\n".join(lines) + "\n"


def opened_in(listing: str) -> list[str]:
    """The interfaces a table listed by ``nft list table`` says this node switched forwarding on for."""
    for line in listing.splitlines():
        if OPENED in line and "iifname" in line:
            return re.findall(r'"([^"]+)"', line.split("drop", 1)[0])
    return []


class RouterError(Exception):
    pass


class KernelRouter:
    def __init__(self, dev: str, lan_ifnames):
        """``lan_ifnames(prefix)``: the interfaces packets to that subnet leave through
        (``NetConfig.lan_ifnames``)."""
        self.dev = dev
        self._lan_ifnames = lan_ifnames
        self.opened: list[str] = []        # interfaces whose forwarding this node switched on
        self.table = False                 # our nftables table exists
        self.active = False                # forwarding and NAT in place for the current routes
        self.routes: list[str] = []
        self.error: str | None = None
        self._leftover_checked = False

    def apply(self, pool: str, routes: list[str]) -> bool:
        """Forward from the device to ``routes`` (none: stop forwarding). False, with ``error``
        set and logged once, when it cannot."""
        routes = sorted(routes)
        if routes == self.routes and (self.active or self.error):
            return self.active
        self.routes = routes
        if not routes:
            self.undo()
            return False
        if not self._leftover_checked:
            self._leftover_checked = True
            self._adopt_leftover()
        try:
            lan = []
            for r in routes:
                for ifname in self._lan_ifnames(r):
                    if ifname != self.dev and ifname != "lo" and ifname not in lan:
                        lan.append(ifname)
            want = [self.dev] + lan
            newly = [i for i in want if i not in self.opened and not _forwarding(i)]
            self._nft(ruleset(self.dev, pool, routes, self.opened + newly))
            for i in newly:
                _set_forwarding(i, True)
                self.opened.append(i)
        except RouterError as e:
            self.active = False
            if self.error != str(e):
                log.error("%s", e)
            self.error = str(e)
            return False
        if not self.active:
            log.info("gateway: the kernel forwards members' packets to %s (masquerade; forwarding on %s)",
                     ", ".join(routes), ", ".join(want))
        self.active, self.error = True, None
        return True

    def _adopt_leftover(self) -> None:
        """A table of ours left by a crash: what it says we switched on is ours to switch off."""
        nft = shutil.which("nft")
        if nft is None:
            return
        r = subprocess.run([nft, "list", "table", "ip", table_name(self.dev)], capture_output=True, text=True,
                           timeout=10)
        if r.returncode == 0:
            self.opened = [i for i in opened_in(r.stdout) if _forwarding(i)]
            self.table = True
            log.info("gateway: replacing the nftables table a previous run left (%s)", ", ".join(self.opened) or "-")

    def _nft(self, text: str) -> None:
        nft = shutil.which("nft")
        if nft is None:
            raise RouterError("a TUN/TAP gateway needs nftables for its source NAT: install it (apt-get install "
                              "nftables); until then members' packets for the LAN are not forwarded")
        r = subprocess.run([nft, "-f", "-"], input=text, capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            hint = (" (needs CAP_NET_ADMIN: run the node as root for a TUN/TAP gateway)"
                    if "Operation not permitted" in r.stderr else "")
            raise RouterError(f"gateway: nft failed{hint}: {r.stderr.strip()[:300]}; members' packets for the "
                              "LAN are not forwarded")
        self.table = True

    def undo(self) -> None:
        """Forwarding off where we switched it on, our table gone."""
        for i in self.opened:
            try:
                _set_forwarding(i, False)
            except RouterError:
                pass   # the device is gone already
        self.opened = []
        if self.table and (nft := shutil.which("nft")):
            subprocess.run([nft, "delete", "table", "ip", table_name(self.dev)], capture_output=True, timeout=10)
        self.table = False
        self.active = False


def _forwarding(ifname: str) -> bool:
    try:
        with open(SYSCTL.format(ifname)) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _set_forwarding(ifname: str, on: bool) -> None:
    try:
        with open(SYSCTL.format(ifname), "w") as f:
            f.write("1" if on else "0")
    except OSError as e:
        raise RouterError(f"gateway: cannot switch forwarding on for {ifname} ({e.strerror}): run the node as "
                          f"root, or once: sudo sysctl -w net.ipv4.conf.{ifname}.forwarding=1") from None
