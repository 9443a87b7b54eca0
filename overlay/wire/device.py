"""The WireGuard device: peers, index table, handshakes, transport and timers, sans-I/O.

Feed it datagrams (``receive``) and inner packets (``send``) with the current time; drain
``datagrams_to_send()`` and ``next_event()`` after each call; call ``handle_timer(now)`` when
``get_timer()`` comes due. It never reads a clock or touches a socket, so tests drive hours of
protocol time deterministically. The state machine follows wireguard-go (device/timers.go,
send.go, receive.go) so a stock WireGuard peer sees exactly the behaviour it expects.
"""

from __future__ import annotations

import random
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import cast

from overlay import crypto
from overlay.wire.cookie import CookieChecker
from overlay.wire.events import EndpointChanged, Event, HandshakeCompleted, PacketReceived, PeerUnreachable
from overlay.wire.constants import (
    HANDSHAKE_INITIATION_RATE,
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    ZERO_KEY_MATERIAL_AFTER,
)
from overlay.wire.handshake import (
    Handshake,
    HandshakeError,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    derive_transport_keys,
    next_timestamp,
)
from overlay.wire.keypair import Keypair
from overlay.wire.messages import (
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    MSG_TRANSPORT_PLAIN,
    TRANSPORT_HEADER,
    TRANSPORT_HEADER_SIZE,
    TRANSPORT_MIN_SIZE,
    MAX_DATAGRAM_SIZE,
    MalformedMessage,
    message_type,
    parse_cookie_reply,
    parse_initiation,
    parse_response,
)
from overlay.wire.peer import Peer
from overlay.wire.ratelimit import RateLimiter

UNDER_LOAD_AFTER_TIME = 1.0
UNDER_LOAD_HANDSHAKES_PER_SECOND = 256
"""Above this rate of handshake messages we demand cookies (mac2) for UNDER_LOAD_AFTER_TIME.

wireguard-go uses its handshake queue depth instead; a rate is the sans-I/O equivalent. A
handshake message costs ~0.2 ms of Curve25519 and hashing here (benchmarks/bench_wire.py), so
this bounds unauthenticated handshake work to about 5% of one core.
"""

HANDSHAKE_SOURCE_RATE = 40.0
HANDSHAKE_SOURCE_BURST = 40.0
"""Under load, handshake messages one source IP may make us look at (cookie replies included).

Checked before mac1 with a dictionary lookup: one flooding host costs a counter per datagram,
never a MAC, a cookie reply or a DH. A real peer sends a handshake every few seconds at most.
"""
HANDSHAKE_WORK_PER_SECOND = 4096
"""Under load, handshake messages looked at per second from all sources together (mac1, cookie
replies, DH for the ones with mac2): a flood from many addresses takes a bounded share of the
loop (~4096 x 25 us, 10 % of a core); the rest is dropped before any cryptography."""

MAX_PENDING_EVENTS = 4096
MAX_PACKET_SIZE = MAX_DATAGRAM_SIZE - TRANSPORT_MIN_SIZE - 15
"""Largest inner packet: the encrypted, padded datagram must still fit in UDP."""

_PAD = tuple(bytes(n) for n in range(16))
_IP_LENGTH = struct.Struct(">H")
_new_tuple = tuple.__new__
"""Builds a NamedTuple event without its Python-level ``__new__`` (hot path only)."""
_SENDER = struct.Struct("<I")
_nonce_of = crypto.nonce_of
_TagError = crypto.TagError

STAT_NAMES = (
    "rx_datagrams", "malformed", "unknown_index", "expired_key", "auth_failed", "replayed", "plain_refused",
    "bad_mac1", "cookie_sent", "cookie_received", "cookie_invalid", "handshake_invalid",
    "handshake_replay", "handshake_flood", "handshake_rate_limited", "handshake_source_limited",
    "handshake_shed", "initiations_rx",
    "initiations_tx", "responses_rx", "responses_tx", "handshakes_completed", "keepalives_rx",
    "keepalives_tx", "packets_rx", "packets_tx", "bad_inner_packet", "staged_dropped",
    "events_dropped", "no_endpoint", "peers_unreachable",
)
"""Keys of ``Device.stats``: every datagram dropped is counted under one of them."""


