"""Who may use the local web page (sans-I/O): the checks every request passes before the server
(overlay/ui/server.py) answers it, and the headers every answer carries.

Only the local user who runs the node may use the page. The daemon keeps a random secret in its
home (``ui.secret``, 0600); ``overlay ui`` reads it and opens ``http://HOST:PORT/?s=SECRET``,
which the guard answers with a redirect to ``/`` that sets the secret as an HttpOnly,
SameSite=Strict cookie (the secret leaves the address bar). Then:

- the Host header must be exactly the address the page listens on (a DNS rebinding page has its
  own name there);
- every request needs the cookie (403 without it);
- a state-changing request (POST) also needs an Origin header equal to the page's own origin and
  the CSRF token of the page (``X-CSRF-Token``: a header a cross-site form cannot send);
- every answer forbids framing, sniffing, referrers and caching, and carries a strict CSP (no
  inline script: the page's JS is a file).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

SECRET_FILE = "ui.secret"
SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")   # secrets.token_urlsafe(32)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'; object-src 'none'")
SECURITY_HEADERS = (
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
SAFE_METHODS = ("GET", "HEAD")


def load_secret(home: Path) -> str:
    """The page's secret: the one in ``home/ui.secret`` if it is well formed and only the owner
    can read it (a page the user keeps open survives a restart), else a new one written 0600."""
    path = home / SECRET_FILE
    try:
        st = path.stat()
        text = path.read_text().strip()
        if SECRET_RE.fullmatch(text) and st.st_mode & 0o077 == 0 and st.st_uid == os.getuid():
            return text
    except (OSError, UnicodeDecodeError):
        pass
    secret = secrets.token_urlsafe(32)
    tmp = path.with_name(SECRET_FILE + ".tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.replace(tmp, path)
    return secret


def read_secret(home: Path) -> str | None:
    """The secret as ``overlay ui`` reads it (None if there is none)."""
    try:
        text = (home / SECRET_FILE).read_text().strip()
    except OSError:
        return None
    return text if SECRET_RE.fullmatch(text) else None


@dataclass(frozen=True)
class Verdict:
    status: int                    # 0: go on and serve the request
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = ()


PASS = Verdict(0)


class Guard:
    def __init__(self, secret: str, host: str, port: int):
        self.secret = secret
        self.host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"   # the exact Host header
        self.origin = f"http://{self.host}"
        self.cookie = f"overlay_ui_{port}"    # cookies ignore ports: two nodes on one machine keep theirs apart
        self.csrf = hmac.new(secret.encode(), b"csrf", hashlib.sha256).hexdigest()

    def url(self) -> str:
        return f"{self.origin}/?s={self.secret}"

    def check(self, method: str, target: str, headers: dict[str, str]) -> Verdict:
        """``headers``: lower-case names (repeated ones joined with ", ", cookies with "; ")."""
        if headers.get("host") != self.host:
            return Verdict(403, "wrong Host header")
        path, _, query = target.partition("?")
        if method == "GET" and path == "/" and query:
            given = parse_qs(query).get("s", [""])[0]
            if not hmac.compare_digest(given.encode(), self.secret.encode()):
                return Verdict(403, "wrong secret: run `overlay ui` for the page's address")
            cookie = f"{self.cookie}={self.secret}; Path=/; HttpOnly; SameSite=Strict"
            return Verdict(303, "", (("Location", "/"), ("Set-Cookie", cookie)))
        if not hmac.compare_digest(self._cookie(headers).encode(), self.secret.encode()):
            return Verdict(403, "no access: run `overlay ui` for the page's address")
        if method in SAFE_METHODS:
            return PASS
        if method != "POST":
            return Verdict(405, "method not allowed")
        if headers.get("origin") != self.origin:
            return Verdict(403, "cross-site request refused")
        if not hmac.compare_digest(headers.get("x-csrf-token", "").encode(), self.csrf.encode()):
            return Verdict(403, "missing or wrong CSRF token")
        return PASS

    def _cookie(self, headers: dict[str, str]) -> str:
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie:
                return value
        return ""
