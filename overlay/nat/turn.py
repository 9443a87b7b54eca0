"""TURN client (RFC 8656) over UDP, sans-I/O: one allocation, permissions and channels to peers.

What a node needs to relay WireGuard datagrams through a TURN server such as coturn:

- **Allocate** with long-term credentials (RFC 8489 §9.2): the first request goes without them;
  the server's 401 names the REALM and a NONCE; the request is sent again with USERNAME, REALM,
  NONCE and MESSAGE-INTEGRITY (HMAC-SHA1 keyed with MD5(username:realm:password)). A 438 (stale
  nonce) on any request brings a new nonce: the request is sent again with it, at most
  ``max_stale`` times per request. Every later request carries the credentials; every success
  response to them must carry a valid MESSAGE-INTEGRITY, else it is ignored (and counted).
- **Refresh** of the allocation before it expires (at 80 % of the granted lifetime, at least
  60 s before its end); ``close`` sends a Refresh with LIFETIME 0 (Deallocate), once, unanswered.
- **CreatePermission** and **ChannelBind** for each peer address given to ``permit``: data for a
  peer goes as ChannelData (4-byte header) once its channel is bound, as a Send indication while
  only its permission is installed, and not at all before (the caller uses another path then).
  Both are refreshed before they lapse (permissions live 300 s, channels 600 s): every
  ``refresh_interval`` (240 s).
- **Data** arrives as ChannelData on a bound channel or as a Data indication from a permitted
  peer; anything else from the server is counted and dropped.

Requests are retransmitted as RFC 8489 §6.2.1 says (RTO doubling), but with shorter defaults than
the RFC's 39.5 s: a node waiting that long for its relay learns nothing useful. Bounds: at most
``max_pending`` requests in flight, ``max_peers`` peers (channel numbers 0x4000-0x4FFF), REALM and
NONCE at most 763 bytes; malformed, unexpected and unauthenticated responses are counted in
``stats``, never raised.

Demultiplexing: the caller hands this client every datagram that comes from the TURN server's
address (ChannelData's first byte 0x40-0x4F collides with other protocols' magic bytes, so the
source address decides, not the content).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from overlay.hostport import parse_hostport

from . import stun
from .candidate import Addr, normalize

# methods (RFC 8656 §17)
ALLOCATE, REFRESH, SEND, DATA, CREATE_PERMISSION, CHANNEL_BIND = 0x003, 0x004, 0x006, 0x007, 0x008, 0x009
METHOD_NAMES = {ALLOCATE: "Allocate", REFRESH: "Refresh", CREATE_PERMISSION: "CreatePermission",
                CHANNEL_BIND: "ChannelBind"}

# attributes (RFC 8656 §18)
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA_ATTR = 0x0013
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_ADDRESS_FAMILY = 0x0017
EVEN_PORT = 0x0018
REQUESTED_TRANSPORT = 0x0019
DONT_FRAGMENT = 0x001A
RESERVATION_TOKEN = 0x0022
TURN_KNOWN = frozenset({CHANNEL_NUMBER, LIFETIME, XOR_PEER_ADDRESS, DATA_ATTR, XOR_RELAYED_ADDRESS,
                        REQUESTED_ADDRESS_FAMILY, EVEN_PORT, REQUESTED_TRANSPORT, DONT_FRAGMENT,
                        RESERVATION_TOKEN})
UDP_TRANSPORT = bytes([17, 0, 0, 0])

CHANNEL_MIN, CHANNEL_MAX = 0x4000, 0x4FFF
MAX_TEXT = 763          # REALM, NONCE (RFC 8489 §14.8-9: fewer than 128 characters, 763 bytes)

# client states
NEW, ALLOCATING, ALLOCATED, FAILED, CLOSED = "new", "allocating", "allocated", "failed", "closed"


def stun_type(method: int, cls: int) -> int:
    """The 14-bit message type of ``method`` in class ``cls`` (RFC 8489 §5)."""
    return ((method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2)
            | ((cls & 1) << 4) | ((cls & 2) << 7))


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """MD5(username ":" realm ":" password) (RFC 8489 §9.2.2; SASLprep is the caller's: coturn's
    REST credentials are plain ASCII)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


