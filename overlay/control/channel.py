"""The encrypted control channel over TCP, sans-I/O.

Framing: every frame is a 2-byte big-endian length followed by that many bytes (the Noise
convention for stream transports). The first three frames are the Noise XX handshake; every later
frame is one ChaCha20-Poly1305 transport message whose plaintext is one UTF-8 JSON object.

Feed received bytes with ``receive_data``; take bytes to write with ``data_to_send``; take
``Handshaked`` / ``Message`` events from ``next_event``. Any violation (oversized or truncated
frame, failed authentication — which also catches replayed, reordered or injected frames, since
transport nonces are implicit counters — invalid JSON) raises ``ProtocolError``; the caller closes
the connection after sending the error it carries, if any.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

from overlay import crypto
from overlay.control.noise import HandshakeError, XXHandshake

PROLOGUE = b"overlay-control-v1"
MAX_FRAME = 65535
MAX_PLAINTEXT = MAX_FRAME - crypto.TAG_LEN
# Events not yet taken by the application; a peer that outruns us past this is cut off.
MAX_PENDING_EVENTS = 1024


class ProtocolError(Exception):
    """The peer broke the protocol; close the connection."""


@dataclass(frozen=True)
class Handshaked:
    remote_static: bytes


@dataclass(frozen=True)
class Message:
    body: dict


class Channel:
    def __init__(self, *, initiator: bool, static_private: bytes):
        self.initiator = initiator
        self._hs: XXHandshake | None = XXHandshake(initiator, static_private, PROLOGUE)
        self._send_cs = None
        self._recv_cs = None
        self._inbuf = bytearray()
        self._out = bytearray()
        self._events: deque = deque()
        self.remote_static: bytes | None = None
        if initiator:
            self._write_frame(self._hs.write_message())

    # ------------------------------------------------------------ output
    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def _write_frame(self, payload: bytes) -> None:
        self._out += len(payload).to_bytes(2, "big")
        self._out += payload

    @property
    def established(self) -> bool:
        return self._send_cs is not None

    def send(self, body: dict) -> None:
        """Queue one JSON message (after the handshake)."""
        if self._send_cs is None:
            raise ProtocolError("channel not established")
        try:
            data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        except (UnicodeEncodeError, ValueError, TypeError) as e:
            raise ProtocolError(f"message cannot be encoded: {e}") from None
        self.send_encoded(data)

    def send_encoded(self, data: bytes) -> None:
        """Queue one message already encoded as JSON text (UTF-8): the server encodes an event
        once for all the members it goes to (overlay/server/fanout.py)."""
        if self._send_cs is None:
            raise ProtocolError("channel not established")
        if len(data) > MAX_PLAINTEXT:
            raise ProtocolError(f"message too large ({len(data)} bytes)")
        self._write_frame(self._send_cs.encrypt(b"", data))

    # ------------------------------------------------------------ input
    def next_event(self):
        return self._events.popleft() if self._events else None

    def receive_data(self, data: bytes) -> None:
        self._inbuf += data
        while len(self._inbuf) >= 2:
            n = int.from_bytes(self._inbuf[:2], "big")
            if n == 0:
                raise ProtocolError("empty frame")
            if len(self._inbuf) < 2 + n:
                break
            frame = bytes(self._inbuf[2:2 + n])
            del self._inbuf[:2 + n]
            self._handle_frame(frame)
            if len(self._events) > MAX_PENDING_EVENTS:
                raise ProtocolError("too many unprocessed messages")

    def _handle_frame(self, frame: bytes) -> None:
        hs = self._hs
        if hs is not None:
            try:
                hs.read_message(frame)
                if not hs.complete:
                    self._write_frame(hs.write_message())
            except HandshakeError as e:
                raise ProtocolError(str(e)) from None
            if hs.remote_static is not None and self.remote_static is None:
                self.remote_static = hs.remote_static
                # The initiator learns the responder's key from message 2: report it before
                # sending message 3, so a pinned-key mismatch is caught before we authenticate.
                self._events.append(Handshaked(hs.remote_static))
            if hs.complete:
                self._send_cs, self._recv_cs = hs.split()
                self._hs = None
            return
        try:
            plaintext = self._recv_cs.decrypt(b"", frame)
        except crypto.DecryptError:
            raise ProtocolError("message authentication failed (tampered, replayed or out of order)") from None
        try:
            body = json.loads(plaintext)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ProtocolError("message is not valid JSON") from None
        if not isinstance(body, dict):
            raise ProtocolError("message is not a JSON object")
        self._events.append(Message(body))