class Device:
    """One WireGuard identity and its peers. Not thread-safe: drive it from one event loop."""

    def __init__(
        self,
        private_key: bytes,
        *,
        mtu: int = 1420,
        wallclock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ):
        """``wallclock`` gives Unix time for TAI64N initiation timestamps; ``rng`` only jitters timers.

        ``mtu`` caps WireGuard's padding of inner packets (it never pads past the inner MTU).
        """
        self.private_key = bytes(private_key)
        self.public_key = crypto.public_key(self.private_key)
        self.mtu = mtu
        self.force_under_load = False
        """Demand cookies (mac2) from every handshake, as if flooded; for tests and operators."""
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self._wallclock = wallclock
        self._rng = rng or random.Random()
        self._checker = CookieChecker(self.public_key)
        self._limiter = RateLimiter()
        self._source_budget = RateLimiter(HANDSHAKE_SOURCE_RATE, HANDSHAKE_SOURCE_BURST)
        self._peers: dict[bytes, Peer] = {}
        self._index: dict[int, Peer | Keypair] = {}
        self._out: list[tuple[bytes, Hashable]] = []
        self._events: deque[Event] = deque()
        self._load_window_start = float("-inf")
        self._load_count = 0
        self._under_load_until = float("-inf")
        # ``get_timer``'s answer, kept while only data traffic ran (see there)
        self._timer_bound: float | None = None
        self._timer_valid = False

    # ------------------------------------------------------------------ configuration

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        endpoint: Hashable | None = None,
        persistent_keepalive: float | None = None,
    ) -> Peer:
        public_key = bytes(public_key)
        if len(public_key) != 32 or (preshared_key is not None and len(preshared_key) != 32):
            raise ValueError("keys are 32 bytes")
        if public_key == self.public_key:
            raise ValueError("a device cannot be its own peer")
        if public_key in self._peers:
            raise ValueError("peer already added")
        try:
            peer = Peer(self.private_key, public_key, bytes(preshared_key or bytes(32)), endpoint, persistent_keepalive)
        except crypto.DecryptError:
            raise ValueError("invalid (low-order) peer public key") from None
        self._peers[public_key] = peer
        self._timer_valid = False
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self._peers.pop(public_key)
        self._forget_keys(peer)
        self._timer_valid = False

    def set_endpoint(self, public_key: bytes, addr: Hashable) -> None:
        """Move a peer to another path (the NAT-traversal layer found a better one)."""
        self._peers[public_key].endpoint = addr

    def set_plaintext(self, public_key: bytes, plaintext: bool) -> None:
        """Send this peer's payloads authenticated but unencrypted (MSG_TRANSPORT_PLAIN), and accept
        such messages from it; off (the default): standard WireGuard both ways, and plain messages
        from it are dropped. Only for overlay peers that agreed (every network shared unencrypted)."""
        self._peers[public_key].plaintext = plaintext

    def initiate_handshake(self, public_key: bytes, now: float) -> None:
        """Start a handshake now (rate-limited to one per REKEY_TIMEOUT, as every initiation)."""
        self._timer_valid = False
        self._send_initiation(self._peers[public_key], now, retry=False)

    def peer_stats(self, public_key: bytes) -> dict:
        peer = self._peers[public_key]
        return {
            "endpoint": peer.endpoint,
            "last_handshake": peer.last_handshake,
            "rx_bytes": peer.rx_bytes,
            "tx_bytes": peer.tx_bytes,
            "rx_packets": peer.rx_packets,
            "tx_packets": peer.tx_packets,
            "handshake_attempts": peer.handshake_attempts,
            "has_session": peer.keypairs.current is not None,
            "staged": len(peer.staged),
        }

    # ------------------------------------------------------------------ sans-I/O surface

    def datagrams_to_send(self) -> list[tuple[bytes, Hashable]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The earliest peer deadline, or earlier (may already be past: call ``handle_timer`` at once).

        Exact after any call but data traffic. Data sent and received only move the peer's
        deadlines, so the answer is kept across them (no pass over every peer after each packet):
        a deadline they set earlier lowers it; one they clear or postpone (a keepalive made
        unnecessary by an answer) leaves it early, and ``handle_timer`` then finds nothing due and
        makes the next answer exact. Never later than a deadline, so no timer is missed.
        """
        if self._timer_valid:
            return self._timer_bound
        best = None
        for peer in self._peers.values():
            t = peer.next_deadline()
            if t is not None and (best is None or t < best):
                best = t
        self._timer_bound = best
        self._timer_valid = True
        return best

    def handle_timer(self, now: float) -> None:
        self._timer_valid = False
        for peer in list(self._peers.values()):
            if peer.retransmit_at is not None and now >= peer.retransmit_at:
                peer.retransmit_at = None
                self._expired_retransmit_handshake(peer, now)
            if peer.send_keepalive_at is not None and now >= peer.send_keepalive_at:
                peer.send_keepalive_at = None
                self._send_keepalive(peer, now)
                if peer.need_another_keepalive:
                    peer.need_another_keepalive = False
                    peer.send_keepalive_at = now + KEEPALIVE_TIMEOUT
            if peer.new_handshake_at is not None and now >= peer.new_handshake_at:
                # We sent data and heard nothing back for 15 s: the session may be dead.
                peer.new_handshake_at = None
                self._send_initiation(peer, now, retry=False)
            if peer.zero_keys_at is not None and now >= peer.zero_keys_at:
                peer.zero_keys_at = None
                self._forget_keys(peer)
            if peer.persistent_keepalive_at is not None and now >= peer.persistent_keepalive_at:
                peer.persistent_keepalive_at = None
                if peer.persistent_keepalive:
                    self._send_keepalive(peer, now)

    def send(self, public_key: bytes, packet: bytes, now: float) -> None:
        """Encrypt ``packet`` for a peer now, or stage it and start a handshake.

        An empty packet is a keepalive. IPv4/IPv6 packets are zero-padded to a multiple of 16
        (capped at the MTU) as WireGuard does; other inner types go unpadded.
        """
        peer = self._peers[public_key]
        n = len(packet)
        if n > MAX_PACKET_SIZE:
            raise ValueError(f"packet of {n} bytes exceeds {MAX_PACKET_SIZE}")
        kp = peer.keypairs.current
        if (
            not peer.staged and kp is not None
            and kp.send_counter < REJECT_AFTER_MESSAGES and now - kp.created < REJECT_AFTER_TIME
        ):
            self._encrypt(peer, kp, packet)
            if not n or peer.persistent_keepalive or kp.needs_rekey(now):
                self._timer_valid = False
                self._after_send(peer, kp, bool(n), now)
            else:  # the common case of _after_send, inline
                peer.send_keepalive_at = None
                if peer.new_handshake_at is None:
                    t = peer.new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
                    if (bound := self._timer_bound) is None or t < bound:
                        self._timer_bound = t
            return
        self._timer_valid = False
        if len(peer.staged) == peer.staged.maxlen:
            self.stats["staged_dropped"] += 1
        peer.staged.append(packet)
        self._send_staged(peer, now)

    def receive(self, datagram: bytes | memoryview, addr: Hashable, now: float) -> None:
        """Handle one datagram from the socket; bad ones are counted in ``stats`` and dropped.

        ``datagram`` may be a view into the socket's receive buffer: nothing keeps a reference.
        """
        self.stats["rx_datagrams"] += 1
        n = len(datagram)
        if TRANSPORT_MIN_SIZE <= n <= MAX_DATAGRAM_SIZE:
            # The type and reserved bytes read as one little-endian word: 4 means transport.
            kind, receiver, counter = TRANSPORT_HEADER.unpack_from(datagram)
            if kind == MSG_TRANSPORT:
                self._receive_transport(datagram, receiver, counter, addr, now)
                return
            if kind == MSG_TRANSPORT_PLAIN:
                self._receive_transport(datagram, receiver, counter, addr, now, plain=True)
                return
        self._timer_valid = False
        t = message_type(datagram)
        try:
            if t == MSG_INITIATION:
                self._receive_initiation(datagram, addr, now)
            elif t == MSG_RESPONSE:
                self._receive_response(datagram, addr, now)
            elif t == MSG_COOKIE_REPLY:
                self._receive_cookie_reply(datagram, now)
            else:
                self.stats["malformed"] += 1
        except HandshakeError:
            self.stats["handshake_invalid"] += 1
        except MalformedMessage:
            self.stats["malformed"] += 1

    # ------------------------------------------------------------------ transport

    def _encrypt(self, peer: Peer, kp: Keypair, packet: bytes) -> None:
        n = len(packet)
        if n:
            if packet[0] >> 4 in (4, 6):
                pad = -n & 15
                if n + pad > self.mtu:
                    pad = max(0, self.mtu - n)
                if pad:
                    packet = packet + _PAD[pad]
            self.stats["packets_tx"] += 1
        else:
            self.stats["keepalives_tx"] += 1
        counter = kp.send_counter
        kp.send_counter = counter + 1
        if peer.plaintext:
            datagram = TRANSPORT_HEADER.pack(MSG_TRANSPORT_PLAIN, kp.remote_index, counter) + kp.send.seal_plain(
                counter, packet)
        else:
            datagram = TRANSPORT_HEADER.pack(MSG_TRANSPORT, kp.remote_index, counter) + kp.seal(_nonce_of(counter), packet, None)
        peer.tx_bytes += len(datagram)
        peer.tx_packets += 1
        self._emit(peer, datagram)

    def _after_send(self, peer: Peer, kp: Keypair, data: bool, now: float) -> None:
        """Timer bookkeeping after transport packets went out (wireguard-go's send path)."""
        if peer.persistent_keepalive:
            peer.persistent_keepalive_at = now + peer.persistent_keepalive
        peer.send_keepalive_at = None
        if data and peer.new_handshake_at is None:
            peer.new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
        if kp.needs_rekey(now):
            self._send_initiation(peer, now, retry=False)

    def _send_staged(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            return
        kp = peer.keypairs.current
        if kp is None or not kp.can_send(now):
            self._send_initiation(peer, now, retry=False)
            return
        data = False
        staged = peer.staged
        while staged:
            packet = staged.popleft()
            data = data or bool(packet)
            self._encrypt(peer, kp, packet)
        self._after_send(peer, kp, data, now)

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    def _receive_transport(
        self, datagram: bytes | memoryview, receiver: int, counter: int, addr: Hashable, now: float,
        plain: bool = False,
    ) -> None:
        # The per-packet path: kept flat, with timer bookkeeping as plain attribute writes.
        kp = self._index.get(receiver)
        if type(kp) is not Keypair:
            self.stats["unknown_index"] += 1
            return
        if now - kp.created >= REJECT_AFTER_TIME:
            self.stats["expired_key"] += 1
            return
        if plain:
            if not kp.peer.plaintext:
                self.stats["plain_refused"] += 1   # encryption is on for this peer: never downgrade
                return
            try:
                packet = kp.receive.open_plain(counter, memoryview(datagram)[TRANSPORT_HEADER_SIZE:])
            except crypto.DecryptError:
                self.stats["auth_failed"] += 1
                return
        else:
            try:
                packet = kp.open(_nonce_of(counter), memoryview(datagram)[TRANSPORT_HEADER_SIZE:], None)
            except _TagError:
                self.stats["auth_failed"] += 1
                return
        if not kp.replay.check_and_update(counter, REJECT_AFTER_MESSAGES):
            self.stats["replayed"] += 1
            return
        peer = kp.peer
        if addr != peer.endpoint:
            self._roam(peer, addr)
        keypairs = peer.keypairs
        if keypairs.next is kp:
            self._timer_valid = False
            for dropped in keypairs.confirm():
                self._index.pop(dropped.local_index, None)
            self._handshake_complete(peer, now)
            self._send_staged(peer, now)
        cur = keypairs.current
        if cur is not None and now > cur.last_minute_at and not peer.sent_last_minute_handshake:
            # Our sending key expires soon and the peer (responder) will not rekey by time.
            peer.sent_last_minute_handshake = True
            self._timer_valid = False
            self._send_initiation(peer, now, retry=False)
        if peer.persistent_keepalive:
            self._timer_valid = False
            peer.persistent_keepalive_at = now + peer.persistent_keepalive
        peer.new_handshake_at = None
        peer.rx_bytes += len(datagram)
        peer.rx_packets += 1
        n = len(packet)
        if not n:
            self.stats["keepalives_rx"] += 1
            return
        if peer.send_keepalive_at is None:
            t = peer.send_keepalive_at = now + KEEPALIVE_TIMEOUT
            if (bound := self._timer_bound) is None or t < bound:
                self._timer_bound = t     # (``get_timer``)
        else:
            peer.need_another_keepalive = True
        version = packet[0] >> 4
        if version == 4 or version == 6:
            # Strip WireGuard's zero padding using the IP header's own length.
            if version == 4:
                length = _IP_LENGTH.unpack_from(packet, 2)[0] if n >= 20 else 0
                if length < 20:
                    length = n + 1
            else:
                length = 40 + _IP_LENGTH.unpack_from(packet, 4)[0] if n >= 40 else n + 1
            if length > n:
                self.stats["bad_inner_packet"] += 1
                return
            if length != n:
                packet = packet[:length]
        self.stats["packets_rx"] += 1
        if len(self._events) < MAX_PENDING_EVENTS:
            self._events.append(_new_tuple(PacketReceived, (peer.public_key, packet)))
        else:
            self.stats["events_dropped"] += 1

    # ------------------------------------------------------------------ handshakes

    def _send_initiation(self, peer: Peer, now: float, retry: bool) -> None:
        if not retry:
            peer.handshake_attempts = 0
        hs = peer.handshake
        if now < hs.initiation_allowed_at:
            return
        hs.initiation_allowed_at = now + REKEY_TIMEOUT
        self._unindex_handshake(hs)
        index = self._new_index(peer)
        hs.last_sent_timestamp = next_timestamp(self._wallclock(), hs.last_sent_timestamp)
        msg = create_initiation(hs, self.public_key, index, hs.last_sent_timestamp)
        peer.cookies.add_macs(msg, now)
        if peer.persistent_keepalive:
            peer.persistent_keepalive_at = now + peer.persistent_keepalive
        peer.send_keepalive_at = None
        self.stats["initiations_tx"] += 1
        self._emit(peer, bytes(msg))
        # Same float sum as initiation_allowed_at, so the retry is never rate-limited away.
        peer.retransmit_at = hs.initiation_allowed_at + self._jitter()

    def _expired_retransmit_handshake(self, peer: Peer, now: float) -> None:
        if peer.handshake_attempts > MAX_TIMER_HANDSHAKES:
            peer.send_keepalive_at = None
            peer.staged.clear()
            if peer.zero_keys_at is None:
                peer.zero_keys_at = now + ZERO_KEY_MATERIAL_AFTER
            self.stats["peers_unreachable"] += 1
            self._push_event(PeerUnreachable(peer.public_key))
        else:
            peer.handshake_attempts += 1
            self._send_initiation(peer, now, retry=True)

    def _admit_handshake(self, datagram: bytes | memoryview, addr: Hashable, now: float) -> bool:
        """mac1 always; under load first a per-source budget and a global ceiling (no crypto),
        then mac2 (else a cookie reply) and a per-IP rate of DH work: WireGuard's design."""
        if now - self._load_window_start >= 1.0:
            self._load_window_start, self._load_count = now, 0
        self._load_count += 1
        if self._load_count > UNDER_LOAD_HANDSHAKES_PER_SECOND:
            self._under_load_until = now + UNDER_LOAD_AFTER_TIME
        under_load = self.force_under_load or now < self._under_load_until
        if under_load:
            if not self._source_budget.allow(addr, now):
                self.stats["handshake_source_limited"] += 1
                return False
            if self._load_count > HANDSHAKE_WORK_PER_SECOND:
                self.stats["handshake_shed"] += 1
                return False
        if not self._checker.check_mac1(datagram):
            self.stats["bad_mac1"] += 1
            return False
        if under_load:
            if not self._checker.check_mac2(datagram, addr, now):
                sender = _SENDER.unpack_from(datagram, 4)[0]
                self._out.append((self._checker.create_reply(datagram, sender, addr, now), addr))
                self.stats["cookie_sent"] += 1
                return False
            if not self._limiter.allow(addr, now):
                self.stats["handshake_rate_limited"] += 1
                return False
        return True

    def _receive_initiation(self, datagram: bytes | memoryview, addr: Hashable, now: float) -> None:
        if not self._admit_handshake(datagram, addr, now):
            return
        msg = parse_initiation(datagram)
        consumed = consume_initiation(self.private_key, self.public_key, msg, self._find_handshake)
        hs = consumed.handshake
        if consumed.timestamp <= hs.last_timestamp:
            self.stats["handshake_replay"] += 1
            return
        if now - hs.last_initiation_consumed <= HANDSHAKE_INITIATION_RATE:
            self.stats["handshake_flood"] += 1
            return
        consumed.commit(now)
        self.stats["initiations_rx"] += 1
        peer = self._peers[hs.remote_static]
        if addr != peer.endpoint:
            self._roam(peer, addr)
        peer.new_handshake_at = None
        self._unindex_handshake(hs)
        response = create_response(hs, self._new_index(peer))
        peer.cookies.add_macs(response, now)
        self._derive_keypair(peer, now)
        if peer.persistent_keepalive:
            peer.persistent_keepalive_at = now + peer.persistent_keepalive
        peer.send_keepalive_at = None
        self.stats["responses_tx"] += 1
        self._emit(peer, bytes(response))

    def _receive_response(self, datagram: bytes | memoryview, addr: Hashable, now: float) -> None:
        if not self._admit_handshake(datagram, addr, now):
            return
        msg = parse_response(datagram)
        peer = self._index.get(msg.receiver)
        if type(peer) is not Peer:
            self.stats["unknown_index"] += 1
            return
        consume_response(peer.handshake, self.private_key, msg)
        self.stats["responses_rx"] += 1
        if addr != peer.endpoint:
            self._roam(peer, addr)
        if peer.persistent_keepalive:
            peer.persistent_keepalive_at = now + peer.persistent_keepalive
        peer.new_handshake_at = None
        self._derive_keypair(peer, now)
        self._handshake_complete(peer, now)
        # Confirms the new keys to the responder (or carries the staged packets that do).
        self._send_keepalive(peer, now)

    def _receive_cookie_reply(self, datagram: bytes | memoryview, now: float) -> None:
        reply = parse_cookie_reply(datagram)
        entry = self._index.get(reply.receiver)
        if entry is None:
            self.stats["unknown_index"] += 1
            return
        peer = entry if type(entry) is Peer else cast(Keypair, entry).peer
        if peer.cookies.consume_reply(reply, now):
            self.stats["cookie_received"] += 1
        else:
            self.stats["cookie_invalid"] += 1

    def _derive_keypair(self, peer: Peer, now: float) -> None:
        hs = peer.handshake
        send_key, receive_key, initiator = derive_transport_keys(hs)
        kp = Keypair(send_key, receive_key, initiator, hs.local_index, hs.remote_index, peer, now)
        self._index[hs.local_index] = kp
        hs.local_index = 0
        hs.clear()
        for dropped in peer.keypairs.install(kp):
            self._index.pop(dropped.local_index, None)
        peer.zero_keys_at = now + ZERO_KEY_MATERIAL_AFTER

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        peer.retransmit_at = None
        peer.handshake_attempts = 0
        peer.sent_last_minute_handshake = False
        peer.last_handshake = now
        self.stats["handshakes_completed"] += 1
        self._push_event(HandshakeCompleted(peer.public_key))

    def _find_handshake(self, public_key: bytes) -> Handshake | None:
        peer = self._peers.get(public_key)
        return peer.handshake if peer is not None else None

    # ------------------------------------------------------------------ helpers

    def _roam(self, peer: Peer, addr: Hashable) -> None:
        peer.endpoint = addr
        self._push_event(EndpointChanged(peer.public_key, addr))

    def _forget_keys(self, peer: Peer) -> None:
        for kp in peer.keypairs.clear():
            self._index.pop(kp.local_index, None)
        self._unindex_handshake(peer.handshake)
        peer.handshake.clear()
        peer.staged.clear()

    def _unindex_handshake(self, hs: Handshake) -> None:
        if hs.local_index:
            self._index.pop(hs.local_index, None)
            hs.local_index = 0

    def _new_index(self, owner: Peer) -> int:
        while True:
            index = secrets.randbits(32)
            if index and index not in self._index:
                self._index[index] = owner
                return index

    def _emit(self, peer: Peer, datagram: bytes) -> None:
        if peer.endpoint is None:
            self.stats["no_endpoint"] += 1
        else:
            self._out.append((datagram, peer.endpoint))

    def _push_event(self, event: Event) -> None:
        if len(self._events) >= MAX_PENDING_EVENTS:
            self.stats["events_dropped"] += 1
        else:
            self._events.append(event)

    def _jitter(self) -> float:
        return self._rng.uniform(0.0, REKEY_TIMEOUT_JITTER_MAX)
