"""This machine's resolver and the node's DNS (TUN/TAP mode): systemd-resolved per link, or opt-in
/etc/resolv.conf, undone on exit and, after a crash, at the next start.

``--dns-config`` (``dns_config`` in config.toml):

- ``auto`` (the default): when systemd-resolved runs (its D-Bus name ``org.freedesktop.resolve1``
  is on the system bus), the overlay device gets per-link DNS (the node's virtual IP, port 53),
  the routing domains ``~NET`` of every network, the search domain ``overlay.internal`` (so a
  bare ``bob`` is asked as ``bob.overlay.internal``), routing-only reverse zones of the pool (PTR)
  and DefaultRoute=false: only those names go to the node, everything else as before. Without
  systemd-resolved nothing is changed: ``overlay status`` says what to add.
- ``resolv-conf``: the same with systemd-resolved; without it the node edits /etc/resolv.conf
  (its nameserver first, the original lines kept after it; a copy in the node's home as
  ``resolv.conf.overlay-backup``) and puts the original back when it stops, unless someone changed
  the file since (then it is left as it is, and the log says so). A symlink (a file managed by
  systemd-resolved or resolvconf) is never replaced.
- ``off``: nothing.

What was set is recorded in the node's home (``dns-system.json``) before it is set, and the
record is undone at the next start (a node killed with SIGKILL cannot clean up).

systemd-resolved forgets a link's settings when it restarts (a package upgrade, ``systemctl restart
systemd-resolved``), and may start after the node: every ``RECHECK`` seconds the node asks the bus
who owns ``org.freedesktop.resolve1`` (one GetNameOwner call) and sets the link again when the owner
is new; one try per owner, and a log line only when something changed (``ResolvedWatch``).

The sans-I/O part: ``routing_domains``, ``reverse_zones``, ``with_nameserver``, ``restore_plan``,
``Record`` and ``ResolvedWatch``; the I/O: ``Resolved`` (D-Bus through jeepney, blocking with short timeouts: the
daemon calls it from a thread) and ``ResolvConf`` (files).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from overlay.node.dns import SUFFIX

log = logging.getLogger("overlay.node.dns")

MODES = ("auto", "resolv-conf", "off")
STATE_FILE = "dns-system.json"
RESOLV_CONF = "/etc/resolv.conf"
RESOLV_CONF_ENV = "OVERLAY_RESOLV_CONF"   # another path for /etc/resolv.conf (tests)
BACKUP_SUFFIX = ".overlay-backup"
MARK = "# overlay:"                       # our lines in resolv.conf start with this comment
MAX_RESOLV_CONF = 64 << 10
MAX_REVERSE_ZONES = 256
BUS_TIMEOUT = 3.0
RECHECK = 15.0                            # seconds between looks at resolved's bus name

RESOLVE1 = "org.freedesktop.resolve1"
RESOLVE1_PATH = "/org/freedesktop/resolve1"
RESOLVE1_MANAGER = "org.freedesktop.resolve1.Manager"


# ---------------------------------------------------------------------------- sans-I/O
def reverse_zones(pool: ipaddress.IPv4Network | None) -> list[str]:
    """The in-addr.arpa zones covering ``pool`` on octet boundaries: 100.64.0.0/10 ->
    64.100.in-addr.arpa ... 127.100.in-addr.arpa (64 zones); a /24 or longer -> its /24."""
    if pool is None:
        return []
    octets = min(3, max(1, -(-pool.prefixlen // 8)))   # whole octets that name a zone
    bits = octets * 8
    subnets = ([pool.supernet(new_prefix=bits)] if pool.prefixlen >= bits
               else list(pool.subnets(new_prefix=bits)))
    zones = []
    for net in subnets[:MAX_REVERSE_ZONES]:
        parts = str(net.network_address).split(".")[:octets]
        zones.append(".".join(reversed(parts)) + ".in-addr.arpa")
    return zones


def routing_domains(networks, pool: ipaddress.IPv4Network | None) -> list[tuple[str, bool]]:
    """(domain, routing only) for resolved's SetLinkDomains: ``~NET`` for every network, the
    suffix as a search domain (bare names), the pool's reverse zones."""
    nets = sorted({n.lower() for n in networks})
    return ([(n, True) for n in nets] + [(SUFFIX, False)]
            + [(z, True) for z in reverse_zones(pool)])


