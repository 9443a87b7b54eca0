"""Interop against real Linux kernel TCP through a TUN device (needs root: marked netns).

Our stack is 10.99.0.2 behind a TUN device whose kernel side is 10.99.0.1, inside a fresh
network namespace. The kernel's peers are small Python programs run with ``ip netns exec``;
our side is driven by the asyncio glue reading and writing raw IPv4 packets on the TUN fd.
Random loss is injected in the glue, on both directions.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import random
import struct
import sys
import uuid

import pytest

import lab
from overlay.netstack import Stack
from overlay.netstack.asyncio_glue import StackDriver
from overlay.netstack.tcp import TcpState

pytestmark = pytest.mark.netns

KERNEL_IP = "10.99.0.1"
STACK_IP = "10.99.0.2"
MTU = 1400
TRANSFER = 50 * 1024 * 1024

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

# kernel side programs (run inside the namespace)
KERNEL_SENDER = r"""
import hashlib, os, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), timeout=120)
h = hashlib.sha256()
left = n
while left:
    chunk = os.urandom(min(left, 1 << 20))
    h.update(chunk)
    s.sendall(chunk)
    left -= len(chunk)
s.shutdown(socket.SHUT_WR)
rest = s.recv(1)  # our side closes after reading everything: clean FIN gives b''
print(h.hexdigest(), "eof" if rest == b"" else "data")
s.close()
"""

KERNEL_RECEIVER = r"""
import hashlib, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(1)
srv.settimeout(120)
print("ready", flush=True)
c, _ = srv.accept()
c.settimeout(120)
h = hashlib.sha256()
n = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    h.update(d)
    n += len(d)
c.shutdown(socket.SHUT_WR)
c.close()
print(h.hexdigest(), n, flush=True)
"""

KERNEL_REFUSED = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    print("connected")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error", e)
"""


KERNEL_UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(30)
print("ready", flush=True)
for _ in range(int(sys.argv[3])):
    data, addr = s.recvfrom(65535)
    s.sendto(data[::-1], addr)
    print(len(data), flush=True)
