"""The loopback address a share's connection comes from, per peer (overlay/node/share_source.py),
and the Shares' fallback to 127.0.0.1 where the OS cannot bind it."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket

import pytest

from overlay.node import services
from overlay.node.services import Shares
from overlay.node.share_source import loopback_for, mappable, vip_for

NEVER = {"127.0.0.0", "127.0.0.1", "127.255.255.255"}


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def test_default_pool_keeps_the_last_three_bytes():
    pool = net("100.64.0.0/10")
    assert loopback_for("100.64.0.7", pool) == "127.64.0.7"
    assert loopback_for("100.127.255.254", pool) == "127.127.255.254"
    assert vip_for("127.64.0.7", pool) == "100.64.0.7"
    assert vip_for("127.100.1.2", pool) == "100.100.1.2"


def test_every_host_of_a_narrow_pool_maps_one_to_one_and_back():
    for text in ("100.64.0.0/22", "10.0.0.0/22", "192.168.7.0/24", "10.255.252.0/22", "172.16.0.0/30"):
        pool = net(text)
        hosts = [str(h) for h in pool.hosts()]
        lbs = [loopback_for(h, pool) for h in hosts]
        assert None not in lbs, text
        assert len(set(lbs)) == len(hosts), text                     # injective
        assert not NEVER & set(lbs), text
        assert all(ipaddress.IPv4Address(lb) in net("127.0.0.0/8") for lb in lbs)
        assert [vip_for(lb, pool) for lb in lbs] == hosts, text      # the inverse


@pytest.mark.parametrize("text", ["100.64.0.0/10", "10.0.0.0/9", "10.128.0.0/9", "10.0.0.0/16"])
def test_wide_pools_are_bijective_and_never_hit_localhost(text):
    """A /10 or /9 has millions of hosts: check the image's bounds and a sample, with the inverse."""
    pool = net(text)
    first, last = int(pool.network_address) + 1, int(pool.broadcast_address) - 1
    lo, hi = int(ipaddress.IPv4Address(loopback_for(str(ipaddress.IPv4Address(first)), pool))), \
        int(ipaddress.IPv4Address(loopback_for(str(ipaddress.IPv4Address(last)), pool)))
    # the image is one run of consecutive addresses, as long as the pool's hosts: one to one
    assert hi - lo == last - first
    assert lo > int(ipaddress.IPv4Address("127.0.0.1")) and hi < int(ipaddress.IPv4Address("127.255.255.255"))
    for i in range(first, last + 1, 9973):
        vip = str(ipaddress.IPv4Address(i))
        lb = loopback_for(vip, pool)
        assert int(ipaddress.IPv4Address(lb)) - lo == i - first      # the run is in order
        assert vip_for(lb, pool) == vip


def test_a_pool_on_an_x_0_0_0_boundary_uses_the_upper_half():
    pool = net("10.0.0.0/16")
    assert loopback_for("10.0.0.1", pool) == "127.128.0.1"
    assert vip_for("127.128.0.1", pool) == "10.0.0.1"
    assert vip_for("127.0.0.1", pool) is None


def test_what_is_no_peer():
    pool = net("100.64.0.0/10")
    assert loopback_for("100.64.0.0", pool) is None          # the network address
    assert loopback_for("100.127.255.255", pool) is None     # the broadcast address
    assert loopback_for("192.168.1.20", pool) is None        # outside the pool (behind a gateway member)
    assert loopback_for("not an ip", pool) is None
    assert loopback_for("100.64.0.7", None) is None          # no pool known yet
    for lb in ("127.0.0.1", "127.0.0.0", "127.255.255.255", "127.63.255.255", "127.128.0.1", "100.64.0.7", "x"):
        assert vip_for(lb, pool) is None, lb


def test_pools_wider_than_a_9_have_no_mapping():
    assert not mappable(net("10.0.0.0/8")) and not mappable(net("0.0.0.0/0")) and not mappable(None)
    assert not mappable(net("10.0.0.0/31"))
    assert mappable(net("10.0.0.0/9")) and mappable(net("10.0.0.0/30"))
    assert loopback_for("10.0.0.1", net("10.0.0.0/8")) is None
    assert vip_for("127.0.0.1", net("10.0.0.0/8")) is None


# ---------------------------------------------------------------------------- Shares' source address
def test_shares_bind_the_peers_loopback_address():
    pool = net("100.64.0.0/10")
    sh = Shares(pool=lambda: pool)
    assert sh.source("100.64.0.7") == "127.64.0.7"
    assert sh.source("192.168.1.20") == "127.0.0.1"           # outside the pool
    assert sh.source_info() == {"mode": "per_peer", "note": None}
    wide = Shares(pool=lambda: net("10.0.0.0/8"))
    assert wide.source("10.0.0.7") == "127.0.0.1"
    assert wide.source_info()["mode"] == "localhost" and "wider than /9" in wide.source_info()["note"]


class _NoBind(socket.socket):
    """A socket of an OS that binds no loopback address but 127.0.0.1 (macOS, the BSDs)."""

    def bind(self, addr):
        if isinstance(addr, tuple) and addr[0].startswith("127.") and addr[0] != "127.0.0.1":
            raise OSError(errno.EADDRNOTAVAIL, "Can't assign requested address")
        return super().bind(addr)


