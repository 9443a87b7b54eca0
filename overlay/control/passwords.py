"""Network passwords: Argon2id hashes (libsodium via PyNaCl), never stored in clear.

Interactive limits (64 MiB, 2 passes) make a guess cost tens of milliseconds of server time,
which together with the per-node and per-network failure limits makes online guessing useless.
Callers run these off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

from nacl import pwhash
from nacl.exceptions import InvalidkeyError

OPSLIMIT = pwhash.argon2id.OPSLIMIT_INTERACTIVE
MEMLIMIT = pwhash.argon2id.MEMLIMIT_INTERACTIVE


def hash_password(password: str) -> bytes:
    return pwhash.argon2id.str(password.encode(), opslimit=OPSLIMIT, memlimit=MEMLIMIT)


def verify_password(stored: bytes, password: str) -> bool:
    try:
        return pwhash.verify(stored, password.encode())
    except InvalidkeyError:
        return False
