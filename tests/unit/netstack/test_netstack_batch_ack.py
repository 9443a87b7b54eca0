"""ACKs per received batch (as GRO gives Linux): one cumulative ACK for a batch's in-order
segments, the window as it stands after the batch, duplicate ACKs still one per out-of-order
segment (fast retransmit), and window updates after reads only when the window doubles."""

from __future__ import annotations

from overlay.netstack import TcpConfig, wire

from .test_netstack_tcp import Pair, drain, tcp_of

MSS = 1360  # Pair's MTU 1400 - 40


def _burst(p: Pair, ca, n: int) -> list[bytes]:
    """``n`` full data segments from A, taken off A's output (not delivered)."""
    ca.send(bytes(range(256)) * (n * MSS // 256) + bytes(n * MSS % 256))
    segs = [pkt for pkt in p.a.packets_to_send(p.now) if tcp_of(pkt).data]
    assert len(segs) == n
    return segs


def _seq_end(pkt: bytes) -> int:
    s = tcp_of(pkt)
    return (s.seq + len(s.data)) & 0xFFFFFFFF


def test_a_batch_of_in_order_segments_gets_one_ack_with_the_window_after_it():
    p = Pair(TcpConfig(recv_buffer=64 * MSS))
    ca, cb = p.connect()
    segs = _burst(p, ca, 10)
    for pkt in segs:
        p.b.receive_packet(pkt, p.now)
    acks = [tcp_of(q) for q in p.b.packets_to_send(p.now)]
    assert len(acks) == 1
    (ack,) = acks
    assert ack.flags == wire.ACK and not ack.data
    assert ack.ack == _seq_end(segs[-1])  # everything in the batch
    assert cb.unread == 10 * MSS
    # the window counts all of the batch's unread data
    assert ack.window << cb._rcv_wscale == 64 * MSS - 10 * MSS
    assert drain(cb) == bytes(range(256)) * (10 * MSS // 256) + bytes(10 * MSS % 256)


def test_segments_one_batch_each_are_acked_every_second_segment():
    p = Pair()
    ca, _ = p.connect()
    acks = []
    for pkt in _burst(p, ca, 6):
        p.b.receive_packet(pkt, p.now)
        acks += [tcp_of(q) for q in p.b.packets_to_send(p.now)]
    assert len(acks) == 3


def test_a_single_segment_batch_waits_for_the_delayed_ack_timer():
    p = Pair()
    ca, _ = p.connect()
    (seg,) = _burst(p, ca, 1)
    p.b.receive_packet(seg, p.now)
    assert p.b.packets_to_send(p.now) == []
    t = p.b.get_timer()
    assert t is not None and t <= p.now + p.b.tcp_config.delayed_ack
    p.b.handle_timer(t)
    (ack,) = [tcp_of(q) for q in p.b.packets_to_send(t)]
    assert ack.ack == _seq_end(seg)


def test_out_of_order_segments_in_a_batch_each_get_a_duplicate_ack_with_sack():
    p = Pair()
    ca, _ = p.connect()
    segs = _burst(p, ca, 5)
    hole = tcp_of(segs[1]).seq
    for pkt in (segs[0], *segs[2:]):  # segment 1 lost
        p.b.receive_packet(pkt, p.now)
    acks = [tcp_of(q) for q in p.b.packets_to_send(p.now)]
    assert len(acks) == 3  # one per out-of-order segment: the sender counts them
    assert all(a.ack == hole for a in acks)  # (the first also acknowledges segment 0)
    assert [a.sack[0][1] for a in acks] == [_seq_end(s) for s in segs[2:]]  # SACK grows per segment
    # the hole filled: one ACK for everything
    p.b.receive_packet(segs[1], p.now)
    (ack,) = [tcp_of(q) for q in p.b.packets_to_send(p.now)]
    assert ack.ack == _seq_end(segs[-1]) and not ack.sack


def test_a_lost_segment_in_a_batch_is_fast_retransmitted_with_and_without_sack():
    for sack in (True, False):
        p = Pair()
        ca, cb = p.connect()
        if not sack:
            ca.sack_ok = cb.sack_ok = False
        dropped = []

        def drop(pkt, src):
            s = tcp_of(pkt)
            if src == "a" and s.data and not dropped and s.seq == (ca.iss + 1 + 3 * MSS) & 0xFFFFFFFF:
                dropped.append(s.seq)
                return True
            return False

        p.drop = drop
        data = bytes(range(256)) * 200
        ca.send(data)
        p.run(0.15)  # well under the 200 ms minimum RTO
        assert dropped
        assert drain(cb) == data
        assert ca.stats["fast_recoveries"] == 1 and ca.stats["timeouts"] == 0, (sack, ca.stats)


def test_a_read_sends_a_window_update_only_when_the_window_doubles():
    p = Pair(TcpConfig(recv_buffer=20 * MSS))
    ca, cb = p.connect()
    ca.send(bytes(20 * MSS))
    p.run(0.01)
    assert cb.unread == 20 * MSS  # the window is full
    p.b.packets_to_send(p.now)
    cb.recv(MSS)  # 1 MSS free: below the receiver's silly-window floor (2 MSS)
    assert p.b.packets_to_send(p.now) == []
    cb.recv(2 * MSS)  # 3 MSS free against 0 advertised: update
    (upd,) = [tcp_of(q) for q in p.b.packets_to_send(p.now)]
    assert upd.window == 3 * MSS
    cb.recv(2 * MSS)  # 5 MSS free against 3 still advertised: not double, no update
    assert p.b.packets_to_send(p.now) == []
    cb.recv(MSS)  # 6 MSS free against 3 advertised: double
    (upd,) = [tcp_of(q) for q in p.b.packets_to_send(p.now)]
    assert upd.window == 6 * MSS