def _attr(atype: int, value: bytes) -> bytes:
    return struct.pack("!HH", atype, len(value)) + value + bytes(-len(value) % 4)


def build(msg_type: int, transaction_id: bytes, attributes: Iterable[tuple[int, bytes]],
          key: bytes | None = None, *, fingerprint: bool = True) -> bytes:
    """A STUN message with MESSAGE-INTEGRITY (when ``key`` is given) and FINGERPRINT last."""
    body = b"".join(_attr(t, v) for t, v in attributes)
    if key is not None:
        head = struct.pack("!HHI12s", msg_type, len(body) + 24, stun.MAGIC_COOKIE, transaction_id)
        body += _attr(stun.MESSAGE_INTEGRITY, hmac.new(key, head + body, hashlib.sha1).digest())
    out = struct.pack("!HHI12s", msg_type, len(body) + (8 if fingerprint else 0), stun.MAGIC_COOKIE,
                      transaction_id) + body
    if fingerprint:
        crc = (zlib.crc32(out) ^ stun.FINGERPRINT_XOR) & 0xFFFFFFFF
        out += _attr(stun.FINGERPRINT, crc.to_bytes(4, "big"))
    return out


def integrity_ok(datagram: bytes, key: bytes) -> bool:
    """Does the message carry a MESSAGE-INTEGRITY that checks with ``key``? (Its HMAC covers the
    message up to the attribute, the header's length field counting up to its end.)"""
    off, n = stun.HEADER_LEN, len(datagram)
    while off + 4 <= n:
        atype, alen = struct.unpack_from("!HH", datagram, off)
        if atype == stun.MESSAGE_INTEGRITY:
            if alen != 20 or off + 24 > n:
                return False
            head = datagram[:2] + (off - stun.HEADER_LEN + 24).to_bytes(2, "big") + datagram[4:off]
            want = hmac.new(key, head, hashlib.sha1).digest()
            return hmac.compare_digest(want, datagram[off + 4:off + 24])
        off += 4 + ((alen + 3) & ~3)
    return False


def parse_turn_url(text: str) -> tuple[str, int]:
    """``turn:HOST:PORT`` (RFC 7065; ``?transport=udp`` allowed, the default port 3478) -> (host, port);
    ValueError with the fix. Only TURN over UDP: ``turns:`` and TCP transports are refused."""
    t = text.strip()
    if not t.startswith("turn:"):
        raise ValueError(f"{text!r}: give the TURN server as turn:HOST:PORT (over UDP; turns: is not supported)")
    t = t[5:]
    t, _, query = t.partition("?")
    if query and query.lower() != "transport=udp":
        raise ValueError(f"{text!r}: only ?transport=udp is supported")
    if t.endswith("]"):
        t += ":3478"
    host, port = parse_hostport(t, default_port=3478)
    if not host:
        raise ValueError(f"{text!r}: give the TURN server as turn:HOST:PORT")
    return host, port


