"""What a node remembers between runs, in ``prefs.json`` in its home (0600, replaced atomically).

- the server, name and interface (``--tun`` / ``--tap`` with its ``--dev`` and ``--only-shared``,
  or none) ``overlay up`` last ran with, and the other options it was given (``UP_OPTIONS``:
  proxies, advertised routes, port, keepalive, ...), so ``overlay up`` alone starts the node again
  the same way (options and config.toml still take precedence; ``--userspace`` goes back to no
  device, ``--reset`` forgets the remembered options and device);
- the networks it went offline in (``overlay offline NET``), until ``overlay online NET``;
- the shares and forwards added at run time (``overlay share`` / ``forward``), restored when the
  daemon starts and dropped by ``overlay unshare`` / ``unforward``; a forward keeps the key of
  its peer, so it follows the peer through renames. Those from config.toml are
  not copied here: config.toml stays their single source.

Kept deliberately small and readable; a file that cannot be parsed is an error naming it, never
silently replaced.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

from overlay.control.messages import MAX_NAME
from overlay.node.home import HomeError

PREFS_FILE = "prefs.json"

# The `overlay up` options remembered in prefs.json ("options"), as given on the command line:
# key -> (flag, value meaning "the default", type). "off" (or "") is a value like any other for
# the proxies and routes, so `--socks off` is remembered too; an option given at its default is
# dropped from the file.
UP_OPTIONS: dict[str, tuple[str, object, type]] = {
    "socks": ("--socks", "127.0.0.1:1080", str),
    "http_proxy": ("--http-proxy", "off", str),
    "ui": ("--ui", "127.0.0.1:0", str),
    "advertise_routes": ("--advertise-routes", "off", str),
    "port": ("--port", 0, int),
    "keepalive": ("--keepalive", 25.0, float),
    "port_mapping": ("--port-mapping", "all", str),
    "hard_nat_punch": ("--hard-nat-punch", True, bool),
    "via_proxy": ("--via-proxy", "off", str),
    "address": ("--address", "off", str),
    "proxy_user": ("--proxy-user", [], list),
    "wg_peer": ("--wg-peer", [], list),
    "dns": ("--dns", "auto", str),
    "dns_config": ("--dns-config", "auto", str),
}


def off_if_empty(value):
    """`--socks ""` means `--socks off` (likewise for every text option of UP_OPTIONS)."""
    return "off" if isinstance(value, str) and value.strip() in ("", "off") else value


def up_options(given: dict, remembered: dict, reset: bool = False) -> tuple[dict, dict, dict]:
    """Sort the options given to `overlay up` (None / [] for not given) and the remembered ones:
    (the given ones, the remembered ones not given, what to remember once the node runs). A given
    option replaces the remembered one; ``reset`` forgets them all. Values stay as typed ("off"
    included); the caller puts config.toml between the two and applies the defaults."""
    given = {k: off_if_empty(v) for k, v in given.items() if v is not None and v != []}
    for k in ("proxy_user", "wg_peer"):   # `--proxy-user off` clears the list
        if k in given and "off" in given[k]:
            given[k] = []
    base = {} if reset else dict(remembered)
    reused = {k: v for k, v in base.items() if k not in given}
    keep = {**base, **given}
    keep = {k: v for k, v in keep.items() if off_if_empty(v) != UP_OPTIONS[k][1]}
    return given, reused, keep


def option_flags(options: dict) -> str:
    """Options as command-line flags, for "as last time" (proxy passwords left out)."""
    parts = []
    for k, v in options.items():
        flag = UP_OPTIONS[k][0]
        if k == "hard_nat_punch":
            parts.append(flag if v else "--no-hard-nat-punch")
        elif k == "proxy_user":
            parts += [f"{flag} {u.partition(':')[0]}:…" for u in v]
        elif isinstance(v, list):
            parts += [f"{flag} {x}" for x in v]
        else:
            parts.append(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    return " ".join(parts)


def _checked_options(loaded) -> dict:
    if not isinstance(loaded, dict):
        raise ValueError("options: expected an object")
    out = {}
    for k, v in loaded.items():
        if k not in UP_OPTIONS:
            raise ValueError(f"options: unknown option {k!r}")
        kind = UP_OPTIONS[k][2]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)) or \
                (kind is list and not all(isinstance(x, str) for x in v)):
            raise ValueError(f"options: {k} has the wrong type")
        out[k] = v
    return out


class PrefsError(HomeError):
    pass


class Prefs:
    def __init__(self, home_path: Path):
        self.path = Path(home_path) / PREFS_FILE
        self.data: dict = {"server": None, "name": None, "interface": None, "shares": [], "forwards": [],
                          "away": [], "options": {}}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text())
                if not isinstance(loaded, dict):
                    raise ValueError("not a JSON object")
                shares = [{"port": int(s["port"]), "proto": "udp" if s.get("proto") == "udp" else "tcp"}
                          for s in loaded.get("shares", [])]
                forwards = [{"listen": int(f["listen"]), "peer": str(f["peer"]), "peer_port": int(f["peer_port"]),
                             "udp": bool(f.get("udp")), "key": None if f.get("key") is None else str(f["key"])}
                            for f in loaded.get("forwards", [])]
                away = [str(n) for n in loaded.get("away", [])]
                options = _checked_options(loaded.get("options", {}))
                iface = loaded.get("interface")
                if iface is not None:
                    if not isinstance(iface, dict) or iface.get("kind") not in ("tun", "tap"):
                        raise ValueError("interface: expected {\"kind\": \"tun\"|\"tap\", ...} or null")
                    iface = {"kind": iface["kind"], "dev": None if iface.get("dev") is None else str(iface["dev"]),
                             "only_shared": bool(iface.get("only_shared"))}
            except (OSError, ValueError, TypeError, KeyError) as e:
                raise PrefsError(f"{self.path}: unreadable ({e}); fix or delete it (it holds the last server, "
                                 "name, options, shares and forwards)") from None
            self.data.update(server=loaded.get("server"), name=loaded.get("name"), interface=iface,
                             shares=shares, forwards=forwards, away=away,
                             options=options)

    @property
    def server(self) -> str | None:
        return self.data["server"]

    @property
    def name(self) -> str | None:
        return self.data["name"]

    @property
    def interface(self) -> dict | None:
        """The device the node last ran with: {"kind": "tun"|"tap", "dev": name or None,
        "only_shared": bool}, or None (userspace)."""
        return dict(self.data["interface"]) if self.data["interface"] else None

    def remember_interface(self, kind: str | None, dev: str | None, only_shared: bool) -> None:
        iface = {"kind": kind, "dev": dev, "only_shared": only_shared} if kind else None
        if self.data["interface"] != iface:
            self.data["interface"] = iface
            self._save()

    @property
    def options(self) -> dict:
        """The other options the last `overlay up` was given (UP_OPTIONS keys, values as typed)."""
        return dict(self.data["options"])

    def remember_options(self, options: dict) -> None:
        options = _checked_options(options)
        if self.data["options"] != options:
            self.data["options"] = options
            self._save()

    @property
    def shares(self) -> list[dict]:
        return list(self.data["shares"])

    @property
    def forwards(self) -> list[dict]:
        return list(self.data["forwards"])

    @property
    def away(self) -> list[str]:
        """Networks this node went offline in (`overlay offline NET`)."""
        return list(self.data["away"])

    def set_away(self, network: str, away: bool) -> None:
        if away != (network in self.data["away"]):
            if away:
                self.data["away"].append(network)
            else:
                self.data["away"].remove(network)
            self._save()

    def remember(self, *, server: str | None, name: str) -> None:
        if (self.data["server"], self.data["name"]) != (server, name):
            self.data.update(server=server, name=name)
            self._save()

    def add_share(self, port: int, udp: bool) -> None:
        entry = {"port": port, "proto": "udp" if udp else "tcp"}
        if entry not in self.data["shares"]:
            self.data["shares"].append(entry)
            self._save()

    def remove_share(self, port: int, udp: bool) -> None:
        entry = {"port": port, "proto": "udp" if udp else "tcp"}
        if entry in self.data["shares"]:
            self.data["shares"].remove(entry)
            self._save()

    def add_forward(self, listen: int, peer: str, peer_port: int, udp: bool, key: str | None = None) -> None:
        """A runtime forward; ``key``: the peer's public key it follows (``peer`` is then the name
        last seen, for people and for a start before the node knows its peers)."""
        entry = {"listen": listen, "peer": peer, "peer_port": peer_port, "udp": udp, "key": key}
        if entry in self.data["forwards"]:
            return
        self._drop_forward(listen, udp)
        self.data["forwards"].append(entry)
        self._save()

    def remove_forward(self, listen: int, udp: bool) -> None:
        if self._drop_forward(listen, udp):
            self._save()

    def _drop_forward(self, listen: int, udp: bool) -> bool:
        before = len(self.data["forwards"])
        self.data["forwards"] = [f for f in self.data["forwards"] if (f["listen"], f["udp"]) != (listen, udp)]
        return len(self.data["forwards"]) != before

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=2)
            f.write("\n")
        os.replace(tmp, self.path)


def hostname_label(hostname: str | None = None) -> str | None:
    """The host name as a node name (first label, lower case, other characters as '-'), or None
    if nothing usable is left."""
    h = (hostname if hostname is not None else socket.gethostname()).split(".")[0].lower()
    h = re.sub(r"[^a-z0-9-]+", "-", h).strip("-")[:MAX_NAME].strip("-")
    return h or None