def domain_texts(domains: list[tuple[str, bool]]) -> list[str]:
    """As resolvectl shows them: ``~NET`` for routing-only."""
    return [("~" if routing else "") + d for d, routing in domains]


def with_nameserver(original: str, ip: str) -> str:
    """resolv.conf text with ``nameserver ip`` first (after a marking comment), the original lines
    after it (earlier lines of ours dropped)."""
    kept, after_mark = [], False
    for line in original.splitlines(keepends=True):
        ours = line.startswith(MARK) or (after_mark and line.startswith("nameserver"))
        after_mark = line.startswith(MARK)
        if not ours:
            kept.append(line)
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    head = (f"{MARK} the node's DNS for its peers' names (it refuses other names: the next nameserver "
            f"answers them); removed when the node stops\nnameserver {ip}\n")
    return head + "".join(kept)


def restore_plan(current: str | None, written: str, original: str) -> str:
    """What to do with resolv.conf when the node stops (or after a crash): "restore" it (it still
    holds what we wrote), "nothing" (the original is back, or it is gone), or "changed" (someone
    else wrote it since: leave it)."""
    if current is None or current == original:
        return "nothing"
    return "restore" if current == written else "changed"


@dataclass
class ResolvedWatch:
    """Whether systemd-resolved needs the link's settings again, from what its bus name's owner (a
    unique name like ``:1.42``, None when nobody owns it) was at each look. A new owner is a new
    resolved (restarted, or started after the node): it knows nothing of the link. Each owner gets
    one try (a refusal, say an unprivileged node, is not retried every ``period``)."""
    period: float = RECHECK
    owner: str | None = None      # the owner that was last tried (and has the settings when it worked)
    ok: bool = False              # ... and it worked
    next_at: float = 0.0

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def seen(self, owner: str | None, now: float) -> str:
        """What to do: "apply" (a new resolved), "gone" (the resolved that had the settings went
        away: say so once), or "" (nothing)."""
        self.next_at = now + self.period
        if owner is None:
            if self.owner is not None:
                was_ok, self.owner, self.ok = self.ok, None, False
                return "gone" if was_ok else ""
            return ""
        return "apply" if owner != self.owner else ""

    def tried(self, owner: str | None, ok: bool) -> None:
        self.owner, self.ok = owner, ok


@dataclass
class Record:
    """What this node set, in its home (``dns-system.json``), so that a later start undoes it."""
    resolved: dict | None = None        # {"ifname", "ifindex"}
    resolv_conf: dict | None = None     # {"path", "original", "written", "backup"}

    def empty(self) -> bool:
        return not self.resolved and not self.resolv_conf

    @classmethod
    def load(cls, home: Path) -> Record:
        try:
            d = json.loads((home / STATE_FILE).read_text())
            return cls(resolved=d.get("resolved") or None, resolv_conf=d.get("resolv_conf") or None)
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, AttributeError) as e:
            log.warning("ignoring %s: %s", home / STATE_FILE, e)
            return cls()

    def save(self, home: Path) -> None:
        path = home / STATE_FILE
        if self.empty():
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            return
        _write_atomic(path, json.dumps(asdict(self), indent=1) + "\n", mode=0o600)


# ---------------------------------------------------------------------------- files
def _write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``path`` through a temporary file and a rename; a file that is a mount point (a
    container's bind-mounted /etc/resolv.conf: rename gives EBUSY) is rewritten in place."""
    tmp = path.with_name(f".{path.name}.overlay-tmp")
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if e.errno not in (errno.EBUSY, errno.EXDEV):
            raise
        with open(path, "r+") as f:
            f.write(text)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())


