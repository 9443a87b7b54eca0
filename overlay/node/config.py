"""Validation of a node's config.toml: every setting checked before anything starts.

A bad setting ends ``overlay up`` with one line naming the file, the key and what is allowed
(``~/.config/overlay/config.toml: keepalive = 3: expected a number of seconds from 7 to 600``);
an unknown key is an error too (a typo would otherwise be silently ignored), with the closest
known key suggested. config.example.toml documents every key checked here.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Callable
from pathlib import Path

from overlay.control.messages import RequestError, normalize_name
from overlay.hostport import parse_hostport
from overlay.node.settings import KEEPALIVE_RANGE, PORT_RANGE, PROXY_SCHEMES


class ConfigError(ValueError):
    pass


def _str(v) -> str | None:
    return None if isinstance(v, str) and v else "expected a non-empty string"


def _hostport(allow_off: bool = False, allow_zero: bool = False):
    def check(v) -> str | None:
        what = "\"HOST:PORT\"" + (" or \"off\"" if allow_off else "")
        if allow_off and v == "off":
            return None
        try:
            parse_hostport(v, allow_zero=allow_zero)
        except ValueError:
            return f"expected {what}"
        return None if v.rpartition(":")[2].isdigit() else f"expected {what}"   # no sign, no blanks
    return check


def _servers(v) -> str | None:
    """One "HOST:PORT", or several of one deployment: a list (or "A:P,B:P")."""
    from overlay.node.server_list import parse_servers
    if not isinstance(v, (str, list)) or not v:
        return "expected \"HOST:PORT\" or a list of them, such as [\"a.example:7777\", \"b.example:7777\"]"
    try:
        parse_servers(v)
    except ValueError as e:
        return f"expected \"HOST:PORT\" or a list of them ({e})"
    return None


def _int(lo: int, hi: int, what: str = "an integer"):
    def check(v) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            return f"expected {what} from {lo} to {hi}"
        return None
    return check


def _number(lo: float, hi: float, what: str):
    def check(v) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            return f"expected {what} from {lo:g} to {hi:g}"
        return None
    return check


def _bool(v) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def _choice(*allowed: str):
    def check(v) -> str | None:
        return None if v in allowed else "expected " + " or ".join(f'"{a}"' for a in allowed)
    return check


def _name(v) -> str | None:
    try:
        normalize_name(v, "node name")
    except RequestError:
        return "expected a name of 1-32 letters, digits or '-', starting and ending with a letter or digit"
    return None


def _ipv4(v) -> str | None:
    try:
        ipaddress.IPv4Address(v)
    except (ValueError, TypeError):
        return "expected an IPv4 address such as \"10.100.0.2\""
    return None


def _proxy_url(v) -> str | None:
    if isinstance(v, str) and v.startswith(PROXY_SCHEMES):
        return None
    return "expected \"http://HOST:PORT\" or \"socks5://[USER:PASS@]HOST:PORT\""


def _proxy_users(v) -> str | None:
    if isinstance(v, dict) and all(isinstance(k, str) and k and isinstance(p, str) and p for k, p in v.items()):
        return None
    return "expected a table of user names to non-empty password strings, such as { alice = \"secret\" }"


def _allowed_ips(v) -> str | None:
    items = v if isinstance(v, list) else [v]
    try:
        for a in items:
            ipaddress.IPv4Network(a, strict=False)
    except (ValueError, TypeError):
        return "expected an IPv4 prefix or a list of them, such as [\"10.100.0.1/32\"]"
    return None


def _routes(v) -> str | None:
    from overlay.control.messages import MAX_ROUTES, parse_route
    items = v if isinstance(v, list) else [v]
    if len(items) > MAX_ROUTES:
        return f"at most {MAX_ROUTES} subnets"
    try:
        for a in items:
            parse_route(a)
    except ValueError as e:
        return f"{e}; expected a list of IPv4 subnets such as [\"192.168.1.0/24\"]"
    return None


def _port_mapping(v) -> str | None:
    from overlay.nat.portmap import parse_protocols
    if isinstance(v, str) and v not in ("all", "off"):
        return "expected true, false or a list such as [\"pcp\", \"nat-pmp\", \"upnp\"]"
    try:
        parse_protocols(v)
    except ValueError as e:
        return str(e)
    return None


def _dns(v) -> str | None:
    from overlay.node.settings import dns_address
    if not isinstance(v, str):
        return "expected \"auto\", \"off\" or a loopback \"IP:PORT\""
    if v.strip() in ("auto", "off", ""):
        return None
    try:
        dns_address(v)
    except ValueError as e:
        return str(e)
    return None


Check = Callable[[object], "str | None"]

TOP: dict[str, Check] = {
    "server": _servers,
    "name": _name,
    "via_proxy": _proxy_url,
    "port": _int(*PORT_RANGE, "a UDP port (0: any)"),
    "keepalive": _number(*KEEPALIVE_RANGE, "a number of seconds"),
    "socks": _hostport(allow_off=True, allow_zero=True),
    "http_proxy": _hostport(allow_off=True, allow_zero=True),
    "ui": _hostport(allow_off=True, allow_zero=True),   # the local web page (loopback; checked in settings)
    "proxy_users": _proxy_users,
    "address": _ipv4,
    # kernel interface settings of `overlay up --tun/--tap` (validated further where they are used)
    "interface": _choice("tun", "tap", "none"),
    "dev": _str,
    "only_shared": _bool,
    # subnets of this machine's LAN offered to the network as a gateway (the owner approves them)
    "advertise_routes": _routes,
    "hard_nat_punch": _bool,
    # port mapping protocols asked of the router: true (all), false, or a list of pcp, nat-pmp, upnp
    "port_mapping": _port_mapping,
    # the node's DNS for its peers: "auto", "off" or a loopback "IP:PORT"
    "dns": _dns,
    # this machine's resolver in TUN/TAP mode: "auto" (systemd-resolved when it runs), "resolv-conf"
    # (else edit /etc/resolv.conf, restored when the node stops) or "off"
    "dns_config": _choice("auto", "resolv-conf", "off"),
}

TABLES: dict[str, tuple[dict[str, Check], tuple[str, ...]]] = {
    "share": ({"port": _int(1, 65535, "a port"), "proto": _choice("tcp", "udp")}, ("port",)),
    "forward": ({"listen": _int(0, 65535, "a local port"), "peer": _str, "peer_port": _int(1, 65535, "a port"),
                 "udp": _bool}, ("listen", "peer")),
    "peer": ({"name": _str, "public_key": _str, "endpoint": _hostport(), "allowed_ips": _allowed_ips,
              "persistent_keepalive": _number(0, 65535, "a number of seconds")}, ("public_key", "allowed_ips")),
}


def _unknown(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(known)
    return f"unknown key {key!r} ({hint})"


def validate(cfg: dict, path: Path | str) -> dict:
    """``cfg`` unchanged if every setting is valid; else ConfigError with one line."""
    for key, value in cfg.items():
        if key in TABLES:
            fields, required = TABLES[key]
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise ConfigError(f"{path}: {key}: expected [[{key}]] tables")
            for i, table in enumerate(value, 1):
                where = f"{path}: [[{key}]] #{i}"
                for k, v in table.items():
                    if k not in fields:
                        raise ConfigError(f"{where}: {_unknown(k, fields)}")
                    problem = fields[k](v)
                    if problem:
                        raise ConfigError(f"{where}: {k} = {_show(v)}: {problem}")
                missing = [k for k in required if k not in table]
                if missing:
                    raise ConfigError(f"{where}: missing {' and '.join(missing)}")
        elif key in TOP:
            problem = TOP[key](value)
            if problem:
                shown = "" if key == "proxy_users" else f" = {_show(value)}"  # never echo passwords
                raise ConfigError(f"{path}: {key}{shown}: {problem}")
        else:
            raise ConfigError(f"{path}: {_unknown(key, [*TOP, *TABLES])}")
    return cfg


def _show(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
