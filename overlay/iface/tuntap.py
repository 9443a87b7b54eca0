"""A Linux TUN (IP packets) or TAP (Ethernet frames) device, read and written in batches.

Opening: ``/dev/net/tun`` and ``TUNSETIFF`` with ``IFF_NO_PI`` (no packet-information prefix).
Creating a device needs CAP_NET_ADMIN; attaching to a *persistent* device that an administrator
made for this user (``TUNSETOWNER``, see ``make_persistent``) does not, which is how a node runs
without admin rights. A device this process created disappears, with its addresses and routes,
when the descriptor closes, also when the process dies: a crash leaves nothing behind.

I/O: the descriptor is non-blocking; the loop's reader callback drains up to ``max_per_wakeup``
packets into one list and hands it to ``on_packets`` (the data plane then encrypts the batch and
sends it with one batched UDP write). Writes go straight to the descriptor: a TUN write never
blocks for long, and when the kernel's queue is full the packet is dropped and counted, as a
full NIC queue would drop it. No coroutine, queue or log line per packet.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct
from pathlib import Path
from typing import Callable

log = logging.getLogger("overlay.iface")

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
IFNAMSIZ = 16
KINDS = {"tun": IFF_TUN, "tap": IFF_TAP}


class DeviceError(Exception):
    """A device could not be opened or set up; the message is for humans and names the fix."""


def valid_name(name: str) -> str:
    if not name or len(name.encode()) >= IFNAMSIZ or any(c in name for c in "/ \t\n:") or name in (".", ".."):
        raise DeviceError(f"invalid interface name {name!r} (1-15 characters, no '/', ':' or spaces)")
    return name


def device_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def setup_hint(kind: str, name: str, address: str | None = None, mac: str | None = None) -> str:
    """The one-time command an administrator runs so that this user can run the node unprivileged."""
    user = _user()
    cmd = f"sudo overlay setup-interface --{kind} --dev {name} --user {user}"
    if address:
        cmd += f" --address {address}"
    if mac:
        cmd += f" --mac {mac}"
    return cmd


def _user() -> str:
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return str(os.getuid())


def open_device(name: str, kind: str, vnet: bool = False, offload: int = 0) -> tuple[int, bool]:
    """Open (creating if needed) the TUN/TAP device ``name``; return its non-blocking descriptor.

    ``vnet``: every read and write carries a virtio_net_hdr (``overlay.iface.offload``), which lets
    writes hand the kernel coalesced super-packets; ``offload``: TUN_F_* flags for what the kernel
    may hand over on read. If the kernel refuses, the device is opened without. Returns the
    descriptor and whether the virtio header is in force."""
    valid_name(name)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DeviceError("no /dev/net/tun on this system (load the module: sudo modprobe tun)") from None
    except PermissionError:
        raise DeviceError(f"cannot open /dev/net/tun: permission denied (run as root, or once: "
                          f"{setup_hint(kind, name)})") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                               KINDS[kind] | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)))
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EPERM:
            if device_exists(name):
                raise DeviceError(f"{kind.upper()} device {name} exists but belongs to another user "
                                  f"(once, as root: {setup_hint(kind, name)})") from None
            raise DeviceError(f"creating {kind.upper()} device {name} needs admin rights (CAP_NET_ADMIN): "
                              f"run `overlay up` as root, or once: {setup_hint(kind, name)}") from None
        if e.errno == errno.EBUSY:
            raise DeviceError(f"device {name} is in use by another process (another overlay node? "
                              f"choose another with --dev NAME)") from None
        if e.errno == errno.EINVAL:
            other = "TAP" if kind == "tun" else "TUN"
            raise DeviceError(f"device {name} exists and is not a {kind.upper()} device (a {other} device "
                              f"or another kind of link): choose another with --dev NAME") from None
        raise DeviceError(f"cannot open {kind.upper()} device {name}: {e.strerror}") from None
    if vnet:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, offload)
        except OSError as e:
            log.info("%s: no TUN offloads (%s): one packet per read and write", name, e.strerror)
            os.close(fd)
            return open_device(name, kind)
    return fd, vnet


def make_persistent(name: str, kind: str, uid: int, gid: int | None = None) -> None:
    """Create (or re-own) a persistent device that user ``uid`` may open without privileges."""
    fd, _ = open_device(name, kind)
    try:
        fcntl.ioctl(fd, TUNSETOWNER, uid)
        if gid is not None:
            fcntl.ioctl(fd, TUNSETGROUP, gid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as e:
        raise DeviceError(f"cannot make {name} persistent: {e.strerror}") from None
    finally:
        os.close(fd)


def remove_persistent(name: str, kind: str) -> None:
    fd, _ = open_device(name, kind)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    finally:
        os.close(fd)


class TunTap:
    """An open TUN/TAP descriptor on an asyncio loop: batched reads, direct writes."""

    def __init__(self, fd: int, name: str, kind: str, on_packets: Callable[[list[bytes]], None], *,
                 read_size: int = 2048, max_per_wakeup: int = 256):
        self.fd, self.name, self.kind = fd, name, kind
        self.on_packets = on_packets
        self.read_size = read_size
        self.max_per_wakeup = max_per_wakeup
        self.stats = {"rx": 0, "tx": 0, "tx_dropped": 0, "tx_errors": 0}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        fd, size, read = self.fd, self.read_size, os.read
        batch = []
        for _ in range(self.max_per_wakeup):
            try:
                batch.append(read(fd, size))
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    break
                if e.errno == errno.EBADFD or e.errno == errno.EIO:  # link down or being removed
                    break
                raise
        if batch:
            self.stats["rx"] += len(batch)
            self.on_packets(batch)

    def write(self, packets: list[bytes]) -> None:
        fd, write = self.fd, os.write
        for p in packets:
            try:
                write(fd, p)
            except BlockingIOError:
                self.stats["tx_dropped"] += 1
            except OSError:
                self.stats["tx_errors"] += 1  # EIO while the link is down, EINVAL for a runt
        self.stats["tx"] += len(packets)

    def write_framed(self, frames: list[tuple[bytes, ...]]) -> None:
        """Write (header, [header,] payload) tuples as one frame each, without joining them in Python."""
        fd, writev = self.fd, os.writev
        for hp in frames:
            try:
                writev(fd, hp)
            except BlockingIOError:
                self.stats["tx_dropped"] += 1
            except OSError:
                self.stats["tx_errors"] += 1
        self.stats["tx"] += len(frames)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1