def _read(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RESOLV_CONF + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_RESOLV_CONF:
        raise OSError(errno.EFBIG, f"{path} is larger than {MAX_RESOLV_CONF} bytes")
    return data.decode("utf-8", "replace")


class ResolvConf:
    """/etc/resolv.conf (or ``OVERLAY_RESOLV_CONF``): our nameserver first, restored later."""

    def __init__(self, path: str | None = None):
        self.path = Path(path or os.environ.get(RESOLV_CONF_ENV) or RESOLV_CONF)

    def apply(self, ip: str, record: Record, home: Path) -> None:
        """Put ``nameserver ip`` first; the original is copied to the node's home and recorded
        before the file changes. OSError (with a reason to show) when it cannot."""
        if self.path.is_symlink():
            raise OSError(errno.EPERM, f"{self.path} is a symlink to {os.readlink(self.path)} (a resolver "
                                       "manager owns it): left as it is")
        original = _read(self.path)
        if original is None:
            original = ""
        written = with_nameserver(original, ip)
        if original == written:
            return
        backup = home / ("resolv.conf" + BACKUP_SUFFIX)
        _write_atomic(backup, original, mode=0o644)
        record.resolv_conf = {"path": str(self.path), "original": original, "written": written,
                              "backup": str(backup)}
        record.save(home)
        _write_atomic(self.path, written)
        log.info("DNS: nameserver %s first in %s (the original is in %s until the node stops)", ip, self.path,
                 backup)

    @staticmethod
    def restore(record: Record, home: Path) -> str | None:
        """Put back the file the record names; a note when it was left as it is."""
        rc = record.resolv_conf
        if not rc:
            return None
        path, backup = Path(rc["path"]), Path(rc["backup"])
        note = None
        try:
            plan = restore_plan(_read(path), rc["written"], rc["original"])
            if plan == "restore":
                _write_atomic(path, rc["original"])
                log.info("DNS: %s restored", path)
            elif plan == "changed":
                note = (f"{path} was changed by someone else since the node wrote it: left as it is "
                        f"(the original is in {backup})")
                log.warning("DNS: %s", note)
            if plan != "changed":
                backup.unlink(missing_ok=True)
        except OSError as e:
            note = f"cannot restore {path}: {e.strerror or e} (the original is in {backup})"
            log.warning("DNS: %s", note)
        record.resolv_conf = None
        record.save(home)
        return note


# ---------------------------------------------------------------------------- systemd-resolved
class ResolvedError(Exception):
    pass


class Resolved:
    """systemd-resolved's D-Bus API on the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` if set).
    Each call opens a connection: the node speaks to it a few times in its life."""

    def _call(self, method: str, signature: str | None = None, body: tuple = (),
              destination: str = RESOLVE1, path: str = RESOLVE1_PATH, interface: str = RESOLVE1_MANAGER):
        from jeepney import DBusAddress, new_method_call
        from jeepney.io.blocking import open_dbus_connection
        from jeepney.wrappers import DBusErrorResponse, unwrap_msg
        try:
            conn = open_dbus_connection(bus="SYSTEM", auth_timeout=BUS_TIMEOUT)
        except (OSError, ValueError, RuntimeError) as e:
            raise ResolvedError(f"no system bus: {e}") from None
        try:
            msg = new_method_call(DBusAddress(path, destination, interface), method, signature, body)
            return unwrap_msg(conn.send_and_get_reply(msg, timeout=BUS_TIMEOUT))
        except DBusErrorResponse as e:
            raise ResolvedError(f"{method}: {e.name}: {e.data[0] if e.data else ''}") from None
        except (OSError, TimeoutError) as e:
            raise ResolvedError(f"{method}: {e}") from None
        finally:
            conn.close()

    def _bus(self, method: str, *args: str):
        return self._call(method, "s", args, destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                          interface="org.freedesktop.DBus")[0]

    def owner(self) -> str | None:
        """The unique bus name of the process that owns ``org.freedesktop.resolve1`` (it changes
        when resolved restarts), None when nobody does or there is no bus."""
        try:
            return str(self._bus("GetNameOwner", RESOLVE1))
        except ResolvedError:   # org.freedesktop.DBus.Error.NameHasNoOwner, or no bus
            return None

    def running(self) -> bool:
        """resolved runs, and in this network namespace (interface indexes are per namespace: a node
        in a container must not set the links of the host's resolver)."""
        try:
            if not self._bus("NameHasOwner", RESOLVE1):
                return False
            pid = self._bus("GetConnectionUnixProcessID", RESOLVE1)
        except ResolvedError:
            return False
        try:
            theirs, ours = os.stat(f"/proc/{pid}/ns/net"), os.stat("/proc/self/ns/net")
        except PermissionError:
            return True          # cannot tell (not root): resolved will refuse an unprivileged caller anyway
        except OSError:
            return False         # not in our PID namespace: another container
        if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
            log.info("DNS: systemd-resolved runs in another network namespace: not told")
            return False
        return True

    def configure(self, ifindex: int, ip: str, port: int, domains: list[tuple[str, bool]]) -> None:
        addr = ipaddress.ip_address(ip)
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        if port == 53:
            self._call("SetLinkDNS", "ia(iay)", (ifindex, [(family, addr.packed)]))
        else:   # systemd >= 246
            self._call("SetLinkDNSEx", "ia(iayqs)", (ifindex, [(family, addr.packed, port, "")]))
        self.set_domains(ifindex, domains)
        self._call("SetLinkDefaultRoute", "ib", (ifindex, False))

    def set_domains(self, ifindex: int, domains: list[tuple[str, bool]]) -> None:
        self._call("SetLinkDomains", "ia(sb)", (ifindex, domains))

    def revert(self, ifindex: int) -> None:
        self._call("RevertLink", "i", (ifindex,))


# ---------------------------------------------------------------------------- the node's part
@dataclass
class SystemDns:
    """What the daemon asks for: ``recover`` at start, ``apply`` once its DNS answers on the
    device's address, ``set_domains`` when its networks change, ``revert`` on exit."""
    home: Path
    mode: str = "auto"
    resolved: Resolved = field(default_factory=Resolved)
    resolv_conf: ResolvConf = field(default_factory=ResolvConf)
    record: Record = field(default_factory=Record)
    via: str | None = None                 # "systemd-resolved" or "resolv.conf" once set
    link: str | None = None
    domains: list[tuple[str, bool]] = field(default_factory=list)
    note: str | None = None
    watch: ResolvedWatch = field(default_factory=ResolvedWatch)
    target: tuple[str, str, int] | None = None   # (ifname, ip, port) of the last apply: set again if resolved restarts

    def recover(self) -> None:
        """Undo what a node of this home set and did not undo (it was killed)."""
        try:
            self._recover()
        except (KeyError, TypeError, AttributeError, ValueError) as e:   # a damaged record: dropped
            log.warning("DNS: ignoring %s: %s", self.home / STATE_FILE, e)
            Record().save(self.home)

    def _recover(self) -> None:
        old = Record.load(self.home)
        if old.empty():
            return
        if old.resolved:
            ifname, ifindex = old.resolved.get("ifname"), old.resolved.get("ifindex")
            try:
                present = socket.if_nametoindex(ifname) == ifindex
            except (OSError, TypeError):
                present = False   # the device went with the node: resolved forgot the link
            if present and self.resolved.running():
                try:
                    self.resolved.revert(ifindex)
                    log.info("DNS: reverted systemd-resolved's settings of %s left by a node that did not stop "
                             "cleanly", ifname)
                except ResolvedError as e:
                    log.warning("DNS: cannot revert systemd-resolved's settings of %s: %s", ifname, e)
        old.resolved = None
        if old.resolv_conf:
            log.info("DNS: restoring %s left by a node that did not stop cleanly", old.resolv_conf.get("path"))
            self.note = ResolvConf.restore(old, self.home)
        old.save(self.home)

    def apply(self, ifname: str, ip: str, port: int, networks, pool) -> None:
        """Tell this machine's resolver about the node's DNS on ``ip``:``port`` (on ``ifname``)."""
        if self.mode == "off":
            return
        if self.via is not None:   # a new address: undo the old one first
            self.revert()
        self.target = (ifname, ip, port)
        self.domains = routing_domains(networks, pool)
        owner = self.resolved.owner()   # before the calls: a restart during them is seen at the next look
        self.watch.tried(owner, False)
        if owner is not None and self.resolved.running():
            try:
                ifindex = socket.if_nametoindex(ifname)
                self.record.resolved = {"ifname": ifname, "ifindex": ifindex}
                self.record.save(self.home)
                self.resolved.configure(ifindex, ip, port, self.domains)
            except (OSError, ResolvedError) as e:
                if self.record.resolved:   # a call failed half-way: take back what was set
                    try:
                        self.resolved.revert(self.record.resolved["ifindex"])
                    except ResolvedError:
                        pass
                self.record.resolved = None
                self.record.save(self.home)
                self.note = f"cannot configure systemd-resolved for {ifname}: {e}"
                log.warning("DNS: %s", self.note)
                return
            self.via, self.link, self.note = "systemd-resolved", ifname, None
            self.watch.tried(owner, True)
            log.info("DNS: systemd-resolved asks %s:%d for %s on %s", ip, port, " ".join(domain_texts(self.domains)),
                     ifname)
            return
        if self.mode != "resolv-conf":
            return
        if port != 53:
            self.note = f"resolv.conf cannot name port {port}: not changed"
            return
        try:
            self.resolv_conf.apply(ip, self.record, self.home)
        except OSError as e:
            self.note = f"cannot edit {self.resolv_conf.path}: {e.strerror or e}"
            log.warning("DNS: %s", self.note)
            return
        self.via, self.note = "resolv.conf", None

    def recheck(self, networks, pool, now: float | None = None) -> None:
        """Look (at most every ``watch.period``) at who owns resolved's bus name; a new owner gets the
        link's settings again (the daemon calls this from a thread, every few seconds)."""
        now = time.monotonic() if now is None else now
        if self.mode == "off" or self.target is None or self.via == "resolv.conf" or not self.watch.due(now):
            return
        owner = self.resolved.owner()
        what = self.watch.seen(owner, now)
        if what == "gone":   # its settings went with it: nothing to revert any more
            self.record.resolved = None
            self.record.save(self.home)
            self.via, self.note = None, "systemd-resolved stopped: the node sets its link again when it is back"
            log.warning("DNS: systemd-resolved stopped (its settings of %s went with it): set again when it is back",
                        self.target[0])
        elif what == "apply":
            log.info("DNS: systemd-resolved (re)started (%s on the bus): setting %s again", owner, self.target[0])
            self.record.resolved = None   # the new resolved knows nothing of it: nothing to revert first
            self.via = None
            self.apply(*self.target, networks, pool)
            self.watch.next_at = now + self.watch.period

    def set_domains(self, networks, pool) -> None:
        if self.via != "systemd-resolved" or not self.record.resolved:
            return
        domains = routing_domains(networks, pool)
        self.domains = domains
        try:
            self.resolved.set_domains(self.record.resolved["ifindex"], domains)
            log.info("DNS: systemd-resolved asks the node for %s", " ".join(domain_texts(domains)))
        except ResolvedError as e:
            log.warning("DNS: cannot update systemd-resolved's domains: %s", e)

    def revert(self) -> None:
        if self.record.resolved:
            try:
                self.resolved.revert(self.record.resolved["ifindex"])
                log.info("DNS: systemd-resolved's settings of %s reverted", self.record.resolved["ifname"])
            except ResolvedError as e:
                log.warning("DNS: cannot revert systemd-resolved's settings: %s", e)
            self.record.resolved = None
        if self.record.resolv_conf:
            ResolvConf.restore(self.record, self.home)
        self.record.save(self.home)
        self.via = self.link = None

    async def keep(self, lock, networks: Callable[[], list[str]], pool: Callable[[], object]) -> None:
        """Forever: ``recheck`` from a thread every few seconds, under the daemon's lock of this
        object (asyncio glue; cancelled when the daemon stops)."""
        import asyncio
        while True:
            await asyncio.sleep(min(5.0, self.watch.period))
            if self.target is None or self.mode == "off" or not self.watch.due(time.monotonic()):
                continue
            async with lock:
                look = asyncio.ensure_future(asyncio.to_thread(self.recheck, networks(), pool()))
                try:
                    await asyncio.shield(look)
                except asyncio.CancelledError:   # the daemon stops: let the thread finish (bounded by
                    await look                   # BUS_TIMEOUT) before it reverts the link
                    raise

    def status(self) -> dict:
        return {"mode": self.mode, "via": self.via, "link": self.link,
                "domains": domain_texts(self.domains) if self.via == "systemd-resolved" else [],
                "file": str(self.resolv_conf.path) if self.via == "resolv.conf" else None, "note": self.note}
