"""The settings a node runs with: one validated, typed ``NodeSettings`` built once by
``overlay up`` from its options, config.toml and what the last ``overlay up`` remembered
(prefs.json), and handed to the daemon as it is (``to_json`` / ``from_json``, through the pipe of
overlay/node/run.py).

Precedence, for every setting: an option given > config.toml > the value the last ``overlay up``
was given > the default. ``off`` (or ``""``) turns a text setting off (``--socks off``); the
lists (``--proxy-user``, ``--wg-peer``) add to config.toml's, and ``off`` clears the remembered
ones. config.toml itself is checked by overlay/node/config.py (``Home.config``) before it gets
here, so only what an option or prefs.json can bring in is checked again. A bad setting is a
``SettingsError`` with the one line the CLI prints.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields

from overlay.hostport import parse_hostport
from overlay.node.server_list import parse_servers, server_text

PORT_RANGE = (0, 65535)       # the node's UDP port (0: any free port)
KEEPALIVE_RANGE = (7, 600)    # NAT keepalive interval, seconds
PROXY_SCHEMES = ("http://", "socks5://", "socks4://")   # --via-proxy / via_proxy
DEFAULT_SOCKS = "127.0.0.1:1080"
DEFAULT_UI = "127.0.0.1:0"                   # the local web page (overlay/ui): loopback, any free port
DEFAULT_KEEPALIVE = 25.0
DEFAULT_DNS = "auto"          # userspace: 127.0.0.1:DNS_PORT (else a free port); TUN/TAP: VIRTUAL_IP:53
DNS_PORT = 1053
NO_SERVER = "no server given: use --server HOST:PORT (or `server = \"HOST:PORT\"` in config.toml)"
# several servers of one deployment: --server A:P,B:P, or `server = ["A:P", "B:P"]` (overlay/node/server_list.py)


class SettingsError(ValueError):
    """A setting that cannot run; the message is the one line to show."""


@dataclass(frozen=True)
class StaticPeer:
    """A plain WireGuard peer (``[[peer]]`` of config.toml or ``--wg-peer``)."""
    key_text: str                       # the public key as configured (base64)
    key: bytes
    name: str
    endpoint: tuple[str, int] | None    # resolved and normalized
    allowed_ips: tuple[str, ...]
    persistent_keepalive: float | None = None

    def to_json(self) -> dict:
        return {"key": self.key_text, "name": self.name, "endpoint": self.endpoint,
                "allowed_ips": list(self.allowed_ips), "persistent_keepalive": self.persistent_keepalive}

    @classmethod
    def from_json(cls, d: dict) -> StaticPeer:
        from overlay.control.messages import key_from_text
        return cls(d["key"], key_from_text(d["key"]), d["name"], tuple(d["endpoint"]) if d["endpoint"] else None,
                   tuple(d["allowed_ips"]), d["persistent_keepalive"])


@dataclass(frozen=True)
class ShareSpec:
    port: int
    udp: bool = False


@dataclass(frozen=True)
class ForwardSpec:
    listen: int
    peer: str
    peer_port: int
    udp: bool = False


@dataclass(frozen=True)
class NodeSettings:
    server: str | None                           # one HOST:PORT, or several: "A:P,B:P" (server_list.py)
    name: str
    via_proxy: str | None = None
    port: int = 0
    keepalive: float = DEFAULT_KEEPALIVE
    socks: str | None = DEFAULT_SOCKS            # None: off
    http_proxy: str | None = None                # None: off
    ui: str | None = DEFAULT_UI                  # None: off; a loopback address only
    shares: tuple[ShareSpec, ...] = ()           # config.toml's (runtime ones live in prefs.json)
    forwards: tuple[ForwardSpec, ...] = ()
    address: str | None = None
    static_peers: tuple[StaticPeer, ...] = ()
    proxy_users: Mapping[str, str] | None = None
    interface: str | None = None                 # "tun", "tap" or None (userspace)
    dev: str | None = None
    only_shared: bool = False
    advertise_routes: tuple[str, ...] = ()       # sorted, normalized
    hard_nat: bool = True
    port_mapping: tuple[str, ...] = ()           # protocol names (overlay.nat.portmap)
    dns: str | None = DEFAULT_DNS                # "auto", a loopback HOST:PORT, or None (off)
    dns_config: str = "auto"                     # this machine's resolver (overlay/node/dns_system.py)
    remember_options: Mapping | None = None      # the options to remember (prefs.json) once the node runs

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["shares"] = [asdict(s) for s in self.shares]
        d["forwards"] = [asdict(f) for f in self.forwards]
        d["static_peers"] = [p.to_json() for p in self.static_peers]
        return d

    @classmethod
    def from_json(cls, d: dict) -> NodeSettings:
        d = dict(d)
        d["shares"] = tuple(ShareSpec(**s) for s in d["shares"])
        d["forwards"] = tuple(ForwardSpec(**f) for f in d["forwards"])
        d["static_peers"] = tuple(StaticPeer.from_json(p) for p in d["static_peers"])
        for k in ("advertise_routes", "port_mapping"):
            d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class UpOptions:
    """The options of ``overlay up`` as given (None / [] / False: not given)."""
    server: str | None = None
    name: str | None = None
    via_proxy: str | None = None
    port: int | None = None
    keepalive: float | None = None
    socks: str | None = None
    address: str | None = None
    wg_peer: list[str] = field(default_factory=list)
    http_proxy: str | None = None
    ui: str | None = None
    proxy_user: list[str] = field(default_factory=list)
    tun: bool = False
    tap: bool = False
    userspace: bool = False
    dev: str | None = None
    only_shared: bool | None = None
    advertise_routes: str | None = None
    hard_nat_punch: bool | None = None
    port_mapping: str | None = None
    dns: str | None = None
    dns_config: str | None = None
    reset: bool = False


def server_and_name(server: str | None, name: str | None, cfg: dict, last) -> tuple[str | None, str | None]:
    """The server and node name: given > config.toml > the last ones used (``last``: Prefs) >
    (the name only) the host name. The server may be a list (``A:P,B:P``; config.toml's list is
    joined so)."""
    from overlay.node.prefs import hostname_label
    cfg_server = cfg.get("server")
    if isinstance(cfg_server, list):
        cfg_server = server_text(cfg_server)
    return server or cfg_server or last.server, name or cfg.get("name") or last.name or hostname_label()


def check_server_and_name(server: str | None, name: str) -> str:
    """``name`` normalized; SettingsError for a malformed server address (or list) or name."""
    from overlay.control.messages import RequestError, normalize_name
    try:
        if server:
            parse_servers(server)
        return normalize_name(name, "node name")
    except ValueError as e:
        raise SettingsError(str(e)) from None
    except RequestError as e:
        raise SettingsError(e.message) from None


Note = Callable[[str, bool], None]


def resolve(opts: UpOptions, cfg: dict, last, note: Note = lambda flags, device: None) -> NodeSettings:
    """The settings ``overlay up`` runs with, from its options ``opts``, the validated config.toml
    ``cfg`` and ``last`` (Prefs: what the last ``overlay up`` ran with). ``note(flags, device)``
    hears which remembered options (as flags) are reused, and whether the remembered device is.
    Raises SettingsError with the line to show."""
    from overlay.node.prefs import UP_OPTIONS, off_if_empty, up_options
    server, name = server_and_name(opts.server, opts.name, cfg, last)
    given, reused, remember = up_options({k: getattr(opts, k) for k in UP_OPTIONS}, last.options, opts.reset)
    reused = {k: v for k, v in reused.items() if k not in cfg}  # proxy_user, wg_peer add to config's

    def setting(key: str, default=None):
        value = given[key] if key in given else cfg[key] if key in cfg else reused.get(key, default)
        return off_if_empty(value)

    def on(key: str, default=None):
        """A text setting; None when off."""
        value = setting(key, default)
        return None if value in (None, "off") else value

    proxy_users = dict(cfg.get("proxy_users", {}))
    for pu in given.get("proxy_user", reused.get("proxy_user", [])):
        user, sep, pw = pu.partition(":")
        if not sep or not user or not pw:
            raise SettingsError(f"--proxy-user {pu!r}: expected USER:PASSWORD")
        proxy_users[user] = pw
    socks, http_proxy = on("socks", DEFAULT_SOCKS), on("http_proxy")
    for addr, flag in ((socks, "--socks"), (http_proxy, "--http-proxy")):
        if addr:
            try:
                parse_hostport(addr, allow_zero=True)
            except ValueError as e:
                raise SettingsError(f"{flag}: {e}") from None
    ui = on("ui", DEFAULT_UI)
    if ui:
        try:
            host, _ = parse_hostport(ui, allow_zero=True)
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError(f"{host} is not a loopback address (the page is for this machine's user only)")
        except ValueError as e:
            raise SettingsError(f"--ui: {e}") from None
    port, keepalive = setting("port", 0), setting("keepalive", DEFAULT_KEEPALIVE)
    if not isinstance(port, int) or not PORT_RANGE[0] <= port <= PORT_RANGE[1]:
        raise SettingsError(f"--port {port}: expected {PORT_RANGE[0]}-{PORT_RANGE[1]}")
    if not isinstance(keepalive, (int, float)) or not KEEPALIVE_RANGE[0] <= keepalive <= KEEPALIVE_RANGE[1]:
        raise SettingsError(f"--keepalive {keepalive}: expected {KEEPALIVE_RANGE[0]}-{KEEPALIVE_RANGE[1]} seconds")
    interface, dev, only_shared = _device(opts, cfg, last, reused, note)
    from overlay.nat.portmap import parse_protocols
    try:
        port_mapping = parse_protocols(setting("port_mapping", True))
    except ValueError as e:
        raise SettingsError(f"--port-mapping: {e}") from None
    _check_device(interface, dev, only_shared)
    dns = on("dns", DEFAULT_DNS)
    if dns not in (None, DEFAULT_DNS):
        try:
            dns_address(dns)
        except ValueError as e:
            raise SettingsError(f"--dns: {e}") from None
    from overlay.node.dns_system import MODES
    dns_config = setting("dns_config", "auto")
    if dns_config not in MODES:
        raise SettingsError(f"--dns-config {dns_config!r}: expected {', '.join(MODES)}")
    address = on("address")
    try:
        static_peers = ([static_peer(p) for p in cfg.get("peer", [])]
                        + [static_peer_arg(a) for a in given.get("wg_peer", reused.get("wg_peer", []))])
        if address:
            ipaddress.IPv4Address(address)
    except (ValueError, OSError) as e:
        raise SettingsError(str(e)) from None
    if not server and not static_peers:
        raise SettingsError(NO_SERVER)
    if not server and not address:
        raise SettingsError("without a server, give this node's inner address with --address IP")
    if not name:
        raise SettingsError("no name given: use --name NAME (or `name = \"NAME\"` in config.toml)")
    check_server_and_name(server, name)
    server = server_text(parse_servers(server)) if server else None
    routes = _routes(setting("advertise_routes", []))
    via_proxy = on("via_proxy")
    if via_proxy and not via_proxy.startswith(PROXY_SCHEMES):
        raise SettingsError(f"--via-proxy {via_proxy!r}: expected http://HOST:PORT or socks5://[USER:PASS@]HOST:PORT")
    return NodeSettings(
        server=server, name=name, via_proxy=via_proxy, port=port, keepalive=float(keepalive), socks=socks,
        http_proxy=http_proxy, ui=ui,
        shares=tuple(ShareSpec(int(s["port"]), s.get("proto", "tcp") == "udp") for s in cfg.get("share", [])),
        forwards=tuple(ForwardSpec(int(f["listen"]), f["peer"], int(f.get("peer_port", f["listen"])),
                                   bool(f.get("udp", False))) for f in cfg.get("forward", [])),
        address=address, static_peers=tuple(static_peers), proxy_users=proxy_users or None,
        interface=interface, dev=dev, only_shared=only_shared, advertise_routes=routes,
        hard_nat=bool(setting("hard_nat_punch", True)), port_mapping=tuple(port_mapping), dns=dns,
        dns_config=dns_config,
        remember_options=remember)


def dns_address(text: str) -> tuple[str, int]:
    """--dns HOST:PORT: a loopback address only (the node's DNS is never reachable from a LAN)."""
    host, port = parse_hostport(text, allow_zero=True)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ValueError(f"{text!r}: expected 'auto', 'off' or a loopback IP:PORT such as 127.0.0.1:1053") from None
    if not loopback:
        raise ValueError(f"{text!r}: only a loopback address (127.0.0.1:PORT; with --tun/--tap 'auto' answers on "
                         "the virtual IP, port 53)")
    return host, port


def _device(opts: UpOptions, cfg: dict, last, reused: dict, note: Note):
    """(interface or None, dev, only_shared): --tun / --tap / --userspace > config.toml > the device
    of the last run (noted, with the reused options)."""
    from overlay.node.prefs import option_flags
    if opts.tun + opts.tap + opts.userspace > 1:
        raise SettingsError("--tun, --tap and --userspace exclude each other: choose one")
    remembered = (last.interface if not (opts.tun or opts.tap or opts.userspace or opts.reset)
                  and "interface" not in cfg else None)
    interface = ("tun" if opts.tun else "tap" if opts.tap else "none" if opts.userspace else
                 remembered["kind"] if remembered else cfg.get("interface", "none"))
    interface = None if interface == "none" else interface
    dev = opts.dev or cfg.get("dev") or (remembered["dev"] if remembered else None)
    only_shared = (opts.only_shared if opts.only_shared is not None else
                   cfg["only_shared"] if "only_shared" in cfg else bool(remembered and remembered["only_shared"]))
    if remembered or reused:
        device = (f"--{interface}{' --dev ' + dev if dev else ''}{' --only-shared' if only_shared else ''}"
                  if remembered else "")
        note(" ".join(x for x in (device, option_flags(reused)) if x), bool(remembered))
    return interface, dev, only_shared


def _check_device(interface: str | None, dev: str | None, only_shared: bool) -> None:
    if (dev is not None or only_shared) and interface is None:
        raise SettingsError(f"{'--dev' if dev is not None else '--only-shared'} needs --tun or --tap")
    if dev is not None:
        from overlay.iface.tuntap import DeviceError, valid_name
        try:
            valid_name(dev)
        except DeviceError as e:
            raise SettingsError(f"--dev: {e}") from None
    if interface and not sys.platform.startswith("linux"):
        raise SettingsError(f"--{interface} needs Linux; elsewhere use the SOCKS5 / HTTP proxy and forwards")


def _routes(routes) -> tuple[str, ...]:
    """--advertise-routes "A,B" (or "off"), or config.toml's list: sorted, normalized, at most MAX_ROUTES."""
    from overlay.control.messages import MAX_ROUTES, parse_route
    routes = [] if routes == "off" else [r.strip() for r in routes.split(",") if r.strip()] \
        if isinstance(routes, str) else routes
    try:
        routes = sorted({str(parse_route(r)) for r in routes})
    except ValueError as e:
        raise SettingsError(f"--advertise-routes: {e}") from None
    if len(routes) > MAX_ROUTES:
        raise SettingsError(f"--advertise-routes: at most {MAX_ROUTES} subnets")
    return tuple(routes)


def static_peer(p: dict) -> StaticPeer:
    """A [[peer]] table of config.toml (validated): public_key, endpoint, allowed_ips, name,
    persistent_keepalive. ValueError / OSError (name resolution) for what only now shows."""
    from overlay.control.messages import key_from_text
    from overlay.nat.candidate import normalize
    key = key_from_text(p["public_key"])
    endpoint = parse_hostport(p["endpoint"]) if p.get("endpoint") else None
    if endpoint:   # an IPv6 endpoint ([2001:db8::1]:51820) goes through the node's IPv6 socket
        infos = socket.getaddrinfo(endpoint[0], endpoint[1], socket.AF_UNSPEC, socket.SOCK_DGRAM)
        v4 = [i for i in infos if i[0] == socket.AF_INET]
        endpoint = normalize((str((v4 or infos)[0][4][0]), endpoint[1]))
    allowed = p["allowed_ips"] if isinstance(p["allowed_ips"], list) else [p["allowed_ips"]]
    for a in allowed:
        ipaddress.IPv4Network(a, strict=False)
    ka = p.get("persistent_keepalive")
    return StaticPeer(p["public_key"], key, p.get("name") or f"wg-{p['public_key'][:6]}", endpoint, tuple(allowed),
                      float(ka) if ka else None)


def static_peer_arg(text: str) -> StaticPeer:
    """--wg-peer PUBLIC_KEY,HOST:PORT,ALLOWED_IP/PREFIX[,...]"""
    parts = [x.strip() for x in text.split(",")]
    if len(parts) < 3:
        raise ValueError(f"--wg-peer {text!r}: expected PUBLIC_KEY,HOST:PORT,ALLOWED_IP/PREFIX[,...]")
    try:
        return static_peer({"public_key": parts[0], "endpoint": parts[1] or None, "allowed_ips": parts[2:]})
    except (ValueError, OSError) as e:
        raise ValueError(f"--wg-peer {text!r}: {e}") from None
