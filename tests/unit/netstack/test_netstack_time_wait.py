"""Many short connections between two stacks: TIME-WAIT, SYNs that reuse a 4-tuple, ephemeral
ports (RFC 6056), the bounded TIME-WAIT table. Deterministic, with an injected clock.

The pattern is a browser's through SOCKS: A dials B's port over and over; B's service answers
and closes first, so B holds each connection in TIME-WAIT for 2 * MSL while A keeps dialling.
"""

from __future__ import annotations

import pytest

from overlay.netstack import ConnectionRequest, IncomingConnection, Stack, TcpConfig, TcpState, wire
from overlay.netstack import stack as stack_module
from overlay.netstack.stack import EPHEMERAL_PORTS

from tests.unit.netstack.test_netstack_tcp import A_IP, B_IP, Pair, drain, tcp_of

S = TcpState


def short_connection(p: Pair, port: int = 80, src_port: int | None = None, defer: bool = False):
    """A dials B:port, sends 1 byte, B answers 100 bytes and closes first, then A closes.
    Returns (A's connection, B's connection, seconds the handshake took)."""
    t0 = p.now
    ca = p.a.connect(B_IP, port, p.now, src_port=src_port)
    if defer:
        p.run(0.5, until=lambda: p.events("b", ConnectionRequest))
        req = p.ev["b"].pop(p.ev["b"].index(p.events("b", ConnectionRequest)[0]))
        assert p.b.accept_request(req, p.now) is not None
    p.run(3, until=lambda: ca.state is S.ESTABLISHED and p.events("b", IncomingConnection))
    assert ca.state is S.ESTABLISHED, ca.state
    handshake = p.now - t0
    inc = p.events("b", IncomingConnection)[0]
    p.ev["b"].remove(inc)
    cb = inc.conn
    ca.send(b"q")
    p.run(0.5, until=lambda: cb.unread == 1)
    assert drain(cb) == b"q"
    cb.send(b"x" * 100)
    cb.close()
    p.run(0.5, until=lambda: ca.at_eof)
    assert drain(ca) == b"x" * 100
    ca.close()
    p.run(0.5, until=lambda: ca.state is S.CLOSED and cb.state is S.TIME_WAIT)
    assert ca.state is S.CLOSED and cb.state is S.TIME_WAIT
    p.ev["a"].clear()
    p.ev["b"].clear()
    return ca, cb, handshake


@pytest.mark.parametrize("defer", [False, True], ids=["listen", "deferred-listen"])
def test_syn_with_higher_isn_reopens_time_wait(defer):
    """A SYN for a 4-tuple B holds in TIME-WAIT, with a sequence number beyond the old
    connection's, starts the new connection at once (RFC 1122 4.2.2.13): no RST exchange, no
    one-second retransmission timeout on A."""
    p = Pair()
    p.b.listen(80, defer=defer)
    _, old_b, _ = short_connection(p, src_port=40000, defer=defer)
    p.run(0.05)
    p.log.clear()
    ca, cb, handshake = short_connection(p, src_port=40000, defer=defer)
    assert handshake < 0.1, f"the handshake waited {handshake:.3f} s (a SYN retransmission)"
    assert p.b.stats["time_wait_reopened"] == 1
    assert not [s for _, _, pkt in p.log if (s := tcp_of(pkt)) is not None and s.flags & wire.RST]
    assert old_b.state is S.CLOSED and cb is not old_b
    # the new incarnation's ISN lies beyond the old connection's sequence numbers
    assert (cb.iss - old_b.snd_max) % (1 << 32) < (1 << 31)


def test_syn_with_lower_isn_in_time_wait_is_answered_not_dropped():
    """An old or foreign SYN (sequence number not beyond the old connection) must not be silently
    dropped: TIME-WAIT answers it with an ACK of what it holds (RFC 9293), so a live peer resets
    and retries rather than waiting out timeouts; TIME-WAIT itself stays."""
    p = Pair()
    p.b.listen(80)
    _, cb, _ = short_connection(p, src_port=40001)
    old_seq = (cb.rcv_nxt - 1000) & 0xFFFFFFFF
    syn = wire.build_ipv4_tcp(wire.ip_to_bytes(A_IP), wire.ip_to_bytes(B_IP), 1, 40001, 80, old_seq, 0,
                              wire.SYN, 65535, b"", wire.tcp_options(mss=1360))
    p.b.receive_packet(syn, p.now)
    out = [tcp_of(pkt) for pkt in p.b.packets_to_send(p.now)]
    assert len(out) == 1 and out[0].flags == wire.ACK and out[0].ack == cb.rcv_nxt & 0xFFFFFFFF
    assert cb.state is S.TIME_WAIT and p.b.stats["time_wait_reopened"] == 0


