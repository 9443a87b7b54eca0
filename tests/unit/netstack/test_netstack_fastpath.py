"""The per-segment fast paths (header prediction on receive, new data only and the header template
on send) against the full paths: the same inputs must give the same packets, events and state.

Every scenario runs twice, with ``tcp.FAST_PATH`` on and off (read by each Stack and connection
when created), with the stacks' secrets and IP identification fixed so both runs are
deterministic; the traces (packets byte for byte, events, connection and stack state after each
step) must be equal. The scripted test also checks which segments the fast path took and which
it must leave to the full path.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.netstack import IncomingConnection, Stack, TcpConfig, TcpConnection, TcpState, wire
from overlay.netstack import tcp as tcp_mod

A_IP, B_IP = "10.0.0.1", "10.0.0.2"
A, B = wire.ip_to_bytes(A_IP), wire.ip_to_bytes(B_IP)
_SKIP = {"_stack", "_cfg", "cc", "_sb", "_ooo", "_tmpl", "_fast", "_syn_seen"}


def deterministic_stack(addr: str, **kw) -> Stack:
    s = Stack(addr, now=0.0, **kw)
    s._isn_secret = b"i" * 16
    s._port_secret = b"p" * 16
    s._ident = 4242
    return s


def _digest(v: object) -> object:
    if isinstance(v, (bytes, bytearray)):
        return (len(v), zlib.crc32(v))
    if isinstance(v, dict):
        return sorted(v.items())
    return v


def _attrs(obj: object) -> list[tuple[str, object]]:
    """An object's data attributes and properties (no ``vars()``: compiled classes have no __dict__)."""
    out = []
    for k in dir(obj):
        if k.startswith("__") or k in _SKIP:
            continue
        v = getattr(obj, k)
        if not callable(v):
            out.append((k, _digest(v)))
    return out


def conn_state(c: TcpConnection | None) -> object:
    """Everything a connection holds, buffers as (length, CRC)."""
    if c is None:
        return None
    ooo = c._ooo
    return (
        repr(_attrs(c)),
        repr(_attrs(c.cc)),
        repr([list(r) for r in c._sb.ranges]), c._sb.sacked_bytes,
        list(ooo._starts), [_digest(b) for b in ooo._blocks], ooo.bytes, list(ooo._recent),
    )


def stack_state(s: Stack) -> object:
    return (sorted(s.stats.items()), s._ident, len(s._out), s.get_timer(), sorted(k for k in s._conns))


# compiled (mypyc, ``make compiled``) classes are native: their methods cannot be replaced, so
# there the traces are compared without checking which path each segment took
PATCHABLE = tcp_mod.__file__ is not None and tcp_mod.__file__.endswith(".py")


