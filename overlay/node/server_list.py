"""The mediation servers a node may use: ``--server A:P,B:P`` (or config.toml's ``server``, a
string or a list), parsed and checked once.

Every entry is ``HOST:PORT``: a host name, an IPv4 address, or an IPv6 address in brackets
(``[2001:db8::7]:7777``; an unbracketed one is taken only when it reads as one address and a
port, as ``--server`` always did). Entries are kept as written (the pinned keys in
``known_servers`` are filed under that text), stripped of blanks; the same server twice, an empty
entry or more than ``MAX_SERVERS`` is an error with the one line to show.
"""

from __future__ import annotations

import ipaddress
import re

from overlay.hostport import parse_hostport

MAX_SERVERS = 16
MAX_HOST = 253
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


def parse_server(text: str) -> tuple[str, int]:
    """(host, port) of one entry; ValueError with the reason."""
    entry = text.strip()
    if not entry:
        raise ValueError("empty server address")
    if "," in entry:
        raise ValueError(f"{entry!r}: one HOST:PORT expected")
    host, port = parse_hostport(entry)
    if not entry.rpartition(":")[2].isdigit():
        raise ValueError(f"{entry!r}: the port must be digits only")
    if entry.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{entry!r}: [{host}] is not an IPv6 address") from None
    elif ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{entry!r}: expected HOST:PORT (an IPv6 address goes in brackets: "
                             "[2001:db8::7]:7777)") from None
    elif not _HOSTNAME.match(host):
        raise ValueError(f"{entry!r}: {host!r} is not a host name or IP address")
    return host, port


def parse_servers(value: str | list | tuple) -> tuple[str, ...]:
    """The servers of ``--server A,B`` (text) or of config.toml's list, in order, as written.
    ValueError with the one line to show."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(x, str) for x in value):
            raise ValueError("expected \"HOST:PORT\" strings")
        items = [x for item in value for x in item.split(",")]
    else:
        raise ValueError("expected \"HOST:PORT\" or a list of them")
    if len(items) > MAX_SERVERS:
        raise ValueError(f"{len(items)} servers: at most {MAX_SERVERS}")
    out: list[str] = []
    seen: dict[tuple[str, int], str] = {}
    for i, raw in enumerate(items, 1):
        entry = raw.strip()
        if not entry:
            if len(items) == 1:
                raise ValueError("no server address: expected HOST:PORT")
            raise ValueError(f"entry #{i} of the server list is empty: expected HOST:PORT,HOST:PORT")
        host, port = parse_server(entry)
        ident = (host.lower(), port)
        if ident in seen:
            raise ValueError(f"{entry!r} is listed twice (as {seen[ident]!r})")
        seen[ident] = entry
        out.append(entry)
    return tuple(out)


def server_text(servers: tuple[str, ...] | list[str]) -> str:
    """The list as one ``--server`` value (``A:P,B:P``), as remembered in prefs.json."""
    return ",".join(servers)