def test_ephemeral_ports_to_one_destination_walk_the_whole_range():
    """RFC 6056: consecutive connections to one peer:port take successive ports, so a 4-tuple
    comes back only after the whole range was used (the peer may still hold it in TIME-WAIT).
    Random picks repeat a port after a few hundred connections (birthday paradox)."""
    st = Stack(A_IP, now=0.0)
    seen = []
    for i in range(len(EPHEMERAL_PORTS)):
        c = st.connect(B_IP, 80, float(i))
        seen.append(c.local_port)
        c.abort()
    st.packets_to_send()
    assert len(set(seen)) == len(EPHEMERAL_PORTS)
    assert all(p in EPHEMERAL_PORTS for p in seen)
    # the next one starts over where the first began
    c = st.connect(B_IP, 80, 1e5)
    assert c.local_port == seen[0]
    # ports still in use (or in TIME-WAIT here) are skipped
    d = st.connect(B_IP, 80, 1e5)
    assert d.local_port == seen[1]


def test_ephemeral_port_sequences_differ_per_destination_and_stack():
    """The offset is a keyed hash of the destination: other peers (or another stack) see no
    shared counter to predict ports from."""
    st, other = Stack(A_IP, now=0.0), Stack(A_IP, now=0.0)
    to80 = [st.connect(B_IP, 80, 0.0).local_port for _ in range(3)]
    to81 = [st.connect(B_IP, 81, 0.0).local_port for _ in range(3)]
    again = [other.connect(B_IP, 80, 0.0).local_port for _ in range(3)]
    assert to80[1] - to80[0] in (1, 1 - len(EPHEMERAL_PORTS))
    assert to80[0] != to81[0] and to80[0] != again[0]


def test_time_wait_table_is_bounded_and_expires():
    """Past ``max_time_wait`` entries the oldest TIME-WAIT connection is recycled; the rest still
    expire after 2 * MSL, and timers and lookups stay fast however many there are."""
    p = Pair(TcpConfig(msl=30))
    p.b = Stack(B_IP, now=p.now, max_time_wait=50)
    p.b.listen(80)
    held = []
    for _ in range(120):
        _, cb, handshake = short_connection(p)
        assert handshake < 0.1
        held.append(cb)
    assert p.b.time_wait_count == 50 and p.b.stats["time_wait_recycled"] == 70
    assert len(p.b.connections) == 50
    assert all(c.state is S.CLOSED for c in held[:70]) and all(c.state is S.TIME_WAIT for c in held[70:])
    p.run(61)
    assert p.b.time_wait_count == 0 and not p.b.connections and not p.a.connections


def test_retransmitted_fin_rearms_time_wait_in_order():
    """A FIN retransmitted to a TIME-WAIT connection restarts its 2 * MSL; the table stays in expiry
    order so the next timer is the first entry's."""
    p = Pair(TcpConfig(msl=5))
    p.b.listen(80)
    _, first, _ = short_connection(p)
    p.run(1)
    _, second, _ = short_connection(p)
    p.run(3)
    p.drop = lambda pkt, src: src == "a"  # (A, whose side is gone, would reset TIME-WAIT)
    # the peer retransmits its FIN to the first connection: TIME-WAIT starts over
    fin = wire.build_ipv4_tcp(wire.ip_to_bytes(A_IP), wire.ip_to_bytes(B_IP), 1, first.remote_port, 80,
                              (first.rcv_nxt - 1) & 0xFFFFFFFF, first.snd_max & 0xFFFFFFFF, wire.FIN | wire.ACK,
                              1000, b"")
    p.b.receive_packet(fin, p.now)
    assert p.b.get_timer() == pytest.approx(second._close_at)
    assert first._close_at == pytest.approx(p.now + 10)
    p.run(second._close_at - p.now + 0.1)
    assert second.state is S.CLOSED and first.state is S.TIME_WAIT
    p.run(3)
    assert first.state is S.CLOSED and p.b.time_wait_count == 0


@pytest.mark.slow
def test_many_short_connections_never_wait_for_a_retransmission(monkeypatch):
    """The whole pattern, with the port range cut to 500 so it wraps three times: B holds every
    connection in TIME-WAIT (long MSL, big table); A's ports walk the range, and each SYN that lands
    on a TIME-WAIT entry reopens it. Not one handshake may need a SYN retransmission (with random
    ports, a growing share of SYNs hit TIME-WAIT and waited out the 1 s RTO)."""
    monkeypatch.setattr(stack_module, "EPHEMERAL_PORTS", range(50000, 50500))
    p = Pair(TcpConfig(msl=600))
    p.b = Stack(B_IP, now=p.now, tcp=TcpConfig(msl=600), max_time_wait=10_000)
    p.b.listen(80)
    slow = []
    for i in range(1500):
        _, _, handshake = short_connection(p)
        if handshake >= 0.5:
            slow.append(i)
    assert not slow, f"{len(slow)} handshakes waited for a retransmission, the first at connection {slow[0]}"
    assert p.b.stats["time_wait_reopened"] == 1000 and p.b.time_wait_count == 500
