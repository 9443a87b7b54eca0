"""Proof of work bound to a node's public key: what a new identity costs the one who makes it.

A node's identity is its X25519 key, and keys are free. The server stores a node the first time
it creates, joins or asks to join a network; to make a flood of throw-away identities cost its
author rather than the crowd behind one NAT, a new node proves work on its key first (as ZeroTier
identities do): a nonce such that

    scrypt(PREFIX + public_key + nonce, salt=public_key, N=2**13, r=8, p=1)

starts with ``bits`` zero bits. scrypt is memory-hard (8 MiB per try), so GPUs and ASICs gain
little over the honest node's CPU. Finding a proof takes 2**bits tries on average; checking one
takes one try. The server sets ``bits`` (``overlay server --identity-work``, default
``DEFAULT_BITS``); a node computes its proof once, caches it next to its key, and sends it with
its first create or join. A proof is 16 hex digits; anything else does not check.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PREFIX = b"overlay identity proof v1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 13, 8, 1
DEFAULT_BITS = 4          # 16 tries on average: about 0.3 s of one core (benchmarks/bench_identity.py)
MAX_BITS = 20
PROOF_LEN = 16            # hex digits of the 8-byte nonce
FILE = "node.proof"       # in the node's home, beside node.key


def _digest(public_key: bytes, nonce: bytes) -> bytes:
    return hashlib.scrypt(PREFIX + public_key + nonce, salt=public_key, n=SCRYPT_N, r=SCRYPT_R,
                          p=SCRYPT_P, maxmem=64 * 1024 * 1024, dklen=32)


def _zero_bits(digest: bytes) -> int:
    n = int.from_bytes(digest, "big")
    return len(digest) * 8 - n.bit_length()


def work(public_key: bytes, proof: object) -> int:
    """The leading zero bits ``proof`` earns for ``public_key`` (0 for a malformed proof)."""
    if not isinstance(proof, str) or len(proof) != PROOF_LEN or len(public_key) != 32:
        return 0
    try:
        nonce = bytes.fromhex(proof)
    except ValueError:
        return 0
    return _zero_bits(_digest(public_key, nonce))


def check(public_key: bytes, proof: object, bits: int) -> bool:
    return bits <= 0 or work(public_key, proof) >= bits


def solve(public_key: bytes, bits: int) -> str:
    """A proof of ``bits`` for ``public_key``: 2**bits tries of 8 MiB scrypt on average."""
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"identity work must be 0-{MAX_BITS} bits")
    start = int.from_bytes(os.urandom(8), "big")
    i = 0
    while True:
        nonce = ((start + i) % (1 << 64)).to_bytes(8, "big")
        if _zero_bits(_digest(public_key, nonce)) >= bits:
            return nonce.hex()
        i += 1


def load_or_solve(path: Path, public_key: bytes, bits: int) -> str:
    """The cached proof in ``path`` if it is for this key and strong enough, else a new one
    (written 0600 for the next time). Slow: run it off the event loop."""
    try:
        cached = path.read_text().strip()
    except OSError:
        cached = ""
    if cached and check(public_key, cached, bits):
        return cached
    proof = solve(public_key, bits)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(proof + "\n")
        os.replace(tmp, path)
    except OSError:
        return proof  # a read-only home: computed again next time
    return proof
