"""Time-limited TURN credentials in coturn's shared-secret REST scheme ("TURN REST API").

The mediation server and a TURN server (coturn with ``use-auth-secret`` and
``static-auth-secret=S``) share a secret. The server hands each node, over the encrypted control
connection, a username ``EXPIRY:NODEID`` (EXPIRY a Unix time) and the password
``base64(HMAC-SHA1(secret, username))``; the TURN server recomputes the password from the username
and refuses it after EXPIRY. Nothing is stored on either side, and a node that leaves keeps its
credentials only until they expire. Nodes ask for fresh ones (request ``turn``) at half their life.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from overlay.nat.turn import parse_turn_url

DEFAULT_TTL = 24 * 3600
MIN_TTL, MAX_TTL = 600, 7 * 24 * 3600


@dataclass(frozen=True)
class TurnSettings:
    url: str            # as given, e.g. turn:turn.example.net:3478
    secret: str
    ttl: int = DEFAULT_TTL

    def __post_init__(self) -> None:
        parse_turn_url(self.url)
        if not self.secret:
            raise ValueError("--turn-secret is empty")
        if not MIN_TTL <= self.ttl <= MAX_TTL:
            raise ValueError(f"TURN credential lifetime must be {MIN_TTL}-{MAX_TTL} s")

    def credentials(self, node_id: str, now: float) -> dict:
        """Credentials for the node ``node_id`` valid until ``now + ttl`` (coturn's REST scheme)."""
        expires = int(now) + self.ttl
        username = f"{expires}:{node_id}"
        return {"url": self.url, "username": username, "password": rest_password(self.secret, username),
                "expires": expires, "ttl": self.ttl}


def rest_password(secret: str, username: str) -> str:
    """base64(HMAC-SHA1(secret, username)): what coturn computes for ``use-auth-secret``."""
    return base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()


def node_id(key: bytes) -> str:
    """The node's key as coturn sees it in usernames and logs: base64url without padding."""
    return base64.urlsafe_b64encode(key).decode().rstrip("=")