def test_an_os_that_cannot_bind_falls_back_to_localhost_once(monkeypatch, caplog):
    monkeypatch.setattr(services.socket, "socket", _NoBind)
    sh = Shares(pool=lambda: net("100.64.0.0/10"))
    with caplog.at_level("WARNING", logger="overlay.node"):
        assert sh.source("100.64.0.7") == "127.0.0.1"
        assert sh.source("100.64.0.8") == "127.0.0.1"
        assert sh.source_info()["mode"] == "localhost"
    assert "cannot bind loopback addresses other than 127.0.0.1" in sh.source_info()["note"]
    assert len([r for r in caplog.records if "see every peer as 127.0.0.1" in r.message]) == 1


def test_a_bind_refused_later_falls_back_for_tcp_and_udp(monkeypatch):
    """The probe passed, but binding the peer's address fails: the connection still reaches the
    service, from 127.0.0.1, and later ones do not try again."""
    async def main():
        pool = net("100.64.0.0/10")
        sh = Shares(pool=lambda: pool)
        sh._probe()
        real_dgram = asyncio.get_running_loop().create_datagram_endpoint
        calls = []

        async def dgram(protocol, remote_addr=None, local_addr=None, **kw):
            calls.append(local_addr and local_addr[0])
            if local_addr is not None:
                raise OSError(errno.EADDRNOTAVAIL, "Can't assign requested address")
            return await real_dgram(protocol, local_addr=local_addr, remote_addr=remote_addr, **kw)

        got = asyncio.get_running_loop().create_future()

        class Service(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                got.set_result(addr[0])

        loop = asyncio.get_running_loop()
        svc, _ = await loop.create_datagram_endpoint(Service, local_addr=("127.0.0.1", 0))
        port = svc.get_extra_info("sockname")[1]
        monkeypatch.setattr(loop, "create_datagram_endpoint", dgram)
        tr = await sh._udp_flow(loop, asyncio.DatagramProtocol, "100.64.0.7", port)
        tr.sendto(b"hi")
        assert await asyncio.wait_for(got, 5) == "127.0.0.1"
        tr.close()
        svc.close()
        assert calls == ["127.64.0.7", None]
        assert sh.source("100.64.0.9") == "127.0.0.1" and sh.source_info()["mode"] == "localhost"

        # TCP likewise: binding the peer's address fails, the connection comes from 127.0.0.1
        sh = Shares(pool=lambda: pool)
        sh._probe()
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.setblocking(False)
        monkeypatch.setattr(services.socket, "socket", _NoBind)
        w = await sh._connect_local("100.64.0.7", srv.getsockname()[1])
        conn, addr = await loop.sock_accept(srv)
        assert addr[0] == "127.0.0.1" and sh.source_info()["mode"] == "localhost"
        w.close()
        conn.close()
        srv.close()
    asyncio.run(main())


def test_tcp_and_udp_come_from_the_peers_address():
    async def main():
        loop = asyncio.get_running_loop()
        sh = Shares(pool=lambda: net("100.64.0.0/10"))
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.setblocking(False)
        w = await sh._connect_local("100.64.3.9", srv.getsockname()[1])
        conn, addr = await loop.sock_accept(srv)
        assert addr[0] == "127.64.3.9"
        w.close()
        conn.close()
        srv.close()
        got = loop.create_future()

        class Service(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                got.set_result(addr[0])
        svc, _ = await loop.create_datagram_endpoint(Service, local_addr=("127.0.0.1", 0))
        tr = await sh._udp_flow(loop, asyncio.DatagramProtocol, "100.64.3.10", svc.get_extra_info("sockname")[1])
        tr.sendto(b"hi")
        assert await asyncio.wait_for(got, 5) == "127.64.3.10"
        tr.close()
        svc.close()
    asyncio.run(main())


def test_the_source_follows_a_new_pool():
    """The source address is remembered per peer, for the pool it was computed with."""
    pool = [net("100.64.0.0/10")]
    sh = Shares(pool=lambda: pool[0])
    assert sh.source("10.9.0.7") == "127.0.0.1" and sh.source("100.64.0.7") == "127.64.0.7"
    pool[0] = net("10.9.0.0/16")
    assert sh.source("10.9.0.7") == "127.9.0.7" and sh.source("100.64.0.7") == "127.0.0.1"


def test_a_local_service_that_refuses_or_accepts_at_once():
    """The connection toward the service: refused is ConnectionRefusedError (the peer then gets
    port unreachable), accepted gives a connected non-blocking socket that carries bytes, from
    the peer's address."""
    async def main():
        loop = asyncio.get_running_loop()
        sh = Shares(pool=lambda: net("100.64.0.0/10"))
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        closed_port = free.getsockname()[1]
        free.close()
        with pytest.raises(ConnectionRefusedError):
            await sh._connect_local("100.64.3.9", closed_port)
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.setblocking(False)
        w = await sh._connect_local("100.64.3.9", srv.getsockname()[1])
        conn, addr = await loop.sock_accept(srv)
        assert addr[0] == "127.64.3.9"
        assert w.gettimeout() == 0.0 and w.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await loop.sock_sendall(conn, b"hi")
        assert await asyncio.wait_for(loop.sock_recv(w, 2), 5) == b"hi"
        w.close()
        conn.close()
        srv.close()
    asyncio.run(main())