"""


def require_tun(*tools: str) -> None:
    # lab.require_lab("tun") would look for a program called `tun`; check the device ourselves
    lab.require_lab(*tools)
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class TunLab:
    """A namespace holding a TUN device: kernel at 10.99.0.1, our stack at 10.99.0.2."""

    def __init__(self) -> None:
        require_tun()
        self.ns = lab.Netns("tcp")
        self.ifname = f"ovt{uuid.uuid4().hex[:8]}"
        self.fd = -1
        try:
            self.fd = open_tun(self.ifname)
            # created in our namespace, then moved: the fd keeps working
            lab.sh("ip", "link", "set", self.ifname, "netns", self.ns.name)
            self.ns.run("ip", "addr", "add", f"{KERNEL_IP}/24", "dev", self.ifname)
            self.ns.run("ip", "link", "set", self.ifname, "mtu", str(MTU), "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.ns.close()


@pytest.fixture
def tunlab():
    t = TunLab()
    try:
        yield t
    finally:
        t.close()


class TunGlue:
    """Moves packets between the TUN fd and a StackDriver, dropping ``loss`` of them each way."""

    def __init__(self, fd: int, loss: float = 0.0, seed: int = 1):
        self.fd = fd
        self.loss = loss
        self.rng = random.Random(seed)
        self.loop = asyncio.get_running_loop()
        self.stack = Stack(STACK_IP, mtu=MTU, now=self.loop.time())
        self.driver = StackDriver(self.stack, self._send)
        self.loop.add_reader(fd, self._readable)
        self.dropped = 0

    def _send(self, packet: bytes) -> None:
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        try:
            os.write(self.fd, packet)
        except BlockingIOError:
            self.dropped += 1  # like a full NIC queue: TCP will retransmit

    def _readable(self) -> None:
        batch = []
        for _ in range(512):
            try:
                p = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if self.loss and self.rng.random() < self.loss:
                self.dropped += 1
                continue
            batch.append(p)
        if batch:
            self.driver.receive_packets(batch)

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        self.driver.close()


async def run_in_ns(ns: lab.Netns, script: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *ns.prefix(), sys.executable, "-c", script, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def kernel_to_stack(tl: TunLab, loss: float, size: int = TRANSFER) -> None:
    glue = TunGlue(tl.fd, loss)
    result: dict = {}
    done = asyncio.Event()

    async def serve(reader, writer):
        h = hashlib.sha256()
        n = 0
        while data := await reader.read(1 << 16):
            h.update(data)
            n += len(data)
        result["hash"], result["n"] = h.hexdigest(), n
        writer.close()
        await writer.wait_closed()
        result["conn"] = writer.connection
        done.set()

    glue.driver.listen(5001, serve)
    try:
        proc = await run_in_ns(tl.ns, KERNEL_SENDER, STACK_IP, "5001", str(size))
        out, err = await asyncio.wait_for(proc.communicate(), 150)
        assert proc.returncode == 0, err.decode()
        await asyncio.wait_for(done.wait(), 10)
        kernel_hash, eof = out.decode().split()
        assert result["n"] == size
        assert result["hash"] == kernel_hash
        assert eof == "eof"  # our FIN reached the kernel cleanly (no RST)
        conn = result["conn"]
        for _ in range(100):
            if conn.state in (TcpState.TIME_WAIT, TcpState.CLOSED):
                break
            await asyncio.sleep(0.05)
        assert conn.state in (TcpState.TIME_WAIT, TcpState.CLOSED), conn.state
        assert conn.error is None
    finally:
        glue.close()


async def stack_to_kernel(tl: TunLab, loss: float, size: int = TRANSFER) -> None:
    glue = TunGlue(tl.fd, loss)
    try:
        proc = await run_in_ns(tl.ns, KERNEL_RECEIVER, KERNEL_IP, "5002")
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"ready"
        reader, writer = await asyncio.wait_for(glue.driver.open_connection(KERNEL_IP, 5002), 30)
        h = hashlib.sha256()
        rng = random.Random(7)
        left = size
        while left:
            chunk = rng.randbytes(min(left, 1 << 18))
            h.update(chunk)
            writer.write(chunk)
            await writer.drain()
            left -= len(chunk)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 150) == b""  # the kernel's FIN
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        kernel_hash, n = out.decode().split()
        assert int(n) == size
        assert kernel_hash == h.hexdigest()
        await asyncio.wait_for(writer.wait_closed(), 10)
        conn = writer.connection
        assert conn.state in (TcpState.TIME_WAIT, TcpState.CLOSED), conn.state
        assert conn.error is None
    finally:
        glue.close()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_kernel_sends_50mb_to_stack(tunlab, loss):
    asyncio.run(kernel_to_stack(tunlab, loss))


@pytest.mark.timeout(200)
@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_stack_sends_50mb_to_kernel(tunlab, loss):
    asyncio.run(stack_to_kernel(tunlab, loss))


@pytest.mark.timeout(60)
def test_kernel_pings_stack(tunlab):
    async def main():
        glue = TunGlue(tunlab.fd)
        try:
            proc = await asyncio.create_subprocess_exec(
                *tunlab.ns.prefix(), "ping", "-c", "3", "-i", "0.2", "-W", "2", STACK_IP,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, out.decode() + err.decode()
            assert "3 received" in out.decode()
            assert glue.stack.stats["icmp_echo"] == 3
        finally:
            glue.close()

    require_tun("ping")
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_unlistened_port_refused_to_kernel(tunlab):
    async def main():
        glue = TunGlue(tunlab.fd)
        refused = []
        glue.driver.on_port_refused = lambda port, remote: refused.append((port, remote[0]))
        glue.driver.listen(5003, lambda r, w: w.close())
        try:
            proc = await run_in_ns(tunlab.ns, KERNEL_REFUSED, STACK_IP, "5004")
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert out.decode().strip() == "refused", out.decode() + err.decode()
            assert refused == [(5004, KERNEL_IP)]
        finally:
            glue.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_stack_connect_to_closed_kernel_port_is_refused(tunlab):
    async def main():
        glue = TunGlue(tunlab.fd)
        try:
            with pytest.raises(ConnectionRefusedError, match="10.99.0.1:5999 refused"):
                await asyncio.wait_for(glue.driver.open_connection(KERNEL_IP, 5999), 20)
        finally:
            glue.close()

    asyncio.run(main())


UDP_SIZES = [1372, 1373, 2000, 8000, 32768, 65507]  # 1372 is the largest that fits MTU 1400


@pytest.mark.timeout(60)
def test_large_udp_datagrams_fragmented_both_ways(tunlab):
    """The kernel reassembles our fragments (its socket gets whole datagrams) and we reassemble
    the kernel's (its echo of each datagram, fragmented by Linux to the TUN MTU)."""
    async def main():
        glue = TunGlue(tunlab.fd)
        sent: list[bytes] = []
        send = glue._send
        glue.driver._send_packet = lambda p: (sent.append(p), send(p))
        try:
            proc = await run_in_ns(tunlab.ns, KERNEL_UDP_ECHO, KERNEL_IP, "5005", str(len(UDP_SIZES)))
            assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
            ep = glue.driver.udp_bind(40000)
            for size in UDP_SIZES:
                data = random.Random(size).randbytes(size)
                ep.sendto(data, (KERNEL_IP, 5005))
                got, addr = await asyncio.wait_for(ep.recvfrom(), 10)
                assert addr == (KERNEL_IP, 5005)
                assert got == data[::-1], f"{size}: got {len(got)} bytes"
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()
            assert [int(n) for n in out.split()] == UDP_SIZES  # whole datagrams on the kernel side
            assert max(len(p) for p in sent) <= MTU
            assert glue.stack.stats["tx_fragmented"] == len(UDP_SIZES) - 1
            assert glue.stack.fragments.stats["reassembled"] == len(UDP_SIZES) - 1
            assert len(glue.stack.fragments) == 0
        finally:
            glue.close()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_kernel_large_ping_is_reassembled_and_answered(tunlab):
    async def main():
        glue = TunGlue(tunlab.fd)
        try:
            proc = await asyncio.create_subprocess_exec(
                *tunlab.ns.prefix(), "ping", "-c", "2", "-i", "0.2", "-W", "2", "-s", "5000", STACK_IP,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, out.decode() + err.decode()
            assert "2 received" in out.decode() and "5008 bytes from" in out.decode()
        finally:
            glue.close()

    require_tun("ping")
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_kernel_sees_connection_refused_when_nothing_listens_behind_a_deferred_port(tunlab):
    """listen(prepare=...) refusing: ICMP port unreachable, which Linux reports as ECONNREFUSED."""
    async def main():
        glue = TunGlue(tunlab.fd)
        asked = []

        async def prepare(remote):
            asked.append(remote)
            return None

        glue.driver.listen(5006, lambda r, w, x: w.close(), prepare=prepare)
        try:
            proc = await run_in_ns(tunlab.ns, KERNEL_REFUSED, STACK_IP, "5006")
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert out.decode().strip() == "refused", out.decode() + err.decode()
            assert len(asked) == 1 and asked[0][0] == KERNEL_IP
        finally:
            glue.close()

    asyncio.run(main())
