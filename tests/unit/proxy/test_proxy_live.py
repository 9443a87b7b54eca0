"""The proxies and forwards on real loopback sockets, driven by clients nobody here wrote.

curl (SOCKS5 with remote name resolution, HTTP absolute-form, HTTP CONNECT) and python-socks talk
to our servers; an OsDialer maps the peer name "peer-name" to 127.0.0.1, where a stock
``http.server`` plays the peer's web service. Every test runs its own event loop under a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from polling import wait_async

from overlay.proxy import forward as forward_mod
from overlay.proxy.dialer import (
    ConnectionRefused,
    DialError,
    DialTimeout,
    NotOverlayAddress,
    OsDialer,
    PeerUnreachable,
    PortNotShared,
)
from overlay.proxy.forward import Forward, ForwardSpec, parse_spec
from overlay.proxy.listen import ListenError
from overlay.proxy.server import HttpProxyServer, SocksServer

T = TypeVar("T")
CURL_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def run(coro: Awaitable[T], timeout: float = 60) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def pattern(n: int) -> bytes:
    block = hashlib.sha256(b"overlay").digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


class OriginHandler(BaseHTTPRequestHandler):
    """The peer's web service: reports what it received, echoes bodies, serves big payloads."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/big/"):
            self._send(pattern(int(self.path[5:])))
            return
        info = {"request_line": self.requestline, "headers": [[k, v] for k, v in self.headers.items()]}
        self._send(json.dumps(info).encode())

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._send(json.dumps({"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode())


@pytest.fixture(scope="module")
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), OriginHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SharingDialer(OsDialer):
    """An OsDialer whose peers share only some ports, like a userspace node."""

    def __init__(self, shared: set[int], **kw: Any):
        super().__init__({"peer-name": "127.0.0.1"}, **kw)
        self.shared = shared

    def _check(self, host: str, port: int) -> None:
        if self.resolve(host) is not None and port not in self.shared:
            raise PortNotShared(host, port)

    async def open_connection(self, host: str, port: int):
        self._check(host, port)
        return await super().open_connection(host, port)

    async def open_udp(self, host: str, port: int):
        self._check(host, port)
        return await super().open_udp(host, port)


class FailingDialer(OsDialer):
    """Always fails with the given error."""

    def __init__(self, error: DialError):
        super().__init__()
        self.error = error

    async def open_connection(self, host: str, port: int):
        raise self.error


def dialer() -> OsDialer:
    return OsDialer({"peer-name": "127.0.0.1"})


async def curl(*args: str) -> tuple[int, bytes, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "15", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=CURL_ENV,
    )
    out, err = await proc.communicate()
    return proc.returncode, out, err.decode()


def url(server: SocksServer | HttpProxyServer, scheme: str = "http", userinfo: str = "") -> str:
    host, port = server.address
    return f"{scheme}://{userinfo}{host}:{port}"


async def until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Poll ``condition`` until true (state changes that have no event to wait on)."""
    await wait_async(condition, timeout)


def hostport(server: SocksServer | HttpProxyServer) -> str:
    host, port = server.address
    return f"{host}:{port}"


async def started(server: Any) -> Any:
    await server.start()
    return server


async def stop(*servers: Any) -> None:
    for s in servers:
        s.close()
    for s in servers:
        await s.wait_closed()


# -- SOCKS5 ----------------------------------------------------------------------------------


def test_curl_socks5_hostname_reaches_peer_by_name(origin):
    async def main():
        socks = await started(SocksServer(dialer(), "127.0.0.1", 0))
        try:
            rc, out, err = await curl("--socks5-hostname", hostport(socks), f"http://peer-name:{origin}/hello?x=1")
            assert rc == 0, err
            info = json.loads(out)
            assert info["request_line"] == "GET /hello?x=1 HTTP/1.1"
            # a big download arrives intact through the relay (backpressure, no loss)
            rc, out, err = await curl("--socks5-hostname", hostport(socks), f"http://peer-name:{origin}/big/8000000")
            assert rc == 0, err
            assert out == pattern(8_000_000)
        finally:
            await stop(socks)

    run(main())


def test_socks5_userpass_with_curl_and_python_socks(origin):
    async def main():
        socks = await started(SocksServer(dialer(), "127.0.0.1", 0, users={"alice": "s3cret"}))
        host, port = socks.address
        try:
            rc, out, err = await curl("-x", f"socks5h://alice:s3cret@{host}:{port}", f"http://peer-name:{origin}/")
            assert rc == 0 and b"request_line" in out, err
            rc, out, err = await curl("-x", f"socks5h://alice:wrong@{host}:{port}", f"http://peer-name:{origin}/")
            assert rc != 0 and out == b""
            rc, out, err = await curl("-x", f"socks5h://{host}:{port}", f"http://peer-name:{origin}/")
            assert rc != 0 and out == b""

            proxy = Proxy.from_url(f"socks5://alice:s3cret@{host}:{port}", rdns=True)
            sock = await proxy.connect("peer-name", origin, timeout=10)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /via-python-socks HTTP/1.0\r\n\r\n")
            response = await reader.read()
            writer.close()
            assert response.startswith(b"HTTP/1.1 200 OK") and b"/via-python-socks" in response

            with pytest.raises(ProxyError):
                await Proxy.from_url(f"socks5://alice:nope@{host}:{port}", rdns=True).connect("peer-name", origin, timeout=10)
        finally:
            await stop(socks)

    run(main())


@pytest.mark.parametrize(
    "error,code",
    [
        (NotOverlayAddress("example.com"), 0x02),
        (PortNotShared("peer-name", 3389), 0x05),
        (PeerUnreachable("peer-name"), 0x04),
        (ConnectionRefused("peer-name", 1), 0x05),
        (DialTimeout("peer-name", 1, 5), 0x06),
        (DialError("boom"), 0x01),
    ],
)
def test_socks5_dial_errors_map_to_reply_codes(error, code):
    async def main():
        socks = await started(SocksServer(FailingDialer(error), "127.0.0.1", 0))
        try:
            with pytest.raises(ProxyError) as e:
                await Proxy.from_url(url(socks, "socks5"), rdns=True).connect("peer-name", 3389, timeout=10)
            assert e.value.error_code == code
        finally:
            await stop(socks)

    run(main())


def test_socks5_refuses_non_overlay_and_unshared_port(origin):
    async def main():
        socks = await started(SocksServer(SharingDialer({origin}), "127.0.0.1", 0))
        try:
            rc, _, err = await curl("--socks5-hostname", hostport(socks), "http://example.com/")
            assert rc == 97 and "(2)" in err  # connection not allowed by ruleset
            rc, _, err = await curl("--socks5", hostport(socks), "http://10.99.0.1/")
            assert rc == 97 and "(2)" in err
            rc, _, err = await curl("--socks5-hostname", hostport(socks), f"http://peer-name:{origin + 1}/")
            assert rc == 97 and "(5)" in err  # connection refused
            rc, _, err = await curl("--socks5-hostname", hostport(socks), f"http://peer-name:{origin}/")
            assert rc == 0, err
        finally:
            await stop(socks)

    run(main())


async def _echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read()
    writer.write(b"got %d bytes" % len(data))
    await writer.drain()
    writer.close()


def test_socks5_half_close_is_relayed():
    async def main():
        backend = await asyncio.start_server(_echo_until_eof, "127.0.0.1", 0)
        port = backend.sockets[0].getsockname()[1]
        socks = await started(SocksServer(dialer(), "127.0.0.1", 0))
        try:
            sock = await Proxy.from_url(url(socks, "socks5"), rdns=True).connect("peer-name", port, timeout=10)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"x" * 300_000)
            writer.write_eof()  # the backend answers only once it sees our EOF
            assert await reader.read() == b"got 300000 bytes"
            writer.close()
        finally:
            await stop(socks)
            backend.close()

    run(main())


def test_idle_relayed_connection_is_closed():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def main():
        backend = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = backend.sockets[0].getsockname()[1]
        socks = await started(SocksServer(dialer(), "127.0.0.1", 0, idle_timeout=0.3))
        try:
            sock = await Proxy.from_url(url(socks, "socks5"), rdns=True).connect("peer-name", port, timeout=10)
            reader, writer = await asyncio.open_connection(sock=sock)
            assert await asyncio.wait_for(reader.read(), 20) == b""  # closed by the proxy
            writer.close()
        finally:
            await stop(socks)
            backend.close()

    run(main())


async def _socks_exchange(addr: tuple[str, int], data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(data)
        if writer.can_write_eof():
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def test_socks5_server_survives_malformed_clients(origin):
    async def main():
        socks = await started(SocksServer(dialer(), "127.0.0.1", 0, handshake_timeout=0.5))
        addr = socks.address
        try:
            assert await _socks_exchange(addr, b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00") == b""
            assert await _socks_exchange(addr, b"GET / HTTP/1.1\r\n\r\n") == b""
            assert await _socks_exchange(addr, b"\x05\x00") == b"\x05\xff"
            assert await _socks_exchange(addr, b"\x05") == b""
            assert await _socks_exchange(addr, b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50") == (
                b"\x05\x00\x05\x07\x00\x01\0\0\0\0\0\0"  # BIND: command not supported
            )
            assert await _socks_exchange(addr, b"\x05\x01\x00\x05\x01\x00\x09") == b"\x05\x00\x05\x08\x00\x01" + b"\0" * 6
            assert await _socks_exchange(addr, os.urandom(3000)) in (b"", b"\x05\xff")
            # a client that says nothing is dropped after the handshake timeout
            reader, writer = await asyncio.open_connection(*addr)
            assert await asyncio.wait_for(reader.read(), 20) == b""
            writer.close()
            rc, out, err = await curl("--socks5-hostname", hostport(socks), f"http://peer-name:{origin}/")
            assert rc == 0 and b"request_line" in out, err
        finally:
            await stop(socks)

    run(main())


# -- SOCKS5 UDP ASSOCIATE --------------------------------------------------------------------


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]


async def udp_echo() -> tuple[asyncio.DatagramTransport, int]:
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    return transport, transport.get_extra_info("sockname")[1]


async def udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


async def recv_or_none(sock: socket.socket, timeout: float) -> bytes | None:
    try:
        data, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_recvfrom(sock, 65536), timeout)
        return data
    except TimeoutError:
        return None


def test_udp_associate_round_trip():
    from overlay.proxy import socks5

    async def main():
        echo, echo_port = await udp_echo()
        socks = await started(SocksServer(SharingDialer({echo_port}, allow=["127.0.0.1/32"]), "127.0.0.1", 0))
        client, stranger = await udp_socket(), await udp_socket()
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await asyncio.open_connection(*socks.address)
            writer.write(b"\x05\x01\x00" + b"\x05\x03\x00\x01\0\0\0\0\0\0")
            assert await reader.readexactly(2) == b"\x05\x00"
            reply = await reader.readexactly(10)
            assert reply[:4] == b"\x05\x00\x00\x01"
            relay = (socket.inet_ntoa(reply[4:8]), int.from_bytes(reply[8:10], "big"))
            assert relay[0] == "127.0.0.1"

            for host in ("peer-name", "127.0.0.1"):
                await loop.sock_sendto(client, socks5.build_udp_header(host, echo_port) + b"ping " + host.encode(), relay)
                data = await recv_or_none(client, 10)
                assert data == socks5.build_udp_header(host, echo_port) + b"echo:ping " + host.encode()
            # fragments are dropped; so is anyone but the associated client
            await loop.sock_sendto(client, b"\0\0\x01" + socks5.encode_address("peer-name", echo_port) + b"frag", relay)
            await loop.sock_sendto(stranger, socks5.build_udp_header("peer-name", echo_port) + b"intruder", relay)
            await loop.sock_sendto(client, socks5.build_udp_header("peer-name", echo_port) + b"after", relay)
            assert await recv_or_none(client, 10) == socks5.build_udp_header("peer-name", echo_port) + b"echo:after"
            assert await recv_or_none(stranger, 0.3) is None
            # non-overlay and unshared destinations get nothing back
            await loop.sock_sendto(client, socks5.build_udp_header("example.com", 53) + b"q", relay)
            await loop.sock_sendto(client, socks5.build_udp_header("peer-name", echo_port + 1) + b"q", relay)
            assert await recv_or_none(client, 0.3) is None

            # closing the control connection ends the association: the relay port is released
            writer.close()
            for _ in range(100):
                try:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                        probe.bind(relay)
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("UDP relay socket still bound after the control connection closed")
        finally:
            client.close()
            stranger.close()
            echo.close()
            await stop(socks)

    run(main())


# -- HTTP proxy ------------------------------------------------------------------------------


def test_curl_http_proxy_plain_and_connect(origin):
    async def main():
        hp = await started(HttpProxyServer(dialer(), "127.0.0.1", 0))
        try:
            rc, out, err = await curl("-x", url(hp), "-H", "X-Test: 1", f"http://peer-name:{origin}/p?q=1")
            assert rc == 0, err
            info = json.loads(out)
            assert info["request_line"] == "GET /p?q=1 HTTP/1.1"
            headers = {k.lower(): v for k, v in info["headers"]}
            assert headers["host"] == f"peer-name:{origin}" and headers["x-test"] == "1"
            assert headers["connection"] == "close" and "proxy-connection" not in headers

            rc, out, err = await curl("-p", "-x", url(hp), f"http://peer-name:{origin}/tunnelled")
            assert rc == 0, err
            assert json.loads(out)["request_line"] == "GET /tunnelled HTTP/1.1"

            rc, out, err = await curl("-x", url(hp), f"http://peer-name:{origin}/big/3000000")
            assert rc == 0 and out == pattern(3_000_000), err
        finally:
            await stop(hp)

    run(main())


def test_http_proxy_forwards_request_bodies(origin, tmp_path):
    body = pattern(200_000)
    (tmp_path / "body").write_bytes(body)
    expected = {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}

    async def main():
        hp = await started(HttpProxyServer(dialer(), "127.0.0.1", 0))
        target = f"http://peer-name:{origin}/upload"
        try:
            for extra in ([], ["-H", "Transfer-Encoding: chunked"], ["-H", "Expect: 100-continue"]):
                rc, out, err = await curl("-x", url(hp), *extra, "--data-binary", f"@{tmp_path / 'body'}", target)
                assert rc == 0, err
                assert json.loads(out) == expected, extra
        finally:
            await stop(hp)

    run(main())


def test_http_proxy_auth(origin):
    async def main():
        hp = await started(HttpProxyServer(dialer(), "127.0.0.1", 0, users={"alice": "s3cret"}))
        target = f"http://peer-name:{origin}/"
        try:
            rc, out, err = await curl("-x", url(hp), "-U", "alice:s3cret", target)
            assert rc == 0 and b"request_line" in out, err
            for creds in ([], ["-U", "alice:wrong"]):
                rc, out, err = await curl("-x", url(hp), *creds, "-w", "%{http_code}", "-o", "/dev/null", target)
                assert out == b"407"
            rc, out, err = await curl("-p", "-x", url(hp), "-U", "alice:s3cret", target)
            assert rc == 0 and b"request_line" in out, err

            proxy = Proxy.from_url(url(hp, userinfo="alice:s3cret@"))
            sock = await proxy.connect("peer-name", origin, timeout=10)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /via-python-socks HTTP/1.0\r\n\r\n")
            assert b"/via-python-socks" in await reader.read()
            writer.close()
        finally:
            await stop(hp)

    run(main())


def test_http_proxy_reports_dial_errors_in_the_body(origin):
    async def main():
        hp = await started(HttpProxyServer(SharingDialer({origin}), "127.0.0.1", 0))
        try:
            rc, out, err = await curl("-x", url(hp), "-w", "\n%{http_code}", f"http://peer-name:{origin + 1}/")
            assert out == f"peer-name does not share port {origin + 1}\n\n502".encode(), err
            rc, out, err = await curl("-x", url(hp), "-w", "\n%{http_code}", "http://example.com/")
            assert out == b"example.com is not an overlay address\n\n403"
            rc, out, err = await curl("-p", "-x", url(hp), f"http://peer-name:{origin + 1}/")
            assert rc != 0 and "502" in err
        finally:
            await stop(hp)

        for error, status in ((PeerUnreachable("peer-name"), 504), (DialTimeout("peer-name", 1, 5), 504)):
            hp = await started(HttpProxyServer(FailingDialer(error), "127.0.0.1", 0))
            try:
                rc, out, err = await curl("-x", url(hp), "-w", "\n%{http_code}", "http://peer-name/")
                assert out == f"{error.message}\n\n{status}".encode()
            finally:
                await stop(hp)

    run(main())


def test_http_response_ends_even_if_upstream_keeps_the_connection_open():
    async def keep_alive_origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello")
        await writer.drain()
        await reader.read()  # ignores our Connection: close; waits for us to hang up
        writer.close()

    async def main():
        backend = await asyncio.start_server(keep_alive_origin, "127.0.0.1", 0)
        port = backend.sockets[0].getsockname()[1]
        hp = await started(HttpProxyServer(dialer(), "127.0.0.1", 0, idle_timeout=60))
        try:
            rc, out, err = await curl("-x", url(hp), "-i", f"http://peer-name:{port}/")
            assert rc == 0, err
            assert out.endswith(b"\r\n\r\nhello") and b"Connection: close" in out and b"keep-alive" not in out
        finally:
            await stop(hp)
            backend.close()

    run(main())


async def _http_exchange(addr: tuple[str, int], data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def test_http_proxy_survives_malformed_clients(origin):
    async def main():
        hp = await started(HttpProxyServer(dialer(), "127.0.0.1", 0, handshake_timeout=0.5))
        addr = hp.address
        try:
            for data, status in (
                (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"400"),
                (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
                (b"GET http://peer-name/ HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
                (b"POST http://peer-name/ HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
            ):
                response = await _http_exchange(addr, data)
                assert response.startswith(b"HTTP/1.1 " + status), response[:100]
            assert await _http_exchange(addr, b"GET http://peer-name/ HT") == b""  # handshake timeout
            rc, out, err = await curl("-x", url(hp), f"http://peer-name:{origin}/")
            assert rc == 0 and b"request_line" in out, err
        finally:
            await stop(hp)

    run(main())


def test_connect_with_pipelined_data_and_client_limit(origin):
    async def main():
        hp = await started(HttpProxyServer(dialer(), "127.0.0.1", 0, max_clients=1))
        try:
            # data sent right behind the CONNECT head (like a TLS ClientHello) reaches the peer
            reader, writer = await asyncio.open_connection(*hp.address)
            writer.write(f"CONNECT peer-name:{origin} HTTP/1.1\r\n\r\nGET /early HTTP/1.0\r\n\r\n".encode())
            response = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert response.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK")
            assert b'"GET /early HTTP/1.0"' in response

            # with max_clients=1, a second client is turned away while the first is connected
            await until(lambda: hp.active == 0)
            first_reader, first = await asyncio.open_connection(*hp.address)
            first.write(b"GET http://peer-name")  # incomplete head: holds its slot
            await until(lambda: hp.active == 1)
            reader, writer = await asyncio.open_connection(*hp.address)
            try:
                assert await asyncio.wait_for(reader.read(), 10) == b""
            except ConnectionResetError:
                pass
            writer.close()
            first.write(f":{origin}/ HTTP/1.1\r\n\r\n".encode())
            assert (await asyncio.wait_for(first_reader.read(), 10)).startswith(b"HTTP/1.1 200 OK")
            first.close()
        finally:
            await stop(hp)

    run(main())


# -- listening rules -------------------------------------------------------------------------


def test_non_loopback_listen_needs_authentication():
    for cls in (SocksServer, HttpProxyServer):
        for host in ("0.0.0.0", "10.1.2.3", "example.com", "::"):
            with pytest.raises(ListenError, match="without authentication"):
                cls(dialer(), host, 1080)
        cls(dialer(), "0.0.0.0", 1080, users={"a": "b"})  # allowed (not started: no traffic beyond loopback)
        cls(dialer(), "localhost", 1080)
        cls(dialer(), "::1", 1080)


def test_busy_port_is_a_clear_error():
    async def main():
        first = await started(SocksServer(dialer(), "127.0.0.1", 0))
        port = first.address[1]
        try:
            for server in (SocksServer(dialer(), "127.0.0.1", port), HttpProxyServer(dialer(), "127.0.0.1", port),
                           Forward(dialer(), port, "peer-name", 80)):
                with pytest.raises(ListenError, match=f"^127.0.0.1:{port} is already in use$"):
                    await server.start()
        finally:
            await stop(first)

    run(main())


# -- forwards --------------------------------------------------------------------------------


def test_forward_spec_parser():
    assert parse_spec("3389 peer") == ForwardSpec(3389, "peer", 3389)
    assert parse_spec("13389  peer.home:3389") == ForwardSpec(13389, "peer.home", 3389)
    assert parse_spec("27015/udp 10.7.0.2") == ForwardSpec(27015, "10.7.0.2", 27015, udp=True)
    assert parse_spec("8080/tcp peer:80") == ForwardSpec(8080, "peer", 80)
    for bad in ("3389", "peer 3389", "0 peer", "70000 peer", "1 peer:0", "1 :5", "1/sctp peer", "1 p 2", "-1 p"):
        with pytest.raises(ValueError):
            parse_spec(bad)


def test_tcp_forward(origin, caplog):
    async def main():
        fwd = await started(Forward(SharingDialer({origin}), 0, "peer-name", origin))
        unshared = await started(Forward(SharingDialer({origin}), 0, "peer-name", 3389))
        try:
            rc, out, err = await curl(f"http://127.0.0.1:{fwd.address[1]}/through-forward")
            assert rc == 0 and json.loads(out)["request_line"] == "GET /through-forward HTTP/1.1", err
            with caplog.at_level(logging.WARNING, logger=forward_mod.__name__):
                reader, writer = await asyncio.open_connection(*unshared.address)
                with pytest.raises(ConnectionResetError):   # a failed dial is a reset, not an empty stream
                    await asyncio.wait_for(reader.read(), 10)
                writer.close()
            assert "peer-name does not share port 3389" in caplog.text
        finally:
            await stop(fwd, unshared)

    run(main())


def test_udp_forward_keeps_a_flow_per_client_and_expires_them(caplog):
    async def main():
        echo, echo_port = await udp_echo()
        d = SharingDialer({echo_port})
        fwd = await started(Forward(d, 0, "peer-name", echo_port, udp=True, idle_timeout=0.3))
        unshared = await started(Forward(d, 0, "peer-name", 5353, udp=True))
        a, b = await udp_socket(), await udp_socket()
        loop = asyncio.get_running_loop()
        try:
            for i in range(3):
                await loop.sock_sendto(a, b"a%d" % i, fwd.address)
                await loop.sock_sendto(b, b"b%d" % i, fwd.address)
                assert await recv_or_none(a, 10) == b"echo:a%d" % i
                assert await recv_or_none(b, 10) == b"echo:b%d" % i
            assert fwd.active == 2
            await until(lambda: fwd.active == 0)  # idle flows expire
            await loop.sock_sendto(a, b"again", fwd.address)  # a new flow after expiry
            assert await recv_or_none(a, 10) == b"echo:again"

            with caplog.at_level(logging.WARNING):
                await loop.sock_sendto(a, b"x", unshared.address)
                assert await recv_or_none(a, 0.5) is None
            assert "peer-name does not share port 5353" in caplog.text
        finally:
            a.close()
            b.close()
            echo.close()
            await stop(fwd, unshared)

    run(main())


# -- OsDialer --------------------------------------------------------------------------------


def test_os_dialer_resolution_and_errors():
    d = OsDialer({"Peer-Name": "127.0.0.1"}, allow=["127.0.0.0/8"])
    assert d.resolve("peer-name") == "127.0.0.1" and d.resolve("PEER-NAME") == "127.0.0.1"
    assert d.resolve("127.0.0.5") == "127.0.0.5"
    assert d.resolve("10.0.0.1") is None and d.resolve("example.com") is None
    assert OsDialer().resolve("127.0.0.1") is None  # nothing is overlay by default

    async def main():
        with pytest.raises(NotOverlayAddress, match="example.com is not an overlay address"):
            await d.open_connection("example.com", 80)
        with pytest.raises(NotOverlayAddress):
            await d.open_udp("10.0.0.1", 53)
        with pytest.raises(ConnectionRefused) as e:
            await d.open_connection("peer-name", free_port())
        assert e.value.socks_reply == 0x05 and e.value.http_status == 502

    run(main())


def test_dial_error_messages_and_codes():
    cases = [
        (NotOverlayAddress("x"), "x is not an overlay address", 0x02, 403),
        (PortNotShared("laptop", 3389), "laptop does not share port 3389", 0x05, 502),
        (PeerUnreachable("laptop"), "laptop is unreachable", 0x04, 504),
        (ConnectionRefused("laptop", 22), "laptop:22 refused the connection", 0x05, 502),
        (DialTimeout("laptop", 22, 10), "connecting to laptop:22 timed out after 10 s", 0x06, 504),
    ]
    for error, message, code, status in cases:
        assert (str(error), error.message, error.socks_reply, error.http_status) == (message, message, code, status)