class FastPathSpy:
    """Counts what ``TcpConnection._fast_segment`` answered (installed on the class)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.taken = 0
        self.declined = 0
        if not PATCHABLE:
            return
        real = TcpConnection._fast_segment

        def spy(conn, *args):
            ok = real(conn, *args)
            if ok:
                self.taken += 1
            else:
                self.declined += 1
            return ok

        monkeypatch.setattr(TcpConnection, "_fast_segment", spy)


# ---------------------------------------------------------------- scripted segments to one stack

MSS = 1360


class ScriptedPeer:
    """Stack A with one connection to B; the test plays B with hand-made segments."""

    def __init__(self, recv_buffer: int = 64 * 1024, checksums: bool = True):
        self.now = 0.0
        cfg = TcpConfig(recv_buffer=recv_buffer, send_buffer=64 * 1024)
        self.a = deterministic_stack(A_IP, tcp=cfg, verify_checksums=checksums,
                                     checksum_free=frozenset() if checksums else {B})
        self.trace: list[object] = []
        self.conn = self.a.connect(B_IP, 80, self.now, src_port=40000)
        (syn,) = self.out()
        self.a_iss = tcp_of(syn).seq
        self.b_nxt = 5000  # B's next sequence number
        self.b_wscale = 7
        self.window = 512  # the raw field B sends (scaled by 2**7: 64 KiB)
        opts = wire.tcp_options(mss=MSS, wscale=self.b_wscale, sack_permitted=True)
        self.feed(self.b_nxt - 1, self.a_iss + 1, wire.SYN | wire.ACK, self.window, b"", opts)
        self.out()

    def out(self) -> list[bytes]:
        pkts = self.a.packets_to_send(self.now)
        self.trace.append(("out", pkts))
        self.trace.append(("events", [type(e).__name__ for e in iter(self.a.next_event, None)]))
        return pkts

    def feed(self, seq: int, ack: int, flags: int, window: int, data: bytes = b"", options: bytes = b"",
             *, urgent: bool = False) -> None:
        pkt = wire.build_ipv4_tcp(B, A, 1, 80, 40000, seq, ack, flags, window, data, options)
        if urgent:  # the urgent pointer is never looked at, the URG flag must still leave the fast path
            pkt = wire.build_ipv4_tcp(B, A, 1, 80, 40000, seq, ack, flags | wire.URG, window, data, options)
        self.a.receive_packet(pkt, self.now)
        self.snapshot()

    def snapshot(self) -> None:
        self.trace.append(("state", conn_state(self.conn), stack_state(self.a)))

    # B's view of A
    @property
    def una(self) -> int:
        return self.conn.snd_una

    @property
    def a_max(self) -> int:
        return self.conn.snd_max

    def data(self, payload: bytes, *, flags: int = wire.ACK | wire.PSH, ack: int | None = None,
             window: int | None = None, seq: int | None = None, options: bytes = b"", advance: bool = True,
             urgent: bool = False) -> None:
        self.feed(self.b_nxt if seq is None else seq, self.a_max if ack is None else ack, flags,
                  self.window if window is None else window, payload, options, urgent=urgent)
        if advance and seq is None:
            self.b_nxt += len(payload) + bool(flags & wire.FIN)

    def timer(self) -> None:
        t = self.a.get_timer()
        if t is not None:
            self.now = max(self.now, t)
            self.a.handle_timer(self.now)
        self.out()
        self.snapshot()

    def app_send(self, n: int) -> None:
        self.conn.send(bytes(range(256)) * (n // 256) + bytes(n % 256))
        self.out()


def tcp_of(pkt: bytes) -> wire.TcpSegment:
    return wire.parse_tcp(wire.parse_ipv4(pkt, False), False)


# (name, action, fast?): True, the fast path must take it; False, it must not; None, no segment arrives
def _script() -> list[tuple[str, Callable[[ScriptedPeer], object], bool | None]]:
    W = wire.ACK
    return [
        # the SYN-ACK's window was not scaled, this one is: a window change
        ("first data after the handshake", lambda p: p.data(b"first"), False),
        ("in-order data", lambda p: p.data(b"hello"), True),
        ("in-order data without PSH", lambda p: p.data(b"x" * 100, flags=W), True),
        ("a full segment", lambda p: p.data(b"y" * MSS), True),
        ("a second full segment", lambda p: p.data(b"z" * MSS), True),
        ("send 3000", lambda p: p.app_send(3000), None),
        ("pure ACK of part", lambda p: p.data(b"", flags=W, ack=p.una + MSS), True),
        ("ACK of the rest with data", lambda p: p.data(b"abc"), True),
        ("send 10", lambda p: p.app_send(10), None),
        ("old ACK with data", lambda p: p.data(b"old", ack=p.una - 5), False),
        ("ACK beyond snd_max", lambda p: p.data(b"", flags=W, ack=p.a_max + 10), False),
        ("duplicate ACK", lambda p: p.data(b"", flags=W, ack=p.una), False),
        ("window change", lambda p: (setattr(p, "window", 400), p.data(b"w", ack=p.una))[1], False),
        ("same window again, ACK of all", lambda p: p.data(b"", flags=W), True),
        ("SACK option", lambda p: p.data(b"s", options=wire.tcp_options(sack=[(p.una, p.una)])), False),
        ("timestamp option", lambda p: p.data(b"t", options=wire.tcp_options(timestamp=(1, 2))), False),
        ("URG", lambda p: p.data(b"u", urgent=True), False),
        ("out of order", lambda p: p.data(b"later", seq=p.b_nxt + 10), False),
        ("in order while out-of-order data is held", lambda p: p.data(b"0123456789"), False),
        ("in order after the hole filled", lambda p: (setattr(p, "b_nxt", p.b_nxt + 5), p.data(b"n"))[1], True),
        ("retransmitted old data", lambda p: p.data(b"dup", seq=p.b_nxt - 3), False),
        ("beyond the window", lambda p: p.data(b"f", seq=p.b_nxt + 70_000), False),
        ("send 5", lambda p: p.app_send(5), None),
        ("zero window", lambda p: (setattr(p, "window", 0), p.data(b"", flags=W))[1], False),
        ("send 2000 into a zero window", lambda p: p.app_send(2000), None),
        ("zero window again, with data", lambda p: p.data(b"q"), False),
        ("persist timer", lambda p: p.timer(), None),
        ("window reopens", lambda p: (setattr(p, "window", 512), p.data(b"", flags=W))[1], False),
        ("data, window as before", lambda p: p.data(b"r", ack=p.una), True),
        ("a timer run", lambda p: p.timer(), None),
        ("SYN on the established connection (challenge ACK)", lambda p: p.data(b"", flags=wire.SYN | W), False),
        ("FIN", lambda p: p.data(b"bye", flags=W | wire.FIN), False),
        ("data after FIN", lambda p: p.data(b"more"), False),
        ("close", lambda p: (p.conn.close(), p.out())[1], None),
        ("ACK of our FIN", lambda p: p.data(b"", flags=W), False),
    ]


def _run_script(monkeypatch: pytest.MonkeyPatch, fast: bool, checksums: bool) -> tuple[list, list]:
    monkeypatch.setattr(tcp_mod, "FAST_PATH", fast)
    spy = FastPathSpy(monkeypatch)
    p = ScriptedPeer(checksums=checksums)
    taken = []
    for name, action, _ in _script():
        before = spy.taken
        p.now += 0.001
        action(p)
        p.out()
        taken.append((name, spy.taken - before))
    monkeypatch.undo()
    return p.trace, taken


@pytest.mark.parametrize("checksums", [True, False])
def test_scripted_segments_same_with_and_without_fast_path(monkeypatch, checksums):
    slow_trace, slow_taken = _run_script(monkeypatch, False, checksums)
    fast_trace, fast_taken = _run_script(monkeypatch, True, checksums)
    assert all(n == 0 for _, n in slow_taken)
    for (name, _, expect), (_, n) in zip(_script(), fast_taken, strict=True):
        if expect is not None and PATCHABLE:
            assert n == int(expect), f"{name}: fast path taken {n} times, expected {int(expect)}"
    assert len(fast_trace) == len(slow_trace)
    for i, (f, s) in enumerate(zip(fast_trace, slow_trace, strict=True)):
        assert f == s, f"trace entry {i} differs"


def test_template_builds_the_same_bytes_as_build_ipv4_tcp():
    rng = random.Random(7)
    for _ in range(3000):
        sport, dport = rng.randrange(1, 65536), rng.randrange(1, 65536)
        src, dst = rng.randbytes(4), rng.randbytes(4)
        tmpl = wire.TcpTemplate(src, dst, sport, dport)
        args = (rng.getrandbits(16), rng.getrandbits(34), rng.getrandbits(34), rng.getrandbits(6), rng.getrandbits(16))
        data = rng.randbytes(rng.choice((0, 1, 2, 3, 57, 1360)))
        opts = rng.choice((b"", wire.tcp_options(sack=[(5, 9), (11, 20)]), wire.tcp_options(mss=1360, wscale=7)))
        for l4 in (True, False):
            for d in (data, bytearray(data)):
                expect = wire.build_ipv4_tcp(src, dst, args[0], sport, dport, *args[1:], d, opts, l4)
                assert tmpl.build(*args, d, opts, l4) == expect


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4), st.integers(1, 65535),
       st.integers(1, 65535), st.integers(0, 0xFFFF), st.integers(0, 2**40), st.integers(0, 2**40),
       st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.binary(max_size=1500), st.booleans())
def test_template_property(src, dst, sport, dport, ident, seq, ack, flags, window, data, l4):
    expect = wire.build_ipv4_tcp(src, dst, ident, sport, dport, seq, ack, flags, window, data, b"", l4)
    assert wire.TcpTemplate(src, dst, sport, dport).build(ident, seq, ack, flags, window, data, b"", l4) == expect


# ---------------------------------------------------------------- two stacks over a bad link


def simulate(monkeypatch: pytest.MonkeyPatch, fast: bool, seed: int, size_a: int, size_b: int, loss: float,
             reorder: float, recv_buffer: int, slow_reader: bool, cc: str = "cubic",
             keepalive: float | None = None) -> tuple[list, int]:
    """A and B exchange data both ways, then close (A verifies checksums and sends none, B the
    other way round); the whole trace: every packet, event, timer and connection state after
    every step, and how often the fast path was taken."""
    monkeypatch.setattr(tcp_mod, "FAST_PATH", fast)
    spy = FastPathSpy(monkeypatch)
    rng = random.Random(seed)
    cfg = TcpConfig(send_buffer=64 * 1024, recv_buffer=recv_buffer, msl=1.0, congestion_control=cc,
                    keepalive_idle=keepalive)
    now = 0.0
    a = deterministic_stack(A_IP, tcp=cfg, checksum_free={B})
    b = deterministic_stack(B_IP, tcp=cfg, verify_checksums=False)
    b.listen(80)
    ca = a.connect(B_IP, 80, now, src_port=40000)
    cb = None
    da, db = rng.randbytes(size_a), rng.randbytes(size_b)
    sent = {"a": 0, "b": 0}
    trace: list[object] = []
    link: list[tuple[float, int, Stack, bytes]] = []
    k = 0
    for _step in range(20_000):
        for name, conn, data in (("a", ca, da), ("b", cb, db)):
            if conn is None or conn.state not in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
                continue
            if sent[name] < len(data):
                chunk = rng.choice((1, 7, 100, 3000, 20000))
                sent[name] += conn.send(data[sent[name]: sent[name] + chunk])
            # close once everything both ways is sent and acknowledged: ESTABLISHED as long as can be
            if sent["a"] == len(da) and sent["b"] == len(db) and ca.unacked == 0 and cb is not None \
                    and cb.unacked == 0:
                conn.close()
        for name, st_, conn in (("a", a, ca), ("b", b, cb)):
            while (e := st_.next_event()) is not None:
                trace.append((name, type(e).__name__))
                if isinstance(e, IncomingConnection):
                    cb = e.conn
            for c in (ca, cb):
                if c is not None and c._stack is st_ and c.readable and not (slow_reader and rng.random() < 0.7):
                    try:
                        trace.append((name, "read", zlib.crc32(c.recv(rng.choice((1, 500, 65536))))))
                    except (BlockingIOError, ConnectionResetError) as exc:
                        trace.append((name, type(exc).__name__))
        for name, st_, other in (("a", a, b), ("b", b, a)):
            for pkt in st_.packets_to_send(now):
                trace.append((name, pkt))
                if rng.random() < loss:
                    continue
                delay = 0.002 + (rng.random() * 0.01 if rng.random() < reorder else 0.0)
                link.append((now + delay, k, other, pkt))
                k += 1
        trace.append(("state", conn_state(ca), conn_state(cb), stack_state(a), stack_state(b)))
        if ca.state is TcpState.CLOSED and (cb is None or cb.state is TcpState.CLOSED) and not link:
            break
        link.sort()
        cands = [t for t in (a.get_timer(), b.get_timer()) if t is not None]
        if link:
            cands.append(link[0][0])
        if not cands:
            break
        now = max(now, min(cands))
        while link and link[0][0] <= now:
            _, _, st_, pkt = link.pop(0)
            st_.receive_packet(pkt, now)
        for st_ in (a, b):
            t = st_.get_timer()
            if t is not None and t <= now:
                st_.handle_timer(now)
    monkeypatch.undo()
    trace.append(("end", ca.state, cb.state if cb is not None else None, sent))
    return trace, spy.taken


def _compare(monkeypatch, *args) -> tuple[list, int]:
    slow, none_taken = simulate(monkeypatch, False, *args)
    fast, taken = simulate(monkeypatch, True, *args)
    assert none_taken == 0
    assert len(fast) == len(slow)
    for i, (f, s) in enumerate(zip(fast, slow, strict=True)):
        assert f == s, f"trace entry {i} differs: fast {f!r:.300} slow {s!r:.300}"
    return fast, taken


def test_clean_transfer_takes_the_fast_path_and_matches(monkeypatch):
    trace, taken = _compare(monkeypatch, 1, 200_000, 30_000, 0.0, 0.0, 64 * 1024, False)
    assert taken > 30 or not PATCHABLE  # (the side that closes first leaves ESTABLISHED, and the fast path with it)
    assert trace[-1][:3] == ("end", TcpState.CLOSED, TcpState.CLOSED)  # (TIME-WAIT ended too)


def test_lossy_transfer_with_a_slow_reader_matches(monkeypatch):
    trace, taken = _compare(monkeypatch, 2, 150_000, 20_000, 0.05, 0.3, 16 * 1024, True)
    assert taken > 0 or not PATCHABLE
    assert trace[-1][:3] == ("end", TcpState.CLOSED, TcpState.CLOSED)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32),
    size_a=st.one_of(st.integers(0, 3000), st.integers(30_000, 120_000)),
    size_b=st.integers(0, 20_000),
    loss=st.sampled_from([0.0, 0.02, 0.1]),
    reorder=st.sampled_from([0.0, 0.3]),
    recv_buffer=st.sampled_from([8 * 1024, 64 * 1024]),
    slow_reader=st.booleans(),
    cc=st.sampled_from(["cubic", "newreno"]),
    keepalive=st.sampled_from([None, 0.05, 2.0]),
)
def test_property_fast_and_full_paths_agree(monkeypatch, seed, size_a, size_b, loss, reorder, recv_buffer,
                                            slow_reader, cc, keepalive):
    _compare(monkeypatch, seed, size_a, size_b, loss, reorder, recv_buffer, slow_reader, cc, keepalive)


def _pingpong(monkeypatch: pytest.MonkeyPatch, fast: bool) -> tuple[list, int]:
    """1-byte ping-pong, each segment delivered at once: the fast paths' own case."""
    monkeypatch.setattr(tcp_mod, "FAST_PATH", fast)
    spy = FastPathSpy(monkeypatch)
    now = 0.0
    a = deterministic_stack(A_IP, verify_checksums=False, checksum_free={B})
    b = deterministic_stack(B_IP, verify_checksums=False, checksum_free={A})
    b.listen(80)
    ca = a.connect(B_IP, 80, now, src_port=40000)
    cb = None
    trace: list[object] = []
    for _ in range(5):
        for p in a.packets_to_send(now):
            b.receive_packet(p, now)
        for p in b.packets_to_send(now):
            a.receive_packet(p, now)
        for e in iter(b.next_event, None):
            if isinstance(e, IncomingConnection):
                cb = e.conn
        list(iter(a.next_event, None))
    assert cb is not None
    for i in range(3000):
        now += 0.0002 if i % 50 else 0.05  # now and then long enough for a delayed ACK
        for x, y, cx, cy in ((a, b, ca, cb), (b, a, cb, ca)):
            cx.send(b"x")
            pkts = x.packets_to_send(now)
            trace.append(pkts)
            for p in pkts:
                y.receive_packet(p, now)
            trace.append([type(e).__name__ for e in iter(y.next_event, None)])
            trace.append(cy.recv(100))
            trace.append((x.get_timer(), y.get_timer()))
            for s in (x, y):
                t = s.get_timer()
                if t is not None and t <= now:
                    s.handle_timer(now)
        trace.append(("state", conn_state(ca), conn_state(cb), stack_state(a), stack_state(b)))
    monkeypatch.undo()
    return trace, spy.taken


def test_pingpong_same_with_and_without_fast_path(monkeypatch):
    slow, _ = _pingpong(monkeypatch, False)
    fast, taken = _pingpong(monkeypatch, True)
    assert taken > 5000 or not PATCHABLE  # most of the 6000 segments (a window change now and then takes the full path)
    assert len(fast) == len(slow)
    for i, (f, s) in enumerate(zip(fast, slow, strict=True)):
        assert f == s, f"trace entry {i} differs"
