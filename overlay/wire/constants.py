"""Protocol timing and limits, from the WireGuard whitepaper (section 6) and wireguard-go."""

from __future__ import annotations

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 0.334
KEEPALIVE_TIMEOUT = 10.0

MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT) - 2
"""Retries after the first initiation: 18 initiations in all, ~90 s, then give up."""
LAST_MINUTE_REKEY_AFTER = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
"""An initiator still receiving on a keypair this old rekeys before the keypair expires."""
ZERO_KEY_MATERIAL_AFTER = REJECT_AFTER_TIME * 3
HANDSHAKE_INITIATION_RATE = 1 / 50
"""Initiations from one peer closer together than this are a flood and dropped."""
