"""Transport keypairs: one AEAD per direction, a send counter and a replay window.

A peer holds up to three (wireguard-go's rotation): ``current`` sends; ``previous`` still
decrypts packets in flight across a rekey; ``next`` is a responder's fresh keypair, promoted to
current once the initiator proves it has it by sending the first packet under it (key
confirmation, so a replayed initiation can never make us send under keys nobody holds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from overlay import crypto
from overlay.wire.constants import (
    LAST_MINUTE_REKEY_AFTER,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
)
from overlay.wire.replay import ReplayWindow

if TYPE_CHECKING:
    from overlay.wire.peer import Peer



class Keypair:
    __slots__ = (
        "send", "receive", "send_counter", "replay", "created", "is_initiator", "local_index", "remote_index",
        "peer", "rekey_at", "last_minute_at", "seal", "open",
    )

    def __init__(
        self, send_key: bytes, receive_key: bytes, is_initiator: bool,
        local_index: int, remote_index: int, peer: Peer, now: float,
    ):
        self.send = crypto.Aead(send_key)
        self.receive = crypto.Aead(receive_key)
        self.seal = self.send.seal_nonce     # per packet: (crypto.nonce_of(counter), packet, None)
        self.open = self.receive.open_nonce  # raises crypto.TagError
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.created = now
        self.is_initiator = is_initiator
        self.local_index = local_index
        self.remote_index = remote_index
        self.peer = peer
        # Only the initiator rekeys on age, so both ends do not start handshakes at once.
        self.rekey_at = now + REKEY_AFTER_TIME if is_initiator else float("inf")
        self.last_minute_at = now + LAST_MINUTE_REKEY_AFTER if is_initiator else float("inf")

    def can_send(self, now: float) -> bool:
        return self.send_counter < REJECT_AFTER_MESSAGES and now - self.created < REJECT_AFTER_TIME

    def needs_rekey(self, now: float) -> bool:
        return self.send_counter >= REKEY_AFTER_MESSAGES or now >= self.rekey_at


class Keypairs:
    __slots__ = ("previous", "current", "next")

    def __init__(self) -> None:
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None

    def all(self) -> list[Keypair]:
        return [k for k in (self.previous, self.current, self.next) if k is not None]

    def install(self, keypair: Keypair) -> list[Keypair]:
        """Rotate in a freshly derived keypair; returns the keypairs dropped (to unindex)."""
        dropped: list[Keypair] = []
        if keypair.is_initiator:
            if self.next is not None:
                dropped += [k for k in (self.previous, self.current) if k is not None]
                self.previous, self.next = self.next, None
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            dropped += [k for k in (self.previous, self.next) if k is not None]
            self.previous = None
            self.next = keypair
        return dropped

    def confirm(self) -> list[Keypair]:
        """Promote ``next`` to current (its first packet arrived); returns the keypairs dropped."""
        dropped = [self.previous] if self.previous is not None else []
        self.previous, self.current, self.next = self.current, self.next, None
        return dropped

    def clear(self) -> list[Keypair]:
        dropped = self.all()
        self.previous = self.current = self.next = None
        return dropped
