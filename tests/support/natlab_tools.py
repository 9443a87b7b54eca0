"""Small programs and client helpers for the NAT lab (``tests/support/natlab.py``).

The reflector runs inside a lab namespace as a real process::

    python tests/support/natlab_tools.py reflect --udp 198.51.100.10:3478 --udp 198.51.100.11:3479 \
        --tcp 198.51.100.10:3478

UDP protocol (text, one datagram each way, like a STUN binding with CHANGE-REQUEST):

- ``NLQ1 <token>`` -> from the receiving socket: ``NLR1 <token> main <src-ip>:<src-port>``
- ``NLQ1 <token> <ip>:<port>`` -> first, from the reflector's socket bound at ``ip:port``:
  ``NLR1 <token> alt <src>``; then the ``main`` reply as above. The ``alt`` datagram is
  unsolicited from the NAT's point of view, so whether it arrives shows the NAT's filtering.

TCP: on connect the reflector writes ``<src-ip>:<src-port>\\n`` and closes.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import time
import uuid
from dataclasses import dataclass

MAX_DATAGRAM = 256  # requests are tiny; anything larger is not ours
Addr = tuple[str, int]


def parse_addr(text: str) -> Addr:
    """``"ip:port"`` -> ``(ip, port)``; ValueError on anything else."""
    ip, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"not ip:port: {text!r}")
    try:
        socket.inet_aton(ip)
    except OSError:
        raise ValueError(f"not an IPv4 address: {text!r}") from None
    p = int(port)
    if not 0 < p < 65536:
        raise ValueError(f"port out of range: {text!r}")
    return ip, p


def _safe_parse_addr(text: str) -> Addr | None:
    try:
        return parse_addr(text)
    except ValueError:
        return None


def reflect(udp: list[Addr], tcp: list[Addr]) -> None:
    """Serve the reflector protocol forever on the given addresses."""
    sel = selectors.DefaultSelector()
    by_addr: dict[Addr, socket.socket] = {}
    for addr in udp:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(addr)
        s.setblocking(False)
        by_addr[addr] = s
        sel.register(s, selectors.EVENT_READ, "udp")
    for addr in tcp:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(64)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, "tcp")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if key.data == "tcp":
                _serve_tcp(sock)
                continue
            while True:  # drain until EAGAIN
                try:
                    data, src = sock.recvfrom(MAX_DATAGRAM + 1)
                except BlockingIOError:
                    break
                _serve_udp(sock, data, src, by_addr)


def _serve_tcp(listener: socket.socket) -> None:
    try:
        conn, src = listener.accept()
    except BlockingIOError:
        return
    with conn:
        conn.settimeout(1.0)
        try:
            conn.sendall(f"{src[0]}:{src[1]}\n".encode())
        except OSError:
            pass


def _serve_udp(sock: socket.socket, data: bytes, src: Addr, by_addr: dict[Addr, socket.socket]) -> None:
    parts = data.split() if len(data) <= MAX_DATAGRAM else []
    if len(parts) not in (2, 3) or parts[0] != b"NLQ1":
        print(f"ignored malformed datagram from {src}", file=sys.stderr, flush=True)
        return
    token = parts[1].decode("ascii", "replace")
    observed = f"{src[0]}:{src[1]}"
    if len(parts) == 3:
        alt = _safe_parse_addr(parts[2].decode("ascii", "replace"))
        alt_sock = by_addr.get(alt) if alt else None
        if alt_sock is None:
            print(f"ignored request for unknown alt {parts[2]!r}", file=sys.stderr, flush=True)
            return
        _send(alt_sock, f"NLR1 {token} alt {observed}".encode(), src)
    _send(sock, f"NLR1 {token} main {observed}".encode(), src)


def _send(sock: socket.socket, data: bytes, dst: Addr) -> None:
    try:
        sock.sendto(data, dst)
    except OSError as exc:  # e.g. a lab control dropping UDP: keep serving
        print(f"send to {dst} failed: {exc}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- client side


@dataclass
class Reply:
    """What the reflector saw: our address as mapped by the NAT, and whether the unsolicited
    ``alt`` datagram made it back through the NAT."""

    mapped: Addr
    alt_received: bool


def query(sock: socket.socket, server: Addr, alt: Addr | None = None, tries: int = 4,
          wait: float = 1.0, grace: float = 0.3) -> Reply:
    """Ask the reflector at ``server`` how it sees ``sock``; retried on loss, every wait bounded.

    With ``alt``, the reflector first sends from ``alt`` (unsolicited), then answers; after the
    answer we wait ``grace`` seconds more for the alt datagram (it was sent first over the same
    links, so this only absorbs scheduling noise). Raises TimeoutError after ``tries`` attempts.
    """
    token = uuid.uuid4().hex[:12]
    request = f"NLQ1 {token}" + (f" {alt[0]}:{alt[1]}" if alt else "")
    alt_received = False
    for _ in range(tries):
        sock.sendto(request.encode(), server)
        mapped = _collect(sock, token, time.monotonic() + wait)
        alt_received = alt_received or mapped[1]
        if mapped[0] is not None:
            if alt is not None and not alt_received:
                alt_received = _collect(sock, token, time.monotonic() + grace)[1]
            return Reply(mapped[0], alt_received)
    raise TimeoutError(f"no reply from reflector {server} after {tries} tries")


def _collect(sock: socket.socket, token: str, deadline: float) -> tuple[Addr | None, bool]:
    """Read replies for ``token`` until the ``main`` one or ``deadline``; (mapped, alt seen)."""
    alt_seen = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, alt_seen
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(MAX_DATAGRAM)
        except (TimeoutError, socket.timeout):
            return None, alt_seen
        parts = data.decode("ascii", "replace").split()
        if len(parts) != 4 or parts[0] != "NLR1" or parts[1] != token:
            continue  # a late reply to an earlier query
        if parts[2] == "alt":
            alt_seen = True
        elif parts[2] == "main":
            return parse_addr(parts[3]), alt_seen


def tcp_query(sock: socket.socket, server: Addr, timeout: float = 3.0) -> Addr:
    """Connect ``sock`` (a TCP socket) to the reflector and return our address as it saw it."""
    sock.settimeout(timeout)
    sock.connect(server)
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < MAX_DATAGRAM:
        chunk = sock.recv(MAX_DATAGRAM)
        if not chunk:
            break
        buf += chunk
    return parse_addr(buf.decode("ascii", "replace").strip())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reflect", help="answer with the observed source address")
    r.add_argument("--udp", action="append", default=[], type=parse_addr, help="ip:port (repeatable)")
    r.add_argument("--tcp", action="append", default=[], type=parse_addr, help="ip:port (repeatable)")
    args = ap.parse_args(argv)
    if args.cmd == "reflect":
        reflect(args.udp, args.tcp)


if __name__ == "__main__":
    main()
