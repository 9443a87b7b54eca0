"""One TCP connection: the RFC 9293 state machine, sans-I/O.

A :class:`TcpConnection` lives inside a :class:`~overlay.netstack.stack.Stack`, which hands it
parsed segments and timer ticks and collects the packets it emits. The application side is
``send`` / ``recv`` / ``close`` / ``abort`` plus events queued on the stack.

What it implements, and where the rules come from:

- states, segment acceptability, RST/SYN handling: RFC 9293 §3.10, with RFC 5961 challenge ACKs;
- MSS, window scaling (RFC 7323), SACK (RFC 2018): we generate SACK blocks and the sender keeps
  a scoreboard, skips SACKed data and retransmits holes (a simplified RFC 6675 "pipe");
- RTO: RFC 6298 with Karn's rule and exponential backoff (minimum 200 ms like Linux, since
  RFC 6298's 1 s minimum makes every tail loss on a sub-millisecond tunnel cost a second);
- fast retransmit / fast recovery: NewReno (RFC 6582) with SACK-based loss marking, limited
  transmit (RFC 3042), and detection of lost retransmissions (a retransmission is deemed lost
  again once data sent after it is SACKed, a sequence-based form of RACK);
- loss probes (RFC 8985 TLP, PTO = 2 * SRTT): when a window's ACKs are lost, or its tail, a
  probe (or, with SACK evidence, recovery) fires long before the RTO. Against Linux over a TUN
  with 5 % loss each way this took 50 MB from ~70 s (RTO-bound) to ~3 s;
- zero-window probing (persist timer), receiver and sender silly-window avoidance, delayed
  ACKs (every second full segment, at most ``delayed_ack`` seconds), keepalive, TIME-WAIT;
- ACKs per batch, as GRO gives Linux: what a segment makes due (an ACK, data its ACK lets out)
  waits for the end of the batch it arrived in (the stack's next ``packets_to_send``), so a
  batch of in-order segments is answered by one cumulative ACK with the window as it stands
  then; a duplicate ACK (out-of-order or duplicate data) still goes out per segment, with its
  SACK blocks, for the sender's fast retransmit. Window updates after a read follow Linux: only
  when the window at least doubles over what the peer still has (``recv``).

Fast paths, as Linux has them (header prediction, Van Jacobson's): the common segment of an
established connection (ACK, maybe PSH, no options, the next in sequence, the window unchanged,
acknowledging new data or carrying data that fits, nothing out of order or in recovery) is parsed
by the stack in one go and handled by ``_fast_segment`` in one straight function; sending new
data when nothing is due for retransmission is one loop in ``_send_data``, each packet built
from the connection's header template (``wire.TcpTemplate``). Each has exactly the effect of
the full path it shortcuts (same packets, events, timers and state: the tests run both and
compare); anything else takes the full path.

Sequence numbers are kept unwrapped (Python ints starting at the ISN that never wrap) and
masked to 32 bits only on the wire; incoming numbers are unwrapped to the value nearest the
reference point. That makes every comparison a plain integer comparison.

Buffers are bounded: ``send()`` accepts at most the free send-buffer space; the receive window
advertises only the space not taken by unread data, so a slow reader stops the peer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import events
from .congestion import CONGESTION_CONTROLS
from .reassembly import ReassemblyBuffer
from .sack import SackScoreboard
from .wire import ACK, FIN, MAX_SACK_BLOCKS, PSH, RST, SYN, TcpSegment, TcpTemplate, ip_to_str, tcp_options

if TYPE_CHECKING:
    from .stack import Stack

MASK32 = 0xFFFFFFFF
HALF32 = 0x80000000
DEFAULT_PEER_MSS = 536  # RFC 9293 §3.7.1 when the SYN carries no MSS option
MIN_PEER_MSS = 64  # refuse to be driven into absurdly small segments by a hostile MSS option
MAX_PROBES = 5  # loss probes (PTO doubling each time) before leaving it to the RTO
# header prediction (``TcpConnection._fast_segment``); tests turn it off to compare both paths
FAST_PATH = True


def unwrap(value: int, reference: int) -> int:
    """The unwrapped sequence number congruent to 32-bit ``value`` nearest to ``reference``."""
    return reference + ((value - reference + HALF32) & MASK32) - HALF32


class TcpState(enum.Enum):
    CLOSED = "CLOSED"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"

    # members are singletons: hash them by identity, in C (Enum's own __hash__ is Python code
    # hashing the name, and states are looked up in the sets below for every segment)
    __hash__ = object.__hash__


S = TcpState
_SYNCHRONIZED = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSE_WAIT, S.CLOSING, S.LAST_ACK, S.TIME_WAIT})
_CAN_RECEIVE = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2})
_CAN_SEND = frozenset({S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK})


@dataclass
class TcpConfig:
    """Per-stack TCP tunables. Defaults suit a tunnel with an inner MTU of 1280-1420."""

    send_buffer: int = 256 * 1024
    recv_buffer: int = 256 * 1024
    initial_rto: float = 1.0  # RFC 6298 §2.1
    min_rto: float = 0.2
    max_rto: float = 60.0
    syn_retries: int = 6  # 1+2+4+...: about 2 minutes, like Linux
    max_retries: int = 15  # data retransmissions before giving up (Linux tcp_retries2)
    delayed_ack: float = 0.04
    msl: float = 30.0  # TIME-WAIT lasts 2 * MSL
    fin_wait_2_timeout: float = 60.0  # orphaned connections only (Linux tcp_fin_timeout)
    keepalive_idle: float | None = None  # seconds of silence before probing; None disables
    keepalive_interval: float = 15.0
    keepalive_count: int = 4
    congestion_control: str = "cubic"
    max_ooo_blocks: int = 32


class TcpConnection:
    """A TCP connection (one 4-tuple). Created by ``Stack.connect`` or by a SYN to a listened port.

    Application API: :meth:`send`, :meth:`recv`, :meth:`close`, :meth:`abort`, the properties
    ``state``, ``readable``, ``writable``, ``at_eof``, ``send_space``, and events on the stack.
    """

    def __init__(
        self,
        stack: Stack,
        config: TcpConfig,
        local_ip: bytes,
        local_port: int,
        remote_ip: bytes,
        remote_port: int,
        iss: int,
        our_mss: int,
        passive: bool,
    ):
        self._stack = stack
        self._cfg = config
        self.local_ip_bytes = local_ip
        self.local_port = local_port
        self.remote_ip_bytes = remote_ip
        self.remote_port = remote_port
        self.passive = passive
        self.half_open_slot = False  # counts against its listener's backlog while SYN-RECEIVED
        self.orphan = False  # closed with orphan=True: the application reads no more
        # active open: the ACK of the SYN-ACK waits for the next timer run, so that data the
        # application writes as soon as it is connected carries it (Linux does so with a write
        # pending): one packet fewer per connection whose dialler speaks first
        self.defer_handshake_ack = False
        self.state = S.CLOSED
        self.error: str | None = None  # why the connection ended abnormally
        self._syn_seen: TcpSegment | None = None  # the peer's SYN (its options shape our SYN-ACK)

        # --- send side
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss  # highest sequence sent + 1 (snd_nxt rewinds on RTO, this does not)
        self.snd_wnd = 0
        self._snd_wl1 = 0
        self._snd_wl2 = 0
        self._max_snd_wnd = 0
        self._snd_wscale = 0  # shift applied to the peer's window field
        self._sndbuf = bytearray()
        self._buf_seq = iss + 1  # sequence number of _sndbuf[0]
        self._fin_queued = False
        self._send_blocked = False  # send() refused bytes: emit Writable when space frees
        self.our_mss = our_mss
        self.mss = min(our_mss, DEFAULT_PEER_MSS)

        # --- receive side
        self.irs = 0
        self.rcv_nxt = 0
        self._rcv_adv = 0  # right edge of the window we advertised
        self._rcv_wscale = 0
        self._rcv_cap = config.recv_buffer
        self._rcvbuf = bytearray()
        self._ooo = ReassemblyBuffer(config.max_ooo_blocks)
        self._peer_fin_seq: int | None = None  # FIN seen out of order
        self._fin_received = False
        self._ack_now = False
        self._ack_at_once = False  # a duplicate ACK is due: send it before the next segment
        self._delack_bytes = 0
        self._data_event_pending = False

        # --- options
        self.sack_ok = False
        self._ws_ok = False
        ws = 0
        while (self._rcv_cap >> ws) > 0xFFFF and ws < 14:
            ws += 1
        self._our_wscale = ws

        # --- timers (absolute times or None) and RTT state
        self._rto_at: float | None = None
        self._delack_at: float | None = None
        self._persist_at: float | None = None
        self._keepalive_at: float | None = None
        self._close_at: float | None = None  # TIME-WAIT / FIN-WAIT-2 expiry
        self.deadline: float | None = None
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto = config.initial_rto
        self._backoff = 0
        self._retries = 0
        self._persist_backoff = 0
        self._keepalive_probes = 0
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0

        # --- loss recovery
        self.cc = CONGESTION_CONTROLS[config.congestion_control](self.mss)
        self._sb = SackScoreboard()
        self._dupacks = 0
        self._in_recovery = False
        self._recover = iss
        self._rexmit_nxt = iss
        self._lost_hi = iss
        self._rexmit_marks: dict[int, int] = {}
        self._rexmit_una = False  # retransmit the first unSACKed segment regardless of cwnd
        self._tail_probe = False  # send one probe segment regardless of cwnd (RFC 8985 TLP)
        self._window_probe = False  # persist timer: fill a small window despite SWS avoidance
        self._probe_at: float | None = None
        self._probe_count = 0

        self.stats = {"retransmits": 0, "timeouts": 0, "fast_recoveries": 0, "probes": 0}
        # the per-segment fast paths (header prediction, new data only, header template)
        self._fast = FAST_PATH
        self._tmpl = TcpTemplate(local_ip, remote_ip, local_port, remote_port)

    # ------------------------------------------------------------------ application API

    @property
    def local_ip(self) -> str:
        return ip_to_str(self.local_ip_bytes)

    @property
    def remote_ip(self) -> str:
        return ip_to_str(self.remote_ip_bytes)

    @property
    def send_space(self) -> int:
        """Bytes ``send()`` would accept now."""
        if self._fin_queued or self.state not in _CAN_SEND and self.state not in (S.SYN_SENT, S.SYN_RECEIVED):
            return 0
        return max(0, self._cfg.send_buffer - len(self._sndbuf))

    @property
    def writable(self) -> bool:
        return self.send_space > 0

    @property
    def readable(self) -> bool:
        """True if ``recv()`` would return without raising BlockingIOError."""
        return bool(self._rcvbuf) or self._fin_received or self.state is S.CLOSED

    @property
    def at_eof(self) -> bool:
        """The peer finished sending and every byte has been read."""
        return self._fin_received and not self._rcvbuf

    @property
    def unread(self) -> int:
        return len(self._rcvbuf)

    @property
    def unacked(self) -> int:
        """Bytes queued for sending that the peer has not acknowledged yet."""
        return len(self._sndbuf)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue bytes for sending; returns how many were accepted (0 when the buffer is full)."""
        if self.state is S.CLOSED:
            raise ConnectionResetError(self.error or "connection closed")
        if self._fin_queued:
            raise BrokenPipeError("send after close()")
        space = self._cfg.send_buffer - len(self._sndbuf)
        n = min(space, len(data))
        if n < len(data):
            self._send_blocked = True
        if n <= 0:
            return 0
        self._sndbuf += data[:n] if n < len(data) else data
        if self.state in _CAN_SEND:
            self._stack._mark_dirty(self)
        return n

    def recv(self, max_bytes: int = 65536) -> bytes:
        """Take up to ``max_bytes`` of received data.

        Returns b'' at end of stream; raises BlockingIOError when nothing is available yet and
        ConnectionResetError if the connection was reset or timed out.
        """
        buf = self._rcvbuf
        if not buf:
            self._data_event_pending = False
            if self._fin_received:
                return b""
            if self.state is S.CLOSED:
                if self.error:
                    raise ConnectionResetError(self.error)
                return b""
            raise BlockingIOError("no data available")
        if max_bytes >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:max_bytes])
            del buf[:max_bytes]
        if not buf:
            self._data_event_pending = False
        if (self.state in _CAN_RECEIVE or self.state is S.CLOSE_WAIT) and not self._fin_received:
            # a window update when the window at least doubles over what the peer has left (Linux
            # tcp_cleanup_rbuf) by enough to matter (receiver SWS rule); not for a small read while
            # the peer still has plenty of room (the first small read of a connection, whose window
            # only looks grown from the SYN's 64 KiB cap): the next ACK carries it
            left = self._rcv_adv - self.rcv_nxt
            new = self._rcv_cap - len(buf)
            most = 0xFFFF << self._rcv_wscale
            if new > most:
                new = most
            if new >= 2 * left:
                enough = min(self._rcv_cap // 2, 2 * self.our_mss)
                if new - left >= enough and (len(data) >= enough or left < 8 * enough):
                    self._ack_now = True
                    self._stack._mark_dirty(self)
        return data

    def close(self, *, orphan: bool = False) -> None:
        """Send FIN after the queued data.

        By default a half-close: receiving continues until the peer's FIN, however long that takes.
        ``orphan=True`` means the application is done with the connection: received data is
        discarded from now on, and if the peer never closes its side the connection is dropped
        ``fin_wait_2_timeout`` seconds after the peer went quiet.
        """
        if orphan:
            self.orphan = True
            if self._rcvbuf:
                self._rcvbuf.clear()
                self._ack_now = self.state in _SYNCHRONIZED  # the window reopened
                self._stack._mark_dirty(self)
        st = self.state
        if st is S.SYN_SENT:
            self._terminate(None)
            return
        if st is S.SYN_RECEIVED:
            self.abort()
            return
        if st is S.ESTABLISHED:
            self.state = S.FIN_WAIT_1
        elif st is S.CLOSE_WAIT:
            self.state = S.LAST_ACK
        else:
            if orphan and st is S.FIN_WAIT_2 and self._close_at is None:
                self._close_at = self._stack.now + self._cfg.fin_wait_2_timeout
                self._update_deadline()
            return
        self._fin_queued = True
        self._stack._mark_dirty(self)

    def abort(self) -> None:
        """Reset the connection now (RST to the peer, buffers dropped)."""
        if self.state is S.CLOSED:
            return
        if self.state in _SYNCHRONIZED or self.state is S.SYN_RECEIVED:
            self._send_segment(self.snd_max, RST | ACK)
        self._terminate("aborted locally")

    def __repr__(self) -> str:
        return (
            f"<TcpConnection {self.local_ip}:{self.local_port} -> {self.remote_ip}:{self.remote_port}"
            f" {self.state.value}>"
        )

    # ------------------------------------------------------------------ opening

    def _syn_options(self, reply_to: TcpSegment | None) -> bytes:
        if reply_to is None:  # active open: offer everything
            return tcp_options(mss=self.our_mss, wscale=self._our_wscale, sack_permitted=True)
        return tcp_options(
            mss=self.our_mss,
            wscale=self._our_wscale if reply_to.wscale is not None else None,
            sack_permitted=reply_to.sack_permitted,
        )

    def _send_syn(self) -> None:
        flags = SYN | ACK if self.state is S.SYN_RECEIVED else SYN
        opts = self._syn_options(self._syn_seen) if flags & ACK else self._syn_options(None)
        # the window field of a SYN is never scaled (RFC 7323 §2.2)
        self._send_segment(self.iss, flags, options=opts, window=min(self._rcv_cap, 0xFFFF))
        if self._retries == 0:
            self._rtt_seq = self.iss + 1
            self._rtt_time = self._stack.now

    def _start_active(self, now: float) -> None:
        self.state = S.SYN_SENT
        self.snd_nxt = self.snd_max = self.iss + 1
        self._send_syn()
        self._rto_at = now + self._rto
        self._update_deadline()

    def _take_syn(self, seg: TcpSegment) -> None:
        """Record what the peer's SYN tells us: its ISN and options."""
        self._syn_seen = seg
        self.irs = seg.seq
        self.rcv_nxt = seg.seq + 1
        self.mss = max(MIN_PEER_MSS, min(self.our_mss, seg.mss if seg.mss is not None else DEFAULT_PEER_MSS))
        self.cc = CONGESTION_CONTROLS[self._cfg.congestion_control](self.mss)
        self.sack_ok = seg.sack_permitted
        if seg.wscale is not None:
            self._ws_ok = True
            self._snd_wscale = seg.wscale
            self._rcv_wscale = self._our_wscale
        self._rcv_adv = self.rcv_nxt + min(self._rcv_cap, 0xFFFF)

    def _start_passive(self, seg: TcpSegment, now: float) -> None:
        self.state = S.SYN_RECEIVED
        self._take_syn(seg)
        self.snd_wnd = seg.window
        self._snd_wl1, self._snd_wl2 = seg.seq, self.iss
        self.snd_nxt = self.snd_max = self.iss + 1
        self._send_syn()
        self._rto_at = now + self._rto
        self._keepalive_reset(now)
        self._update_deadline()

    def _establish(self, now: float) -> None:
        self.state = S.ESTABLISHED
        self._retries = 0
        self._backoff = 0
        self._rto_at = None
        self._keepalive_reset(now)
        ev = events.IncomingConnection(self) if self.passive else events.Connected(self)
        self._stack._event(ev)

    # ------------------------------------------------------------------ segment arrival

    def _fast_segment(self, seq: int, ack: int, flags: int, window: int, data: bytes, now: float) -> bool:
        """Header prediction (Van Jacobson's fast path, Linux's tcp_rcv_established): the common
        segment of an established connection, handled in one go with exactly the effect the full
        path (``_on_segment``) would have. ``seq`` and ``ack`` are the 32-bit fields, ``window``
        the raw field, ``flags`` masked to the six classic bits; the segment has no options.

        It qualifies when: ESTABLISHED; flags ACK (PSH allowed) and nothing else; seq == rcv_nxt;
        the window unchanged and not zero; snd_una <= ack <= snd_max, and either new data
        acknowledged or data carried (a bare ACK of nothing new may be a duplicate ACK); the data
        fits the window; nothing held out of order, no FIN seen, no SACK scoreboard, not in
        recovery, no retransmission being watched. Returns False, having changed nothing,
        otherwise: the caller takes the full path."""
        rcv_nxt = self.rcv_nxt
        una = self.snd_una
        acked = (ack - una) & MASK32  # ack - snd_una, unwrapped
        n = len(data)
        if (
            self.state is not S.ESTABLISHED
            or flags & ~PSH != ACK
            or seq != rcv_nxt & MASK32
            or acked > self.snd_max - una
            or not (acked or n)
            or window << self._snd_wscale != self.snd_wnd
            or not window  # a zero window: the persist timer's business
            or n > self._rcv_adv - rcv_nxt
            or self._in_recovery
            or self._ooo._starts
            or self._peer_fin_seq is not None
            or self._sb.ranges
            or self._rexmit_marks
        ):  # (ESTABLISHED is never orphaned: close(orphan=True) leaves it)
            return False
        ack = una + acked
        idle = self._cfg.keepalive_idle
        if idle is not None:
            self._keepalive_at = now + idle
            self._keepalive_probes = 0
        # the window is unchanged: only its update point moves (RFC 9293 §3.10.7.4)
        wl1 = self._snd_wl1
        if wl1 < rcv_nxt or (wl1 == rcv_nxt and self._snd_wl2 <= ack):
            self._snd_wl1 = rcv_nxt
            self._snd_wl2 = ack
            if self.snd_wnd > self._max_snd_wnd:
                self._max_snd_wnd = self.snd_wnd
        if acked:  # _on_new_ack outside recovery, with no SACK scoreboard
            self._probe_count = 0
            self._probe_at = None
            self.snd_una = ack
            if self.snd_nxt < ack:
                self.snd_nxt = ack
            buf = self._sndbuf
            buf_seq = self._buf_seq
            k = (ack if ack < buf_seq + len(buf) else buf_seq + len(buf)) - buf_seq
            if k > 0:
                del buf[:k]
                self._buf_seq = buf_seq + k
            rtt_seq = self._rtt_seq
            cfg = self._cfg
            if rtt_seq is not None and ack >= rtt_seq:
                self._rtt_sample(now - self._rtt_time)
                self._rtt_seq = None
            self._retries = self._backoff = self._persist_backoff = self._dupacks = 0
            snd_max = self.snd_max
            if una > self.iss and self._cwnd_limited(snd_max - una):
                self.cc.on_ack(acked, now, self._srtt)
            if snd_max > ack:
                rto = self._rto  # _current_rto, the backoff being 0
                self._rto_at = now + (rto if rto <= cfg.max_rto else cfg.max_rto)
            else:
                self._rto_at = None
            # (no FIN of ours is queued in ESTABLISHED)
            if self._send_blocked and cfg.send_buffer - len(buf) >= cfg.send_buffer // 4:
                self._send_blocked = False
                self._stack._events.append(events.Writable(self))
        if n:  # _receive_data in order, nothing held out of order
            self._rcvbuf += data
            self.rcv_nxt = rcv_nxt + n
            if not self._data_event_pending:
                self._data_event_pending = True
                self._stack._events.append(events.DataReceived(self))
            self._delack_bytes += n
            if self._delack_bytes >= 2 * self.our_mss or n < self.mss and self._delack_bytes >= self.mss:
                self._ack_now = True
            elif self._delack_at is None:
                self._delack_at = now + self._cfg.delayed_ack
        self._stack._dirty[self] = None  # output at the end of the batch, as _on_segment
        return True

    def _on_segment(self, seg: TcpSegment, now: float) -> None:
        st = self.state
        if st is S.SYN_SENT:
            self._on_segment_syn_sent(seg, now)
        elif st is not S.CLOSED:
            self._on_segment_synchronized(seg, now)
        if self.state is not S.CLOSED:
            if self._ack_at_once:
                self._ack_at_once = False
                self._output(now)  # a duplicate ACK: one per segment, its SACK blocks current
                self._update_deadline()
            else:
                # output at the end of the batch, the deadline with it (Stack.get_timer updates
                # the deadlines of connections still waiting for their output)
                self._stack._mark_dirty(self)

    def _on_segment_syn_sent(self, seg: TcpSegment, now: float) -> None:
        flags = seg.flags
        ack = None
        if flags & ACK:
            ack = unwrap(seg.ack, self.snd_una)
            if ack <= self.iss or ack > self.snd_max:
                if not flags & RST:
                    self._stack._send_rst_for(self.local_ip_bytes, self.remote_ip_bytes, seg)
                return
        if flags & RST:
            if ack is not None:
                self.error = f"connection refused by {self.remote_ip}:{self.remote_port}"
                self._terminate(self.error, events.ConnectionRefused(self))
            return
        if not flags & SYN:
            return
        self._take_syn(seg)
        self._keepalive_reset(now)
        if ack is not None:
            self.snd_una = ack
            self.snd_wnd = seg.window  # unscaled in a SYN
            self._max_snd_wnd = self.snd_wnd
            self._snd_wl1, self._snd_wl2 = seg.seq, ack
            if self._rtt_seq is not None and ack >= self._rtt_seq:
                self._rtt_sample(now - self._rtt_time)
                self._rtt_seq = None
            if self.defer_handshake_ack:
                self._delack_at = now  # due at once, but sent by the timer (after the Connected event)
            else:
                self._ack_now = True
            self._establish(now)
        else:  # simultaneous open (RFC 9293 §3.5 figure 7)
            self.state = S.SYN_RECEIVED
            self.snd_wnd = seg.window
            self._snd_wl1, self._snd_wl2 = seg.seq, self.snd_una
            self._send_syn()

    def _acceptable(self, seq: int, seg_len: int) -> bool:
        wnd = max(0, self._rcv_adv - self.rcv_nxt)
        nxt = self.rcv_nxt
        if seg_len == 0:
            # like Linux, the right window edge itself is acceptable for a bare ACK
            return nxt <= seq <= nxt + wnd
        if wnd == 0:
            return False
        end = seq + seg_len - 1
        return nxt <= seq < nxt + wnd or nxt <= end < nxt + wnd or (seq < nxt and end >= nxt + wnd)

    def _on_segment_synchronized(self, seg: TcpSegment, now: float) -> None:
        flags = seg.flags
        seq = unwrap(seg.seq, self.rcv_nxt)
        seg_len = seg.seg_len
        st = self.state

        if st is S.SYN_RECEIVED and flags & SYN and seq == self.irs:
            if not flags & ACK:
                self._send_syn()  # our SYN-ACK was lost: the peer retransmitted its SYN
                return
            # simultaneous open: the peer's SYN-ACK repeats the SYN we hold; its ACK completes
            seg = seg._replace(seq=(seg.seq + 1) & MASK32, flags=flags & ~SYN)
            flags = seg.flags
            seq += 1
            seg_len -= 1

        if not self._acceptable(seq, seg_len):
            if not flags & RST:
                if st is S.SYN_RECEIVED:
                    self._send_syn()
                else:
                    self._ack_now = True
                    if seg_len:
                        self._ack_at_once = True  # duplicate data: a duplicate ACK
                    if st is S.TIME_WAIT and flags & FIN:
                        self._restart_time_wait(now)  # peer retransmitted its FIN
            return

        self._keepalive_reset(now)
        if st is S.FIN_WAIT_2 and self.orphan:
            self._close_at = now + self._cfg.fin_wait_2_timeout  # the peer is alive: keep waiting

        if flags & RST:
            if seq == self.rcv_nxt:
                if st is S.SYN_RECEIVED and self.passive:
                    self._terminate("reset during handshake")  # back to LISTEN: nothing to tell
                elif st is S.SYN_RECEIVED:
                    self.error = f"connection refused by {self.remote_ip}:{self.remote_port}"
                    self._terminate(self.error, events.ConnectionRefused(self))
                elif st is S.TIME_WAIT:
                    self._terminate(None)
                else:
                    self.error = "connection reset by peer"
                    self._terminate(self.error, events.Reset(self))
            else:
                self._ack_now = True  # RFC 5961 §3.2 challenge ACK
            return

        if flags & SYN:
            self._ack_now = True  # RFC 5961 §4.2: challenge ACK, drop
            return

        if not flags & ACK:
            return

        if st is S.SYN_RECEIVED:
            ack = unwrap(seg.ack, self.snd_una)
            if not (self.snd_una < ack <= self.snd_max):
                self._stack._send_rst_for(self.local_ip_bytes, self.remote_ip_bytes, seg)
                return
            self._establish(now)
            st = self.state
        if not self._process_ack(seg, seq, now):
            return
        st = self.state
        if st is S.CLOSED:
            return

        # --- segment text and FIN
        data = seg.data
        fin = bool(flags & FIN)
        if seq < self.rcv_nxt:  # drop the part we already have
            if fin and seq + len(data) < self.rcv_nxt:
                fin = False  # a FIN we already consumed
            data = data[self.rcv_nxt - seq :]
            seq = self.rcv_nxt
        right = self._rcv_adv
        if seq + len(data) > right:  # beyond the window we offered: cut (and any FIN with it)
            data = data[: max(0, right - seq)]
            fin = False
        if st in _CAN_RECEIVE:
            if data:
                self._receive_data(seq, data, now)
            if fin:
                self._peer_fin_seq = seq + len(data)
            if self._peer_fin_seq is not None and self._peer_fin_seq == self.rcv_nxt and not self._fin_received:
                self._receive_fin(now)
            elif fin:
                self._ack_now = True  # out-of-order FIN: ack what we have
        elif fin or data:
            self._ack_now = True  # data/FIN after the peer's FIN: just (re-)acknowledge
            if st is S.TIME_WAIT:
                self._restart_time_wait(now)

    def _receive_data(self, seq: int, data: bytes, now: float) -> None:
        if seq == self.rcv_nxt:
            if not self.orphan:
                self._rcvbuf += data
            self.rcv_nxt += len(data)
            if self._ooo.bytes or len(self._ooo):
                filled = False
                while (more := self._ooo.pop_ready(self.rcv_nxt)) is not None:
                    if not self.orphan:
                        self._rcvbuf += more
                    self.rcv_nxt += len(more)
                    filled = True
                if filled or len(self._ooo):
                    self._ack_now = True  # RFC 5681 §4.2: ACK at once when a hole fills
            if not self._data_event_pending:
                self._data_event_pending = True
                self._stack._event(events.DataReceived(self))
            self._delack_bytes += len(data)
            if self._delack_bytes >= 2 * self.our_mss or len(data) < self.mss and self._delack_bytes >= self.mss:
                self._ack_now = True
            elif self._delack_at is None:
                self._delack_at = now + self._cfg.delayed_ack
        else:
            self._ooo.add(seq, data)
            self._ack_now = self._ack_at_once = True  # duplicate ACK carrying SACK blocks

    def _receive_fin(self, now: float) -> None:
        self._fin_received = True
        self.rcv_nxt += 1
        self._ooo.clear()
        st = self.state
        if st is S.ESTABLISHED:
            self.state = S.CLOSE_WAIT
            # As Linux (pingpong mode): the ACK of a FIN that ends an established connection
            # waits up to ``delayed_ack`` for our own FIN to carry it, since the application
            # usually closes as soon as it read the end (one packet fewer per short connection).
            if self._delack_at is None:
                self._delack_at = now + self._cfg.delayed_ack
        else:
            self._ack_now = True
            if st is S.FIN_WAIT_1:
                self.state = S.CLOSING  # our FIN is not acked yet (else we would be in FIN-WAIT-2)
            elif st is S.FIN_WAIT_2:
                self._enter_time_wait(now)
        self._stack._event(events.EndOfStream(self))
        if not self._data_event_pending:
            self._data_event_pending = True
            self._stack._event(events.DataReceived(self))

    def _enter_time_wait(self, now: float) -> None:
        self.state = S.TIME_WAIT
        # only the TIME-WAIT timer runs from now on (the stack keeps these in expiry order);
        # anything left to acknowledge goes out with this segment's output
        self._rto_at = self._probe_at = self._persist_at = self._keepalive_at = self._delack_at = None
        self._sb.clear()
        self._restart_time_wait(now)
        self._stack._event(events.Closed(self))

    def _restart_time_wait(self, now: float) -> None:
        self._close_at = now + 2 * self._cfg.msl
        self._stack._time_wait_started(self)

    def _reopened_by(self, seg: TcpSegment) -> bool:
        """In TIME-WAIT: does this SYN start a new incarnation of the 4-tuple? Yes if its sequence
        number lies beyond everything the old connection received (RFC 1122 4.2.2.13, Linux's
        rule without timestamps): no old duplicate can be taken for the new connection's data.
        A peer using RFC 6528 ISNs (clock + hash of the 4-tuple: Linux, this stack) always
        passes once the old connection sent less than the ISN clock advanced."""
        return seg.flags & (SYN | ACK | RST) == SYN and unwrap(seg.seq, self.rcv_nxt) > self.rcv_nxt

    def _next_incarnation_iss(self) -> int:
        """The lowest ISN for the next incarnation after TIME-WAIT (as Linux: a window beyond ours)."""
        return self.snd_max + 0xFFFF + 2

    # ------------------------------------------------------------------ ACK processing

    def _process_ack(self, seg: TcpSegment, seq: int, now: float) -> bool:
        """Handle SEG.ACK (RFC 9293 §3.10.7.4 fifth check). False: stop processing the segment."""
        ack = unwrap(seg.ack, self.snd_una)
        if ack > self.snd_max:
            self._ack_now = True  # acks something we never sent
            return False
        if ack < self.snd_una:
            return True  # old duplicate: ignore the ACK field, keep the data
        window = seg.window << self._snd_wscale
        window_changed = window != self.snd_wnd
        if self._snd_wl1 < seq or (self._snd_wl1 == seq and self._snd_wl2 <= ack):
            if window > self.snd_wnd and self._persist_at is not None:
                self._persist_at = None
                self._persist_backoff = 0
            self.snd_wnd = window
            self._snd_wl1, self._snd_wl2 = seq, ack
            if window > self._max_snd_wnd:
                self._max_snd_wnd = window
        sb = self._sb
        new_sack = False
        if seg.sack and self.sack_ok:
            una = self.snd_una
            for left, right in seg.sack[:MAX_SACK_BLOCKS]:
                left, right = unwrap(left, una), unwrap(right, una)
                if una < left < right <= self.snd_max:
                    new_sack |= sb.add(left, right)

        if ack > self.snd_una or new_sack:
            self._probe_count = 0
            self._probe_at = None  # re-armed after output if data is still outstanding
        if ack > self.snd_una:
            self._on_new_ack(ack, now)
        elif self.snd_max > self.snd_una and not seg.data and not seg.flags & (SYN | FIN):
            if not window_changed or new_sack:
                self._dupacks += 1
                self._on_dupack(now)
        if new_sack:
            if self._in_recovery:
                high = sb.high
                if high is not None and high > self._lost_hi:
                    self._lost_hi = high
            self._check_lost_retransmission()
        return self.state is not S.CLOSED

    def _on_new_ack(self, ack: int, now: float) -> None:
        acked = ack - self.snd_una
        old_una = self.snd_una
        self.snd_una = ack
        if self.snd_nxt < ack:
            self.snd_nxt = ack
        # data bytes leave the send buffer
        data_end = self._buf_seq + len(self._sndbuf)
        n = min(ack, data_end) - self._buf_seq
        if n > 0:
            del self._sndbuf[:n]
            self._buf_seq += n
        self._sb.advance(ack)
        if self._rtt_seq is not None and ack >= self._rtt_seq:
            self._rtt_sample(now - self._rtt_time)
            self._rtt_seq = None
        self._retries = 0
        self._backoff = 0
        self._persist_backoff = 0
        # congestion control
        if self._in_recovery:
            if ack >= self._recover:
                self._in_recovery = False
                self._rexmit_marks.clear()
                self.cc.on_recovery_exit()
                self._dupacks = 0
            else:  # partial ACK (RFC 6582 §3.2 step 3): the next hole is lost too
                if not self.sack_ok:
                    self._dupacks = 0
                    self._lost_hi = max(self._lost_hi, ack + self.mss)
                    self._rexmit_nxt = ack
                elif self._lost_hi < ack + 1:
                    self._lost_hi = ack + 1
                self._check_lost_retransmission()
        else:
            self._dupacks = 0
            if self._rexmit_marks and ack >= self._recover:
                self._rexmit_marks.clear()  # go-back-N after a timeout is complete
            elif self._rexmit_marks:
                self._check_lost_retransmission()
            if acked > 0 and old_una >= self.iss + 1 and self._cwnd_limited(self.snd_max - old_una):
                self.cc.on_ack(acked, now, self._srtt)
        # RTO restarts on new data acknowledged (RFC 6298 §5.3)
        self._rto_at = now + self._current_rto() if self.snd_max > self.snd_una else None
        # our FIN acknowledged?
        if self._fin_queued and ack == self._buf_seq + len(self._sndbuf) + 1:
            st = self.state
            if st is S.FIN_WAIT_1:
                self.state = S.FIN_WAIT_2
                if self.orphan:
                    self._close_at = now + self._cfg.fin_wait_2_timeout
            elif st is S.CLOSING:
                self._enter_time_wait(now)
            elif st is S.LAST_ACK:
                self._stack._event(events.Closed(self))
                self._terminate(None)
                return
        if self._send_blocked and self._cfg.send_buffer - len(self._sndbuf) >= self._cfg.send_buffer // 4:
            self._send_blocked = False
            self._stack._event(events.Writable(self))

    def _on_dupack(self, now: float) -> None:
        if self._in_recovery:
            return
        sb = self._sb
        sack_lost = self.sack_ok and sb.sacked_bytes > 2 * self.mss
        if sack_lost or (self._dupacks >= 3 and self.snd_una > self._recover):
            self._enter_recovery(now)

    def _enter_recovery(self, now: float) -> None:
        self.cc.on_congestion(self.snd_max - self.snd_una, now)
        self.stats["fast_recoveries"] += 1
        self._in_recovery = True
        self._recover = self.snd_max
        self._rexmit_nxt = self.snd_una
        high = self._sb.high
        self._lost_hi = max(high if high is not None else 0, self.snd_una + self.mss)
        self._rexmit_marks.clear()
        self.snd_nxt = self.snd_max
        self._rexmit_una = True  # RFC 6675 §5 (4.3): the first retransmission ignores the pipe

    def _cwnd_limited(self, flight: int) -> bool:
        """Was the congestion window what limited sending (RFC 7661; Linux tcp_is_cwnd_limited)?
        When the peer's window or the app limits us, growing cwnd would only store up a burst."""
        cwnd = self.cc.cwnd
        if cwnd < self.cc.ssthresh:
            return 2 * flight >= cwnd
        return flight + self.mss >= cwnd

    def _check_lost_retransmission(self) -> None:
        """The retransmission at snd_una is lost if data sent after it has been SACKed."""
        mark = self._rexmit_marks.get(self.snd_una)
        high = self._sb.high
        if mark is not None and high is not None and high >= mark + 2 * self.mss:
            del self._rexmit_marks[self.snd_una]
            self._rexmit_una = True

    # ------------------------------------------------------------------ RTT / RTO

    def _rtt_sample(self, r: float) -> None:
        if r < 0:
            return
        if self._srtt is None:
            self._srtt = r
            self._rttvar = r / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - r)
            self._srtt = 0.875 * self._srtt + 0.125 * r
        cfg = self._cfg
        self._rto = min(max(self._srtt + max(0.001, 4 * self._rttvar), cfg.min_rto), cfg.max_rto)

    def _pto(self) -> float:
        """Probe timeout (RFC 8985 §7.2): two RTTs, plus the peer's delayed-ACK time when a single
        segment is in flight, doubled per unanswered probe."""
        pto = max(2 * self._srtt, 0.002) if self._srtt is not None else self._rto
        if self.snd_max - self.snd_una <= self.mss:
            pto += self._cfg.delayed_ack
        return pto * (1 << self._probe_count)

    def _current_rto(self) -> float:
        return min(self._rto * (1 << self._backoff), self._cfg.max_rto)

    # ------------------------------------------------------------------ output

    def _send_segment(
        self,
        seq: int,
        flags: int,
        data: bytes | bytearray = b"",
        options: bytes = b"",
        window: int | None = None,
    ) -> None:
        if window is None:
            window = self._window_field()
        if flags & ACK:
            self._stack._emit_tcp(self, seq, self.rcv_nxt, flags, window, data, options)
            self._ack_now = False
            self._delack_at = None
            self._delack_bytes = 0
        else:
            self._stack._emit_tcp(self, seq, 0, flags, window, data, options)

    def _window_field(self) -> int:
        """The window to advertise, never moving the right edge left, avoiding silly windows."""
        free = self._rcv_cap - len(self._rcvbuf)
        if free < 0:
            free = 0
        edge = self.rcv_nxt + free
        half = self._rcv_cap // 2
        if edge - self._rcv_adv >= (half if half < self.our_mss else self.our_mss):
            adv = edge
        else:
            adv = max(self._rcv_adv, self.rcv_nxt)
        field = (adv - self.rcv_nxt) >> self._rcv_wscale
        if field > 0xFFFF:
            field = 0xFFFF
        right = self.rcv_nxt + (field << self._rcv_wscale)
        if right > self._rcv_adv:
            self._rcv_adv = right
        return field

    def _sack_option(self) -> bytes:
        if not self.sack_ok or not self._ooo._starts:
            return b""
        return tcp_options(sack=self._ooo.sack_blocks(MAX_SACK_BLOCKS))

    def _output(self, now: float) -> None:
        """Send whatever the state, windows and timers allow; always ends with pending ACKs sent."""
        st = self.state
        if st is S.ESTABLISHED or st in _CAN_SEND:
            self._send_data(now)
        if self._ack_now and st in _SYNCHRONIZED:
            # snd_max, not a rewound snd_nxt: Linux drops bare ACKs below its window
            self._send_segment(self.snd_max, ACK, options=self._sack_option())

    def _pipe(self) -> int:
        """RFC 6675 estimate of bytes in flight during recovery."""
        sb = self._sb
        una = self.snd_una
        pipe = self.snd_max - una - sb.sacked_bytes
        lo = max(self._rexmit_nxt, una)
        hi = self._lost_hi
        if hi > lo:
            pipe -= (hi - lo) - (sb.sacked_below(hi) - sb.sacked_below(lo))
        if not self.sack_ok:
            pipe -= self._dupacks * self.mss
        return pipe

    def _send_data(self, now: float) -> None:
        data_end = self._buf_seq + len(self._sndbuf)
        if self.snd_nxt == self.snd_max and not (self._in_recovery or self._rexmit_una or self._tail_probe) and self._fast:
            # the common case, nothing due for retransmission: only new data goes out, which
            # _next_segment would choose by _new_segment, in one loop; what the loop reads stays
            # the same while it runs (no ACK arrives), so it is read once
            mss = self.mss
            una = self.snd_una
            wnd_edge = una + self.snd_wnd
            # the room cwnd leaves, plus limited transmit (RFC 3042), less what is in flight
            limit = self.cc.cwnd + self._sb.sacked_bytes + una
            if self._dupacks:
                limit += min(self._dupacks, 2) * mss
            fin_queued = self._fin_queued
            window = -1
            sack = b""
            emit = self._stack._emit_tcp
            while True:
                seq = self.snd_max
                room = limit - seq
                if room <= 0:
                    break
                if seq >= data_end:
                    if not (fin_queued and seq == data_end):
                        break
                    end = seq  # a bare FIN needs no window
                    fin = True
                    payload: bytes | bytearray = b""
                    flags = ACK | FIN
                else:
                    end = seq + mss
                    if end > data_end:
                        end = data_end
                    if end > wnd_edge:
                        end = wnd_edge
                    if end > seq + room:
                        end = seq + room
                    length = end - seq
                    if length <= 0:
                        break
                    if self._window_probe:
                        self._window_probe = False
                    elif length < mss and end < data_end:
                        if end == seq + room and seq > una:
                            break  # cwnd-limited: wait for ACKs rather than send a runt
                        if end == wnd_edge and length * 2 < self._max_snd_wnd:
                            break  # sender SWS avoidance (RFC 9293 §3.8.6.2.1)
                    fin = fin_queued and end == data_end
                    off = seq - self._buf_seq
                    payload = self._sndbuf[off : off + length]  # one copy (the packet is another)
                    if fin:
                        flags = ACK | FIN
                    elif end == data_end:
                        flags = ACK | PSH
                    else:
                        flags = ACK
                if window < 0:
                    window = self._window_field()
                    if self.sack_ok and self._ooo._starts:
                        sack = self._sack_option()
                emit(self, seq, self.rcv_nxt, flags, window, payload, sack)
                self._ack_now = False
                self._delack_at = None
                self._delack_bytes = 0
                self.snd_nxt = self.snd_max = seg_end = end + fin
                if self._rtt_seq is None:
                    self._rtt_seq = seg_end
                    self._rtt_time = now
                if self._rto_at is None:
                    self._rto_at = now + min(self._rto * (1 << self._backoff), self._cfg.max_rto)  # _current_rto
        else:
            self._send_any_data(now, data_end)
        if self.snd_max > self.snd_una:
            if self._probe_at is None and self._probe_count < MAX_PROBES and self.snd_nxt == self.snd_max:
                self._probe_at = now + self._pto()
        else:
            self._probe_at = None
        # data waiting, nothing in flight, window too small: probe it (persist timer)
        fin_end = data_end + self._fin_queued
        if self.snd_max == self.snd_una and self.snd_nxt < fin_end:
            if self._persist_at is None:
                self._persist_at = now + min(self._current_rto() * (1 << self._persist_backoff), self._cfg.max_rto)
        else:
            self._persist_at = None

    def _send_any_data(self, now: float, data_end: int) -> None:
        """What ``_next_segment`` chooses, one segment after the other (retransmissions too)."""
        # nothing arrives while a burst goes out: its window and SACK blocks are the same for all
        window = sack = None
        while (nxt := self._next_segment(data_end)) is not None:
            seq, end, fin, retransmit = nxt
            payload: bytes | bytearray = b""
            if end > seq:
                off = seq - self._buf_seq
                payload = self._sndbuf[off : off + (end - seq)]  # one copy (the packet is another)
            flags = ACK
            if fin:
                flags |= FIN
            elif payload and end == data_end:
                flags |= PSH
            if window is None:
                window = self._window_field()
                sack = self._sack_option()
            self._send_segment(seq, flags, payload, sack or b"", window)
            seg_end = end + fin
            if retransmit:
                self.stats["retransmits"] += 1
                self._rtt_seq = None  # Karn: no RTT sample across retransmitted data
                if len(self._rexmit_marks) < 4096:
                    self._rexmit_marks[seq] = self.snd_max
                if self._in_recovery:
                    if seg_end > self._rexmit_nxt:
                        self._rexmit_nxt = seg_end
                elif seg_end > self.snd_nxt:
                    self.snd_nxt = seg_end
            else:
                self.snd_nxt = self.snd_max = seg_end
                if self._rtt_seq is None:
                    self._rtt_seq = seg_end
                    self._rtt_time = now
            if self._rto_at is None:
                self._rto_at = now + self._current_rto()

    def _next_segment(self, data_end: int) -> tuple[int, int, bool, bool] | None:
        """The next segment to transmit as (seq, data end, FIN?, retransmission?), or None.

        Order: a retransmission found lost again; in recovery the SACK holes then new data
        while the pipe is below cwnd; otherwise go-back-N after an RTO, then new data.
        """
        mss = self.mss
        sb = self._sb
        una = self.snd_una
        snd_max = self.snd_max
        if self._rexmit_una:
            self._rexmit_una = False
            seq, next_sacked = sb.next_unsacked(una)
            if seq < snd_max:
                return self._retransmission(seq, next_sacked, snd_max, data_end)
        if self._tail_probe:
            self._tail_probe = False
            new = self._new_segment(data_end, mss)
            if new is not None:
                return new
            seq, next_sacked = sb.next_unsacked(max(una, snd_max - mss))
            if seq < snd_max:
                return self._retransmission(seq, next_sacked, snd_max, data_end)
        if self._in_recovery:
            if self.cc.cwnd - self._pipe() < mss:
                return None
            seq, next_sacked = sb.next_unsacked(max(self._rexmit_nxt, una))
            limit = min(self._lost_hi, snd_max)
            if seq < limit:
                return self._retransmission(seq, next_sacked, limit, data_end)
            return self._new_segment(data_end, mss)
        seq = self.snd_nxt
        if seq < snd_max:  # go-back-N after a timeout, skipping what the peer holds
            seq, next_sacked = sb.next_unsacked(seq)
            self.snd_nxt = seq
            if seq < snd_max:
                flight = seq - una - sb.sacked_below(seq)
                if flight > 0 and self.cc.cwnd - flight < mss:
                    return None
                return self._retransmission(seq, next_sacked, snd_max, data_end)
        flight = snd_max - una - sb.sacked_bytes
        room = self.cc.cwnd - flight
        if self._dupacks:
            room += min(self._dupacks, 2) * mss  # limited transmit (RFC 3042)
        if room <= 0:
            return None
        return self._new_segment(data_end, room)

    def _retransmission(self, seq: int, next_sacked: int | None, limit: int, data_end: int) -> tuple[int, int, bool, bool]:
        if next_sacked is not None and next_sacked < limit:
            limit = next_sacked
        end = min(seq + self.mss, limit, data_end)
        fin = self._fin_queued and end == data_end and limit > data_end
        return seq, end, fin, True

    def _new_segment(self, data_end: int, room: int) -> tuple[int, int, bool, bool] | None:
        seq = self.snd_max
        mss = self.mss
        if seq >= data_end:
            if self._fin_queued and seq == data_end:
                return seq, seq, True, False  # a bare FIN needs no window
            return None
        wnd_edge = self.snd_una + self.snd_wnd
        end = min(seq + mss, data_end, wnd_edge, seq + room)
        length = end - seq
        if length <= 0:
            return None
        if self._window_probe:
            self._window_probe = False
        elif length < mss and end < data_end:
            in_flight = self.snd_max > self.snd_una
            if end == seq + room and in_flight:
                return None  # cwnd-limited: wait for ACKs rather than send a runt
            if end == wnd_edge and length * 2 < self._max_snd_wnd:
                return None  # sender SWS avoidance (RFC 9293 §3.8.6.2.1)
        fin = self._fin_queued and end == data_end
        return seq, end, fin, False

    # ------------------------------------------------------------------ timers

    def _keepalive_reset(self, now: float) -> None:
        idle = self._cfg.keepalive_idle
        if idle is not None:
            self._keepalive_at = now + idle
            self._keepalive_probes = 0

    def _update_deadline(self) -> None:
        d = self._rto_at
        t = self._probe_at
        if t is not None and (d is None or t < d):
            d = t
        t = self._delack_at
        if t is not None and (d is None or t < d):
            d = t
        t = self._persist_at
        if t is not None and (d is None or t < d):
            d = t
        t = self._keepalive_at
        if t is not None and (d is None or t < d):
            d = t
        t = self._close_at
        if t is not None and (d is None or t < d):
            d = t
        self.deadline = d

    def _on_timer(self, now: float) -> None:
        if self._close_at is not None and now >= self._close_at:
            self._close_at = None
            if self.state is S.TIME_WAIT:
                self._terminate(None)
                return
            if self.state is S.FIN_WAIT_2:  # an orphan whose peer never closed: tell the glue it is gone
                self._terminate("the peer never closed its side (FIN-WAIT-2 timeout)", events.TimedOut(self))
                return
        if self._rto_at is not None and now >= self._rto_at:
            self._rto_at = None
            self._on_rto(now)
            if self.state is S.CLOSED:
                return
        if self._probe_at is not None and now >= self._probe_at:
            self._probe_at = None
            self._on_probe(now)
        if self._persist_at is not None and now >= self._persist_at:
            self._persist_at = None
            self._on_persist(now)
            if self.state is S.CLOSED:
                return
        if self._keepalive_at is not None and now >= self._keepalive_at:
            self._on_keepalive(now)
            if self.state is S.CLOSED:
                return
        if self._delack_at is not None and now >= self._delack_at:
            self._delack_at = None
            self._ack_now = True
        self._output(now)
        self._update_deadline()

    def _on_rto(self, now: float) -> None:
        st = self.state
        self._retries += 1
        self._backoff += 1
        self.stats["timeouts"] += 1
        self._rtt_seq = None
        if st in (S.SYN_SENT, S.SYN_RECEIVED):
            if self._retries > self._cfg.syn_retries:
                if self.passive and st is S.SYN_RECEIVED:
                    self._terminate("handshake timed out")
                else:
                    self.error = f"connecting to {self.remote_ip}:{self.remote_port} timed out"
                    self._terminate(self.error, events.TimedOut(self))
                return
            self._send_syn()
            self._rto_at = now + self._current_rto()
            return
        if self.snd_max <= self.snd_una:
            return
        if self._retries > self._cfg.max_retries:
            self.error = "connection timed out (retransmissions unanswered)"
            self._send_segment(self.snd_max, RST | ACK)
            self._terminate(self.error, events.TimedOut(self))
            return
        flight = self.snd_max - self.snd_una
        self.cc.on_timeout(flight, now)
        self._in_recovery = False
        self._rexmit_marks.clear()
        self._rexmit_una = self._tail_probe = False
        self._probe_at = None
        self._dupacks = 0
        self._recover = self.snd_max
        self.snd_nxt = self.snd_una  # go back N, skipping what the peer SACKed
        if self._backoff >= 2:
            self._sb.clear()  # the peer may have reneged on its SACKs
        self._rto_at = now + self._current_rto()

    def _on_probe(self, now: float) -> None:
        """Nothing heard for a probe timeout while data is outstanding: a segment or its ACK was
        lost. If the peer SACKed data above snd_una, the hole is lost (what RACK concludes after
        its reordering window): start recovery. In recovery, resend the first hole, whose
        retransmission was probably lost. Otherwise send a tail loss probe (new data, else the
        last segment) to draw an ACK that shows what is missing."""
        if self.snd_max <= self.snd_una or self.state not in _CAN_SEND:
            return
        self.stats["probes"] += 1
        self._probe_count += 1
        if self._in_recovery:
            self._rexmit_una = True
        elif self.sack_ok and self._sb.sacked_bytes and self.snd_una > self._recover:
            self._enter_recovery(now)
        else:
            self._tail_probe = True

    def _on_persist(self, now: float) -> None:
        self._persist_backoff += 1
        if self._persist_backoff > self._cfg.max_retries:
            self.error = "connection timed out (zero window never reopened)"
            self._send_segment(self.snd_max, RST | ACK)
            self._terminate(self.error, events.TimedOut(self))
            return
        if self.snd_wnd > 0:
            self._window_probe = True  # a small window: send what fits despite SWS avoidance
            self._output(now)
        else:
            # an ACK with an already acknowledged sequence number makes the peer answer with its window
            self._send_segment(self.snd_una - 1, ACK)
        if self.snd_max == self.snd_una:  # nothing in flight for the RTO to watch: keep probing
            self._persist_at = now + min(self._current_rto() * (1 << self._persist_backoff), self._cfg.max_rto)

    def _on_keepalive(self, now: float) -> None:
        cfg = self._cfg
        if self.state not in (S.ESTABLISHED, S.CLOSE_WAIT) or cfg.keepalive_idle is None:
            self._keepalive_at = None
            return
        if self._keepalive_probes >= cfg.keepalive_count:
            self.error = "connection timed out (keepalive unanswered)"
            self._send_segment(self.snd_max, RST | ACK)
            self._terminate(self.error, events.TimedOut(self))
            return
        self._keepalive_probes += 1
        self._send_segment(self.snd_una - 1, ACK)
        self._keepalive_at = now + cfg.keepalive_interval

    # ------------------------------------------------------------------ teardown

    def _terminate(self, error: str | None, event: object | None = None) -> None:
        """Move to CLOSED, drop buffers and leave the stack's table; optionally queue ``event``."""
        if error is not None and self.error is None:
            self.error = error
        self.state = S.CLOSED
        self._sndbuf = bytearray()
        self._ooo.clear()
        self._sb.clear()
        self._rto_at = self._probe_at = self._delack_at = self._persist_at = self._keepalive_at = self._close_at = None
        self.deadline = None
        if error is not None and event is not None:
            self._rcvbuf = bytearray()
        if event is not None:
            self._stack._event(event)
        self._stack._remove(self)