def channel_data(channel: int, payload: bytes | memoryview) -> bytes:
    """A ChannelData message (RFC 8656 §12.4); no padding over UDP."""
    return struct.pack("!HH", channel, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class TurnConfig:
    lifetime: int = 600              # asked for the allocation (the server may grant another)
    refresh_interval: float = 240.0  # permissions and channels (they live 300 / 600 s)
    retry_after: float = 10.0        # a peer's failed permission or channel: asked again after this
    rto: float = 0.5
    rc: int = 5                      # sends per request: 0, .5, 1.5, 3.5, 7.5 s, then ``rm`` RTOs
    rm: int = 8
    max_pending: int = 64
    max_peers: int = 256
    max_stale: int = 3
    # a Binding indication this often keeps the NAT's mapping toward the server alive while no
    # data flows (a rebinding NAT would give the server a new 5-tuple: another client to it)
    keepalive_interval: float = 20.0
    allocation_refresh: float | None = None   # seconds between Refreshes (None: 80 % of the lifetime)


@dataclass(slots=True)
class _Peer:
    addr: Addr
    channel: int
    permitted: bool = False
    bound: bool = False
    perm_at: float | None = None     # when to (re)send CreatePermission
    chan_at: float | None = None     # when to (re)send ChannelBind
    perm_until: float = 0.0
    chan_until: float = 0.0


@dataclass(slots=True)
class _Tx:
    method: int
    attrs: list[tuple[int, bytes]]
    peer: Addr | None
    authed: bool
    request: bytes
    transaction_id: bytes
    next_send: float | None
    interval: float
    sends: int = 0
    deadline: float | None = None
    stale: int = 0


@dataclass
class TurnStats:
    malformed: int = 0          # not STUN / ChannelData, or a broken one
    unexpected: int = 0         # a response to no request of ours, or of the wrong method
    integrity_failed: int = 0   # a success response without a valid MESSAGE-INTEGRITY
    unknown_peer: int = 0       # data on an unbound channel or from a peer without permission
    stale_nonce: int = 0
    retransmits: int = 0
    errors: int = 0             # error responses (other than the expected first 401)
    timeouts: int = 0
    data_in: int = 0
    data_out: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("malformed", "unexpected", "integrity_failed", "unknown_peer",
                                               "stale_nonce", "retransmits", "errors", "timeouts",
                                               "data_in", "data_out")}


