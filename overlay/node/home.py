"""A node's home directory: key, config, pinned server keys, local API socket.

``--home DIR`` or ``OVERLAY_HOME`` choose it; otherwise ``$XDG_CONFIG_HOME/overlay`` (usually
``~/.config/overlay``). Everything a node owns lives there, so several nodes run side by side
with different homes. The key and the socket are 0600; the directory 0700.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path


KEY_FILE = "node.key"
CONFIG_FILE = "config.toml"
KNOWN_SERVERS = "known_servers"
SOCKET = "overlay.sock"
LOG_FILE = "overlay.log"


class HomeError(Exception):
    pass


class ServerKeyChanged(HomeError):
    pass


def default_home() -> Path:
    env = os.environ.get("OVERLAY_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "overlay"


class Home:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_home()

    @property
    def socket_path(self) -> Path:
        return self.path / SOCKET

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    # ------------------------------------------------------------------ key
    def private_key(self) -> bytes:
        """The node's X25519 key (also its WireGuard key), created 0600 on first use."""
        from overlay import crypto  # imported here: CLI commands that never need it start faster
        from overlay.control.messages import key_from_text, key_to_text
        p = self.path / KEY_FILE
        if p.exists():
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o600)
            try:
                return key_from_text(p.read_text().strip())
            except ValueError as e:
                raise HomeError(f"{p}: unreadable key ({e}); move it away to create a new identity") from None
        self.ensure()
        key = crypto.generate_private_key()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_to_text(key) + "\n")
        return key

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        from overlay.node.config import ConfigError
        from overlay.node.config import validate as validate_config
        p = self.config_path
        if not p.exists():
            return {}
        try:
            return validate_config(tomllib.loads(p.read_text()), p)
        except tomllib.TOMLDecodeError as e:
            raise HomeError(f"{p}: {e}") from None
        except ConfigError as e:
            raise HomeError(str(e)) from None

    # ------------------------------------------------------------------ known servers (TOFU)
    def _known(self) -> dict[str, str]:
        p = self.path / KNOWN_SERVERS
        out = {}
        if p.exists():
            for line in p.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and not line.startswith("#"):
                    out[parts[0]] = parts[1]
        return out

    def check_server_key(self, server: str, key: bytes, group: tuple[str, ...] | list[str] = ()) -> bool:
        """Pin on first contact; True if newly pinned. Raises ServerKeyChanged on a mismatch.

        ``group``: the other servers listed with this one (``--server A,B``), one deployment that
        shares one key. A server of the list met for the first time is pinned only if it shows
        the key already pinned for another server of the list (or none of them is pinned yet:
        trust on first use, as for a single server): so a node that trusts A authenticates B
        when it first fails over to it, the moment an attacker who can cut A off would choose."""
        from overlay.control.messages import key_to_text
        known = self._known()
        text = key_to_text(key)
        pinned = known.get(server)
        if pinned == text:
            return False
        if pinned is not None:
            raise ServerKeyChanged(
                f"server {server} presented key {text} but {self.path / KNOWN_SERVERS} pins {pinned}. "
                f"If the server was really reinstalled, run `overlay forget-server {server}` "
                f"(with the same --home; a running node then reconnects at once); otherwise someone may be "
                f"impersonating it")
        others = {s: known[s] for s in group if s != server and s in known}
        if others and text not in others.values():
            first, their = next(iter(others.items()))
            raise ServerKeyChanged(
                f"server {server} presented key {text}, not the key {their} pinned for {first} listed with it. "
                f"Servers listed together in --server are one deployment and share one key: copy server.key "
                f"from {first}'s data directory to {server}'s (or, if the deployment's key really changed, "
                f"`overlay forget-server {','.join(group)}`); otherwise someone may be impersonating {server}")
        self.ensure()
        with open(self.path / KNOWN_SERVERS, "a") as f:
            f.write(f"{server} {text}\n")
        return True

    def forget_server(self, server: str) -> bool:
        known = self._known()
        if server not in known:
            return False
        del known[server]
        (self.path / KNOWN_SERVERS).write_text("".join(f"{s} {k}\n" for s, k in known.items()))
        return True