class TurnClient:
    """One allocation on ``server`` (the address datagrams go to and come from)."""

    def __init__(self, server: Addr, username: str, password: str, *, config: TurnConfig | None = None,
                 software: str | None = stun.SOFTWARE_NAME):
        self.server = normalize(server)
        self.username, self.password = username, password
        self.config = config or TurnConfig()
        self.software = software
        self.state = NEW
        self.error: str | None = None
        self.relayed: Addr | None = None
        self.mapped: Addr | None = None
        self.lifetime: int | None = None
        self.expires_at: float | None = None
        self._refresh_at: float | None = None
        self._keepalive_at: float | None = None
        self.realm: bytes | None = None
        self.nonce: bytes | None = None
        self._key: bytes | None = None
        self._txs: dict[bytes, _Tx] = {}
        self._out: list[bytes] = []
        self.peers: dict[Addr, _Peer] = {}
        self._by_channel: dict[int, _Peer] = {}
        self._next_channel = CHANNEL_MIN
        self.stats = TurnStats()

    # ------------------------------------------------------------------ control
    def start(self, now: float) -> None:
        """Send the Allocate request (first without credentials: the 401 tells the realm and nonce)."""
        if self.state != NEW:
            return
        self.state = ALLOCATING
        self._request(ALLOCATE, [(REQUESTED_TRANSPORT, UDP_TRANSPORT), (LIFETIME, self._u32(self.config.lifetime))],
                      now, authed=False)

    def permit(self, peer: Addr, now: float) -> bool:
        """Install a permission and a channel for ``peer`` (its relayed address, say), kept
        refreshed until ``forget``. False when the peer bound or the channel numbers are used up."""
        peer = normalize(peer)
        if peer in self.peers:
            return True
        if len(self.peers) >= self.config.max_peers or self._next_channel > CHANNEL_MAX:
            return False
        p = _Peer(peer, self._next_channel)
        self._next_channel += 1
        self.peers[peer] = p
        self._by_channel[p.channel] = p
        if self.state == ALLOCATED:
            p.perm_at = p.chan_at = now
            self._peer_requests(now)
        return True

    def forget(self, peer: Addr) -> None:
        """Stop refreshing ``peer``'s permission and channel (they lapse on the server)."""
        p = self.peers.pop(normalize(peer), None)
        if p is not None:
            self._by_channel.pop(p.channel, None)

    def close(self, now: float) -> None:
        """Deallocate (a Refresh with LIFETIME 0, sent once) and stop."""
        if self.state == ALLOCATED:
            self._txs.clear()
            tid = stun.new_transaction_id()
            self._out.append(self._encode(REFRESH, tid, [(LIFETIME, self._u32(0))], True))
        self._txs.clear()
        self.state = CLOSED

    # ------------------------------------------------------------------ data
    def channel_of(self, peer: Addr) -> int | None:
        p = self.peers.get(peer)
        return p.channel if p is not None and p.bound else None

    def ready(self, peer: Addr) -> bool:
        """Can data go to ``peer`` now (channel bound or permission installed)?"""
        p = self.peers.get(peer)
        return self.state == ALLOCATED and p is not None and (p.bound or p.permitted)

    def wrap(self, peer: Addr, payload: bytes | memoryview) -> bytes | None:
        """``payload`` for ``peer``, framed for the server: ChannelData on a bound channel, a Send
        indication with only a permission, None when neither is there yet."""
        p = self.peers.get(peer)
        if p is None or self.state != ALLOCATED:
            return None
        self.stats.data_out += 1
        if p.bound:
            return struct.pack("!HH", p.channel, len(payload)) + payload
        if p.permitted:
            return build(stun_type(SEND, stun.INDICATION), stun.new_transaction_id(),
                         [(XOR_PEER_ADDRESS, stun.encode_address(peer, None)), (DATA_ATTR, bytes(payload))],
                         fingerprint=False)
        self.stats.data_out -= 1
        return None

    def receive(self, datagram: bytes | memoryview, now: float) -> tuple[Addr, bytes | memoryview] | None:
        """A datagram from the server: (peer, payload) for relayed data, else None (responses are
        handled here; anything else is counted)."""
        n = len(datagram)
        if n >= 4 and 0x40 <= datagram[0] <= 0x4F:
            channel = (datagram[0] << 8) | datagram[1]
            length = (datagram[2] << 8) | datagram[3]
            if 4 + length > n:
                self.stats.malformed += 1
                return None
            p = self._by_channel.get(channel)
            if p is None or not p.bound:
                self.stats.unknown_peer += 1
                return None
            self.stats.data_in += 1
            return p.addr, datagram[4:4 + length]
        raw = bytes(datagram)
        try:
            msg = stun.parse(raw)
        except stun.StunError:
            self.stats.malformed += 1
            return None
        cls = msg.msg_class
        if cls == stun.INDICATION:
            if msg.method != DATA:
                self.stats.unexpected += 1
                return None
            return self._data_indication(msg)
        if cls not in (stun.SUCCESS, stun.ERROR):
            self.stats.unexpected += 1
            return None
        tx = self._txs.get(msg.transaction_id)
        if tx is None or msg.method != tx.method:
            self.stats.unexpected += 1
            return None
        if cls == stun.SUCCESS:
            if tx.authed and (self._key is None or not integrity_ok(raw, self._key)):
                self.stats.integrity_failed += 1
                return None
            if [t for t in msg.unknown_required if t not in TURN_KNOWN]:
                del self._txs[msg.transaction_id]
                self._failed_tx(tx, "response with unknown comprehension-required attributes", now)
                return None
            del self._txs[msg.transaction_id]
            self._success(tx, msg, now)
        else:
            del self._txs[msg.transaction_id]
            self._error(tx, msg, now)
        return None

    def _data_indication(self, msg: stun.Message) -> tuple[Addr, bytes] | None:
        peer_raw, data = msg.get(XOR_PEER_ADDRESS), msg.get(DATA_ATTR)
        if peer_raw is None or data is None:
            self.stats.malformed += 1
            return None
        try:
            peer = stun.decode_address(peer_raw, msg.transaction_id)
        except stun.StunError:
            self.stats.malformed += 1
            return None
        p = self.peers.get(peer)
        if p is None or not (p.permitted or p.bound):
            self.stats.unknown_peer += 1
            return None
        self.stats.data_in += 1
        return peer, data

    # ------------------------------------------------------------------ timers and output
    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Datagrams for the server (all of them go to ``server``)."""
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        if self.state in (FAILED, CLOSED):
            return None
        times = [t for tx in self._txs.values() for t in (tx.next_send, tx.deadline) if t is not None]
        if self.state == ALLOCATED:
            if self._refresh_at is not None:
                times.append(self._refresh_at)
            if self._keepalive_at is not None:
                times.append(self._keepalive_at)
            for p in self.peers.values():
                times.extend(t for t in (p.perm_at, p.chan_at) if t is not None)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        if self.state in (FAILED, CLOSED):
            return
        c = self.config
        for tid, tx in list(self._txs.items()):
            if tx.next_send is not None and now >= tx.next_send:
                self._out.append(tx.request)
                tx.sends += 1
                if tx.sends > 1:
                    self.stats.retransmits += 1
                if tx.sends < c.rc:
                    tx.next_send = now + tx.interval
                    tx.interval *= 2
                else:
                    tx.next_send = None
                    tx.deadline = now + c.rm * c.rto
            elif tx.deadline is not None and now >= tx.deadline:
                del self._txs[tid]
                self.stats.timeouts += 1
                self._failed_tx(tx, f"{METHOD_NAMES.get(tx.method, '?')} unanswered", now)
                if self.state in (FAILED, CLOSED):
                    return
        if self.state != ALLOCATED:
            return
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            self._request(REFRESH, [(LIFETIME, self._u32(c.lifetime))], now)
        if self._keepalive_at is not None and now >= self._keepalive_at:
            self._keepalive_at = now + c.keepalive_interval
            self._out.append(build(stun_type(stun.BINDING, stun.INDICATION), stun.new_transaction_id(), []))
        self._peer_requests(now)

    def _peer_requests(self, now: float) -> None:
        for p in self.peers.values():
            peer_attr = (XOR_PEER_ADDRESS, b"")   # encoded per transaction (XOR with its ID)
            if p.perm_at is not None and now >= p.perm_at:
                p.perm_at = None
                self._request(CREATE_PERMISSION, [peer_attr], now, peer=p.addr)
            if p.chan_at is not None and now >= p.chan_at:
                p.chan_at = None
                self._request(CHANNEL_BIND, [(CHANNEL_NUMBER, struct.pack("!HH", p.channel, 0)), peer_attr], now,
                              peer=p.addr)

    # ------------------------------------------------------------------ transactions
    @staticmethod
    def _u32(v: int) -> bytes:
        return struct.pack("!I", v)

    def _encode(self, method: int, tid: bytes, attrs: list[tuple[int, bytes]], authed: bool,
                peer: Addr | None = None) -> bytes:
        body = [(t, stun.encode_address(peer, tid) if t == XOR_PEER_ADDRESS and peer is not None else v)
                for t, v in attrs]
        if self.software:
            body.append((stun.SOFTWARE, self.software.encode()[:128]))
        if authed and self.realm is not None and self.nonce is not None:
            body += [(stun.USERNAME, self.username.encode()), (stun.REALM, self.realm), (stun.NONCE, self.nonce)]
            return build(stun_type(method, stun.REQUEST), tid, body, self._key)
        return build(stun_type(method, stun.REQUEST), tid, body)

    def _request(self, method: int, attrs: list[tuple[int, bytes]], now: float, *, peer: Addr | None = None,
                 authed: bool = True, stale: int = 0) -> None:
        if len(self._txs) >= self.config.max_pending:
            self.stats.extra["dropped_requests"] = self.stats.extra.get("dropped_requests", 0) + 1
            if peer is not None and (p := self.peers.get(peer)) is not None:   # ask again later
                if method == CREATE_PERMISSION:
                    p.perm_at = now + self.config.retry_after
                else:
                    p.chan_at = now + self.config.retry_after
            elif method == REFRESH:
                self._refresh_at = now + self.config.retry_after
            return
        tid = stun.new_transaction_id()
        authed = authed and self.nonce is not None
        tx = _Tx(method, attrs, peer, authed, self._encode(method, tid, attrs, authed, peer), tid, now,
                 self.config.rto, stale=stale)
        self._txs[tid] = tx
        self._send_first(tx, now)

    def _send_first(self, tx: _Tx, now: float) -> None:
        """Send a new transaction's first datagram at once."""
        self._out.append(tx.request)
        tx.sends = 1
        tx.next_send = now + tx.interval
        tx.interval *= 2

    def _resend(self, tx: _Tx, now: float, stale: int) -> None:
        self._request(tx.method, tx.attrs, now, peer=tx.peer, stale=stale)

    def _success(self, tx: _Tx, msg: stun.Message, now: float) -> None:
        c = self.config
        if tx.method == ALLOCATE:
            relayed = msg.get(XOR_RELAYED_ADDRESS)
            try:
                self.relayed = stun.decode_address(relayed, msg.transaction_id) if relayed else None
            except stun.StunError:
                self.relayed = None
            if self.relayed is None:
                self._fail("Allocate success without a relayed address")
                return
            self.mapped = msg.xor_mapped_address
            self._set_lifetime(msg, now)
            self.state = ALLOCATED
            self._keepalive_at = now + c.keepalive_interval
            for p in self.peers.values():
                p.perm_at = p.chan_at = now
            self._peer_requests(now)
        elif tx.method == REFRESH:
            self._set_lifetime(msg, now)
        elif tx.method == CREATE_PERMISSION and tx.peer in self.peers:
            p = self.peers[tx.peer]
            p.permitted, p.perm_until = True, now + 300.0
            p.perm_at = now + c.refresh_interval
        elif tx.method == CHANNEL_BIND and tx.peer in self.peers:
            p = self.peers[tx.peer]
            p.bound, p.chan_until = True, now + 600.0
            p.permitted, p.perm_until = True, max(p.perm_until, now + 300.0)  # a binding installs one too
            p.chan_at = now + c.refresh_interval

    def _set_lifetime(self, msg: stun.Message, now: float) -> None:
        v = msg.get(LIFETIME)
        life = int.from_bytes(v, "big") if v is not None and len(v) == 4 else self.config.lifetime
        life = max(30, min(life, 3600 * 24))
        self.lifetime = life
        self.expires_at = now + life
        every = self.config.allocation_refresh
        self._refresh_at = now + (every if every else min(life * 0.8, max(life - 60, life / 2)))

    def _error(self, tx: _Tx, msg: stun.Message, now: float) -> None:
        code, reason = msg.error or (0, "")
        realm, nonce = msg.get(stun.REALM), msg.get(stun.NONCE)
        fresh = realm is not None and nonce is not None and 0 < len(realm) <= MAX_TEXT and 0 < len(nonce) <= MAX_TEXT
        if code == 401 and not tx.authed and tx.method == ALLOCATE and fresh and realm and nonce:
            self.realm, self.nonce = realm, nonce
            self._key = long_term_key(self.username, realm.decode("utf-8", "replace"), self.password)
            self._resend(tx, now, tx.stale)
            return
        if code == 438 and nonce is not None and 0 < len(nonce) <= MAX_TEXT and tx.stale < self.config.max_stale:
            self.stats.stale_nonce += 1
            self.nonce = nonce
            if realm is not None and 0 < len(realm) <= MAX_TEXT and realm != self.realm:
                self.realm = realm
                self._key = long_term_key(self.username, realm.decode("utf-8", "replace"), self.password)
            self._resend(tx, now, tx.stale + 1)
            return
        self.stats.errors += 1
        self._failed_tx(tx, f"{METHOD_NAMES.get(tx.method, '?')} refused: {code} {reason}".strip(), now)

    def _failed_tx(self, tx: _Tx, why: str, now: float) -> None:
        if tx.method in (ALLOCATE, REFRESH):
            self._fail(why)
        elif tx.peer is not None and (p := self.peers.get(tx.peer)) is not None:
            self.stats.extra["last_peer_error"] = why
            if tx.method == CREATE_PERMISSION:
                p.perm_at = now + self.config.retry_after
                if now >= p.perm_until:
                    p.permitted = False
            else:
                p.chan_at = now + self.config.retry_after
                if now >= p.chan_until:
                    p.bound = False

    def _fail(self, why: str) -> None:
        self.state = FAILED
        self.error = why
        self._txs.clear()
        for p in self.peers.values():
            p.permitted = p.bound = False


__all__ = ["TurnClient", "TurnConfig", "TurnStats", "build", "channel_data", "integrity_ok", "long_term_key",
           "stun_type", "parse_turn_url"]
