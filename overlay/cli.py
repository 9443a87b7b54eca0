"""The ``overlay`` command (typer + rich).

Every command takes ``--home DIR`` (or ``OVERLAY_HOME``). Commands other than ``server``, ``up``
and ``service`` talk to the running daemon over its local API socket. User mistakes end with one
red line and exit status 1, never a traceback; ``--json`` output follows the schema in
docs/json.md. Modules only some commands need (asyncio, the daemon, the server, crypto) are
imported inside those commands, so the everyday ones (status, share, ...) start fast.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, NoReturn, Optional

import typer

from overlay.cli_base import _up_command, daemon_call, err, fail, lit, out, print_json, show_status, visible
from overlay.cli_options import HELP_OPTIONS, HomeOpt, JsonOpt, LogLevelOpt, NetworkArg, UdpOpt
from overlay.cli_service import service_app
from overlay.node import api
from overlay.node.home import Home, HomeError

if TYPE_CHECKING:
    from overlay.node.settings import NodeSettings

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, context_settings=HELP_OPTIONS,
                  help="overlay: a zero-configuration peer-to-peer VPN.")
admin_app = typer.Typer(no_args_is_help=True, context_settings=HELP_OPTIONS, help="Owner commands for a network.")
app.add_typer(admin_app, name="admin")
app.add_typer(service_app, name="service")


def _version(value: bool) -> None:
    if value:
        from overlay import __version__
        print(f"overlay {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """overlay: a zero-configuration peer-to-peer VPN."""



def _password(password: Optional[str], prompt: str = "Network password", confirm: bool = False) -> str:
    """--password, else prompted at a terminal, else the first line of standard input (piped, so
    no getpass warning about echo: nothing is shown anyway)."""
    if password is not None:
        return password
    if sys.stdin is not None and sys.stdin.isatty():
        return typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    line = sys.stdin.readline() if sys.stdin is not None else ""
    if not line.strip("\r\n"):
        fail("no password: give --password, or type it at a terminal, or pipe it in on one line")
    return line.rstrip("\r\n")


# ---------------------------------------------------------------------------- server and node
@app.command()
def server(listen: Optional[List[str]] = typer.Option(
               None, "--listen", help="HOST:PORT for TCP control and UDP (default 0.0.0.0:7777). Repeat it "
                                      "for more addresses on the same port, e.g. --listen 0.0.0.0:7777 "
                                      "--listen [2001:db8::1]:7777 for IPv6 too (IPv6 sockets are IPv6 only)."),
           data: Path = typer.Option(..., "--data", help="Directory for the server key and database."),
           pool: str = typer.Option("100.64.0.0/10", "--pool", help="Virtual IPv4 pool (CIDR)."),
           relay_rate: int = typer.Option(2048, "--relay-rate", help="Relay bandwidth cap per node, KiB/s."),
           stun_alt_ip: Optional[str] = typer.Option(None, "--stun-alt-ip",
                                                     help="A second public IP of this server that answers STUN "
                                                          "on the same port (finer NAT classification)."),
           max_connections: int = typer.Option(10_000, "--max-connections",
                                               help="Control connections at most (also kept below the "
                                                    "descriptor limit)."),
           max_per_address: int = typer.Option(64, "--max-per-address",
                                               help="Control connections at most from one IP address."),
           identity_work: int = typer.Option(4, "--identity-work", min=0, max=20,
                                             help="Proof of work a new node does on its key, in bits "
                                                  "(each bit doubles it; 0: none)."),
           new_nodes_per_hour: int = typer.Option(256, "--new-nodes-per-hour", min=1,
                                                  help="New nodes stored per IP address (IPv6: /64) and hour."),
           turn: Optional[str] = typer.Option(None, "--turn", help="A TURN server (e.g. coturn) nodes relay "
                                              "through when they cannot punch: turn:HOST:PORT (UDP)."),
           turn_secret: Optional[str] = typer.Option(None, "--turn-secret", envvar="OVERLAY_TURN_SECRET",
                                                     help="The TURN server's static-auth-secret (coturn "
                                                          "use-auth-secret): nodes get time-limited credentials."),
           turn_ttl: int = typer.Option(86400, "--turn-ttl", help="Lifetime of those credentials, seconds."),
           database: Optional[str] = typer.Option(
               None, "--database", help="postgresql://USER@HOST:PORT/DB: keep networks, members and chat in "
                                        "PostgreSQL (needs overlay[postgres]; several servers may share it). "
                                        "Default: SQLite in --data."),
           relay_address: Optional[str] = typer.Option(
               None, "--relay-address", help="IP:PORT at which nodes reach this server's UDP port (relay), "
                                             "announced to the other servers on the same --database: a pair "
                                             "of nodes on two servers relays through one of them. Default: "
                                             "the address each node's control connection reached."),
           migrate_from: Optional[str] = typer.Option(
               None, "--migrate-from", help="sqlite:PATH: copy that SQLite database (a server's overlay.db) into "
                                            "the empty --database, say what moved, and exit."),
           log_level: str = LogLevelOpt):
    """Run a mediation server in the foreground."""
    import asyncio

    from overlay.hostport import parse_hostport
    from overlay.server.app import run_server
    listen = listen or ["0.0.0.0:7777"]
    try:
        addrs = [parse_hostport(text) for text in listen]
        ipaddress.IPv4Network(pool)
    except ValueError as e:
        fail(str(e))
    hosts, port = [h for h, _ in addrs], addrs[0][1]
    if any(p != port for _, p in addrs) or len(set(hosts)) != len(hosts):
        fail("every --listen address takes the same port, each address once")
    if max_connections < 1 or max_per_address < 1:
        fail("--max-connections and --max-per-address must be at least 1")
    if relay_address is not None:
        from overlay.nat.candidate import format_addr, parse_addr
        try:
            relay_address = format_addr(parse_addr(relay_address))
        except ValueError:
            fail("--relay-address takes IP:PORT (an IPv6 address in brackets), as nodes reach this server")
    turn_settings = None
    if turn or turn_secret:
        from overlay.server.turn_credentials import TurnSettings
        if not (turn and turn_secret):
            fail("--turn and --turn-secret go together (the secret is coturn's static-auth-secret)")
        try:
            turn_settings = TurnSettings(turn, turn_secret, turn_ttl)
        except ValueError as e:
            fail(str(e))
    try:
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(data, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        fail(f"cannot use data directory {data}: {e.strerror or e}")
    if database is not None:
        from overlay.server.store_pg import is_postgres_url
        if database.startswith("sqlite:") and migrate_from is None:
            if Path(database[len("sqlite:"):]).resolve() != (data / "overlay.db").resolve():
                fail("an SQLite database lives in --data (overlay.db); give --data instead")
            database = None
        elif not is_postgres_url(database):
            fail("--database takes postgresql://USER@HOST:PORT/DB")
        else:
            try:
                import asyncpg  # noqa: F401
            except ImportError:
                fail("PostgreSQL needs asyncpg: pip install 'overlay[postgres]'")
    _logging(log_level)
    if migrate_from is not None:
        import sqlite3

        from overlay.server import migrate
        if database is None:
            fail("--migrate-from needs --database postgresql://...")
        try:
            moved = asyncio.run(migrate.migrate(migrate_from, database))
        except (OSError, sqlite3.Error, migrate.TargetNotEmpty) as e:
            fail(f"cannot migrate: {e}")
        except Exception as e:       # the driver's errors: authentication, an unknown database ...
            fail(f"cannot migrate: {type(e).__name__}: {e}")
        print(migrate.summary(moved), flush=True)
        return
    try:
        asyncio.run(run_server(data, hosts, port, pool, relay_rate * 1024, stun_alt_ip, max_connections,
                               max_per_address, identity_work, new_nodes_per_hour, turn_settings, database,
                               relay_address))
    except OSError as e:
        fail(f"cannot listen on {', '.join(listen)}: {e.strerror or e}")
    except KeyboardInterrupt:
        pass


@app.command()
def up(server: Optional[str] = typer.Option(None, "--server", help="Mediation server HOST:PORT, or several "
                                                                  "of one deployment, HOST:PORT,HOST:PORT, tried in "
                                                                  "turn (default: config.toml, else the last used)."),
       name: Optional[str] = typer.Option(None, "--name", help="This node's name, a DNS label (default: "
                                                              "config.toml, else the last one used, else the "
                                                              "host name)."),
       via_proxy: Optional[str] = typer.Option(None, "--via-proxy",
                                               help="Reach the server through http://… or socks5://… proxy."),
       port: Optional[int] = typer.Option(None, "--port", help="Fixed UDP port (the 'magic' port to forward on "
                                                                 "your router); default: any free port."),
       keepalive: Optional[float] = typer.Option(None, "--keepalive", help="NAT keepalive interval, seconds (25)."),
       socks: Optional[str] = typer.Option(None, "--socks", help="SOCKS5 proxy address (127.0.0.1:1080), or 'off'"
                                                                 " (or \"\")."),
       address: Optional[str] = typer.Option(None, "--address",
                                             help="This node's inner IPv4 (default: assigned by the server)."),
       wg_peer: list[str] = typer.Option([], "--wg-peer", help="Static WireGuard peer: "
                                         "PUBLIC_KEY,ENDPOINT_HOST:PORT,ALLOWED_IP/PREFIX[,...] (repeatable)."),
       http_proxy: Optional[str] = typer.Option(None, "--http-proxy", help="HTTP proxy address (off by default; "
                                                                           "'off' or \"\" turns a remembered one off)."),
       ui: Optional[str] = typer.Option(None, "--ui", help="Address of the local web page (`overlay ui`): "
                                                         "127.0.0.1:0 (any free port; the default), another "
                                                         "loopback HOST:PORT, or 'off'."),
       proxy_user: list[str] = typer.Option([], "--proxy-user", help="USER:PASSWORD required by the SOCKS5 and "
                                            "HTTP proxies (repeatable); needed to listen beyond loopback."),
       tun: bool = typer.Option(False, "--tun", help="Attach a TUN device (full IP: the kernel reaches peers "
                                                      "by virtual IP). Needs root or a device from "
                                                      "`overlay setup-interface`."),
       tap: bool = typer.Option(False, "--tap", help="Attach a TAP device (Ethernet: broadcast, multicast, "
                                                      "IPX; LAN games)."),
       userspace: bool = typer.Option(False, "--userspace", help="No TUN/TAP device (the default), even if the "
                                                                 "last `overlay up` had --tun or --tap."),
       dev: Optional[str] = typer.Option(None, "--dev", help="Name of the TUN/TAP device (ovl0)."),
       only_shared: Optional[bool] = typer.Option(None, "--only-shared/--all-inbound",
                                                  help="TUN/TAP: let peers reach only shared ports (plus replies "
                                                       "and ping); default: everything, like a LAN."),
       advertise_routes: Optional[str] = typer.Option(None, "--advertise-routes",
                                                      help="Offer these subnets of this machine's LAN to your "
                                                           "networks as a gateway, comma-separated "
                                                           "(192.168.1.0/24), or 'off' (or \"\"); each network's "
                                                           "owner approves them. "
                                                           "With --tun/--tap the kernel forwards to them (root, "
                                                           "nftables)."),
       hard_nat: Optional[bool] = typer.Option(None, "--hard-nat-punch/--no-hard-nat-punch",
                                               help="Birthday punching toward peers behind random-port "
                                                    "symmetric NATs (up to 256 extra sockets or 1024 probes "
                                                    "per attempt, with back-off), and predicted-window punching "
                                                    "when both sides are behind sequential symmetric NATs "
                                                    "(16 probes per attempt); default: on."),
       port_mapping: Optional[str] = typer.Option(None, "--port-mapping",
                                                  help="Ask the router to map this node's UDP port: 'all' "
                                                       "(PCP, NAT-PMP, UPnP IGD; the default), 'off', or a "
                                                       "comma-separated choice such as 'pcp,nat-pmp'."),
       dns: Optional[str] = typer.Option(None, "--dns", help="Answer DNS for peers (NAME.NET) on this loopback "
                                                             "IP:PORT; 'auto' (127.0.0.1:1053, with --tun/--tap "
                                                             "VIRTUAL_IP:53) or 'off'."),
       dns_config: Optional[str] = typer.Option(None, "--dns-config",
                                                help="With --tun/--tap, tell this machine's resolver: 'auto' "
                                                     "(systemd-resolved per link when it runs, else nothing), "
                                                     "'resolv-conf' (else put the node first in /etc/resolv.conf, "
                                                     "restored when it stops) or 'off'."),
       reset: bool = typer.Option(False, "--reset", help="Forget the options and device remembered from the last "
                                                          "`overlay up` (server, name, shares and forwards stay)."),
       home: Optional[Path] = HomeOpt,
       log_level: str = LogLevelOpt):
    """Start the node daemon in the foreground. Without options it runs as the last `overlay up` did
    (prefs.json): an option given replaces the remembered value, --reset forgets them all."""
    from overlay.node.prefs import Prefs
    from overlay.node.settings import SettingsError, UpOptions, resolve
    h = Home(home)
    try:
        cfg = h.config()
        last = Prefs(h.path)  # what the last `overlay up` ran with
    except HomeError as e:
        fail(str(e))

    def note(flags: str, device: bool) -> None:
        err.print(f"note: {lit(flags)} as last time (an option given replaces it"
                  f"{'; `overlay up --userspace` for no device' if device else ''}"
                  "; `overlay up --reset` for the defaults)", highlight=False, soft_wrap=True)

    opts = UpOptions(server=server, name=name, via_proxy=via_proxy, port=port, keepalive=keepalive, socks=socks,
                     address=address, wg_peer=wg_peer, http_proxy=http_proxy, ui=ui, proxy_user=proxy_user, tun=tun,
                     tap=tap, userspace=userspace, dev=dev, only_shared=only_shared,
                     advertise_routes=advertise_routes, hard_nat_punch=hard_nat, port_mapping=port_mapping,
                     dns=dns, dns_config=dns_config, reset=reset)
    try:
        settings = resolve(opts, cfg, last, note)
    except SettingsError as e:
        fail(str(e))
    _exec_daemon(h, log_level, settings)


def _exec_daemon(h: Home, log_level: str, settings: NodeSettings) -> NoReturn:
    """Become the daemon (overlay/node/run.py, same PID) without the CLI's libraries in memory;
    the settings go through an inherited pipe (NodeSettings.to_json, read back by from_json)."""
    data = json.dumps({"settings": settings.to_json(), "home": str(h.path), "log_level": log_level}).encode()
    r, w = os.pipe()
    if len(data) > 60000:  # a pipe holds 64 KiB without a reader
        fail("too many settings for `overlay up` (more than 60 KB)")
    os.write(w, data)
    os.close(w)
    os.set_inheritable(r, True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "overlay.node.run", str(r), "--home", str(h.path)])


@app.command("setup-interface")
def setup_interface(user: str = typer.Option(..., "--user", help="The user who will run `overlay up` unprivileged."),
                    tun: bool = typer.Option(False, "--tun", help="Make a TUN device."),
                    tap: bool = typer.Option(False, "--tap", help="Make a TAP device."),
                    dev: str = typer.Option("ovl0", "--dev", help="Device name."),
                    address: Optional[str] = typer.Option(None, "--address",
                                                          help="The node's VIRTUAL_IP/PREFIX, as the error of "
                                                               "`overlay up` names it."),
                    mac: Optional[str] = typer.Option(None, "--mac", help="TAP: the node's MAC, as the error of "
                                                                       "`overlay up` names it."),
                    remove: bool = typer.Option(False, "--remove", help="Delete the device instead.")):
    """Run once as root: a persistent TUN/TAP device that USER's node may use without admin rights."""
    import pwd

    from overlay.iface.tuntap import DeviceError, make_persistent, remove_persistent, valid_name
    if tun == tap:
        fail("give exactly one of --tun and --tap")
    kind = "tun" if tun else "tap"
    try:
        valid_name(dev)
        pw = pwd.getpwnam(user)
    except DeviceError as e:
        fail(str(e))
    except KeyError:
        fail(f"no user named {user!r}")
    net = None
    if address:
        try:
            net = ipaddress.IPv4Interface(address)
        except ValueError as e:
            fail(f"--address {address!r}: {e}")
    try:
        if remove:
            remove_persistent(dev, kind)
            out.print(f"removed {kind.upper()} device {dev}")
            return
        make_persistent(dev, kind, pw.pw_uid, pw.pw_gid)
        from overlay.iface.netconfig import NetConfig
        from overlay.node.dataplane import INNER_MTU
        nc = NetConfig(dev, kind, broadcast_route=True)
        try:
            nc.prepare(INNER_MTU)
            if net is not None:
                nc.apply(str(net.ip), net.network.prefixlen, INNER_MTU, mac if kind == "tap" else None)
        finally:
            nc.close()   # keep what was added: the device is persistent
    except DeviceError as e:
        fail(str(e))
    out.print(f"{kind.upper()} device {dev} is ready for {user}"
              + (f" with {address}" if address else "")
              + f": run `overlay up --{kind} --dev {dev} ...` as {user}")


@app.command()
def down(home: Optional[Path] = HomeOpt):
    """Stop the running daemon."""
    daemon_call(home, "down")
    out.print("overlay stopped")


def _logging(level: str) -> None:
    from overlay.escape import log_to_stderr
    log_to_stderr(level)


@app.command()
def ui(no_open: bool = typer.Option(False, "--no-open", help="Only print the page's address."),
       home: Optional[Path] = HomeOpt):
    """Open this node's web page (networks, members, chat) in the browser; prints its address,
    which holds the secret that lets only you in."""
    from overlay.ui.guard import read_secret
    address = daemon_call(home, "status").get("ui")
    if not address:
        fail("the web page is off: start the node with `overlay up --ui 127.0.0.1:0` (or `ui` in config.toml)")
    secret = read_secret(Home(home).path)
    if secret is None:
        fail(f"cannot read the web page's secret in {Home(home).path}: run `overlay ui` as the user who runs the node")
    url = f"http://{address}/?s={secret}"
    print(url)
    if not no_open and (sys.platform != "linux" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        import webbrowser
        if not webbrowser.open(url):
            err.print("no browser found: open the address above", highlight=False)


# ---------------------------------------------------------------------------- status
@app.command()
def status(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """This node, its server connection, networks and peers."""
    show_status(home, as_json)


@app.command()
def ping(peer: str = typer.Argument(..., help="Peer name, name.network, virtual IP, or the address of a LAN "
                                                "host behind a gateway member (approved route)."),
         count: int = typer.Option(10, "-c", "--count", help="Probes at most (stops early once direct)."),
         until_direct: bool = typer.Option(True, "--until-direct/--no-until-direct",
                                           help="Stop at the first answer over a direct path."),
         home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """Ping a peer (or a LAN host through its gateway) through the tunnel: one line per probe with its
    path and round-trip time."""
    import time
    direct = False
    answered = 0
    for i in range(max(1, count)):
        t0 = time.monotonic()
        r = daemon_call(home, "ping_peer", as_json, peer=peer, wait=2.0)
        r.pop("ok", None)
        path = r.get("path") or "no path"
        if r["rtt_ms"] is not None:
            answered += 1
            direct = direct or path.startswith("direct")
        if as_json:
            print(json.dumps(r), flush=True)
        else:
            who = (f"{lit(r['ip'])} (through gateway {lit(r['peer'])})" if r.get("gateway")
                   else f"{lit(r['peer'])} ({lit(r['ip'])})")
            if r["rtt_ms"] is None:
                out.print(f"timeout waiting for {who} via {lit(path)}", highlight=False)
            else:
                out.print(f"pong from {who} via {lit(path)} in {r['rtt_ms']:.1f} ms", highlight=False)
        if direct and until_direct:
            break
        time.sleep(max(0.0, 0.5 - (time.monotonic() - t0)))
    if not as_json:
        if direct:
            out.print("direct path established")
        elif answered:
            out.print("no direct path yet: traffic goes through the relay")
        else:
            out.print(f"{lit(peer)} did not answer")
    raise typer.Exit(0 if answered else 1)


@app.command()
def offline(network: str = NetworkArg, home: Optional[Path] = HomeOpt):
    """Go offline in a network without leaving it (remembered until `overlay online`)."""
    r = daemon_call(home, "presence", network=network, online=False)
    out.print(f"offline in {r['network']}: its members see you offline and cannot reach you through it",
              highlight=False)


@app.command()
def online(network: str = NetworkArg, home: Optional[Path] = HomeOpt):
    """Come back online in a network after `overlay offline`."""
    r = daemon_call(home, "presence", network=network, online=True)
    out.print(f"online in {r['network']}", highlight=False)


@app.command()
def rename(name: str = typer.Argument(..., help="The new name (a DNS label)."), home: Optional[Path] = HomeOpt):
    """Rename this node in every network (refused if a member of one of them has the name)."""
    r = daemon_call(home, "rename", name=name)
    out.print(f"this node is now {r['name']}", highlight=False)


@app.command()
def ip(peer: Optional[str] = typer.Argument(None, help="Peer name, name.network or virtual IP (default: "
                                                         "this node)."),
       home: Optional[Path] = HomeOpt):
    """Print a virtual IPv4 address, this node's or a peer's (for scripts)."""
    st = daemon_call(home, "status")
    if peer is None:
        if not st["node"]["virtual_ip"]:
            fail("this node has no virtual IP yet: it is not connected to its server (overlay status)")
        print(st["node"]["virtual_ip"])
        return
    t = peer.strip().lower().rstrip(".")
    if t in (st["node"]["name"], st["node"]["virtual_ip"]) and st["node"]["virtual_ip"]:
        print(st["node"]["virtual_ip"])
        return
    for p in st["peers"]:
        if t in (p["name"], p["ip"]) or any(t == f"{p['name']}.{n}" for n in p.get("networks", [])):
            print(p["ip"])
            return
    # the daemon says why (no such peer, or one a hub-and-spoke / gateway network keeps out of reach)
    print(daemon_call(home, "peer", peer=peer)["peer"]["ip"])


@app.command()
def whois(address: str = typer.Argument(..., help="A loopback address a shared service saw (127.B.C.D), a "
                                                  "virtual IP or a peer name."),
          home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """Which peer an address stands for: a shared service sees each peer as its own 127.B.C.D."""
    r = daemon_call(home, "whois", as_json, address=address)
    r.pop("ok", None)
    if as_json:
        print(json.dumps(r))
        return
    out.print(f"{lit(r['query'])} is {lit(r['name'])}" + ("" if r["online"] else " (offline)"), highlight=False)
    out.print(f"  virtual IP  {lit(r['virtual_ip'])}", highlight=False)
    if r["loopback"]:
        out.print(f"  loopback    {lit(r['loopback'])} (what your shared services see)", highlight=False)
    out.print(f"  networks    {lit(', '.join(r['networks']) or '-')}", highlight=False)
    out.print(f"  key         {lit(r['key'])}", highlight=False)


def port_mapping_lines(pm: dict | None) -> list[str]:
    """netcheck's lines about the router's port mapping protocols (``port_mapping`` of the API)."""
    if pm is None:
        return ["port mapping:             not tried (off, no default gateway, or server on loopback)"]
    lines = []
    for key, label in (("pcp", "PCP"), ("nat_pmp", "NAT-PMP"), ("upnp", "UPnP IGD")):
        p = pm.get(key)
        if p is None:
            state = "not tried"
        elif p["answered"] is None:
            state = "asking"
        elif p["mapped"]:
            state = f"answered yes, mapped {p['mapped']}"
        elif p["answered"] is False:
            state = f"answered no ({p['error']})" if p.get("error") else "answered no"
        elif p.get("error"):
            state = f"answered yes, error: {p['error']}"
        else:
            state = "answered yes" + (f" (external address {p['external_ip']})" if p.get("external_ip") else "") + \
                ", not used"
        lines.append(f"{'port mapping (' + label + '):':<26}{lit(state)}")
    if pm.get("mapped"):
        use = "advertised" if pm.get("usable") else "not advertised"
        lines.append(f"{'port mapping in use:':<26}{lit(pm['mapped'])} ({lit(pm['protocol'])}, {use})")
    if pm.get("note"):
        lines.append(f"{'':<26}{lit(pm['note'])}")
    return lines


@app.command()
def netcheck(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """UDP reachability, public address, NAT mapping behaviour and RTT to the server."""
    r = daemon_call(home, "netcheck", as_json)
    r.pop("ok", None)
    if as_json:
        print_json(r)
        return
    n = r["nat"]
    yes = lambda b: "yes" if b else ("no" if b is not None else "unknown")  # noqa: E731
    out.print(f"UDP to the server:        {yes(n.get('udp'))}  (relay over UDP: {yes(r['udp'])})")
    out.print(f"public address:           {lit(n.get('public') or '-')}  (local UDP port {lit(r['local_port'])})")
    out.print(f"behind NAT:               {yes(n.get('behind_nat'))}")
    out.print(f"mapping varies by dest.:  {yes(n.get('varies_by_destination'))}  ({lit(n.get('mapping'))})")
    seq = n.get("sequential")
    out.print(f"ports look sequential:    {yes(seq)}" + (f"  (step {lit(n['port_delta'])})" if seq else ""))
    rtt = n.get("server_rtt_ms")
    out.print(f"RTT to the server:        {f'{rtt:.1f} ms' if rtt is not None else '-'}")
    for line in port_mapping_lines(r.get("port_mapping")):
        out.print(line, highlight=False, soft_wrap=True)
    if (t := r.get("turn")) is not None:    # the TURN server the mediation server names
        state = t["state"] + (f", relayed address {t['relayed']}" if t.get("relayed") else "") + \
            (f", last error: {t['error']}" if t.get("error") else "")
        out.print(f"{'TURN server:':<26}{lit(t['server'])} ({lit(state)})", highlight=False, soft_wrap=True)
    v6 = r.get("ipv6") or {}
    if v6.get("port") is None or not v6.get("addresses"):
        out.print("IPv6:                     none (no global IPv6 address)")
    else:
        out.print(f"IPv6:                     {lit(', '.join(v6['addresses']))}  (UDP port {lit(v6['port'])})")
        out.print("IPv6 to the server:       " + (f"{lit(v6['public'])} seen by {lit(v6['server'])}" if v6.get("public")
                  else f"no answer from {lit(v6['server'])}" if v6.get("server") else "the server has no IPv6 address"))
    out.print("candidates:               " + ", ".join(f"{lit(c['addr'])} ({lit(c['kind'])})" for c in r["candidates"]),
              highlight=False)


# ---------------------------------------------------------------------------- sharing and forwards
def _port_proto(text: str, udp: bool = False) -> tuple[int, bool]:
    port, slash, proto = text.partition("/")
    if slash and proto.lower() not in ("tcp", "udp"):
        fail(f"{text!r}: expected PORT or PORT/udp")
    if not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"{text!r}: port must be 1-65535")
    return int(port), udp or proto.lower() == "udp"


@app.command()
def share(port: str = typer.Argument(..., help="PORT or PORT/udp on this machine (127.0.0.1)."),
          udp: bool = UdpOpt, home: Optional[Path] = HomeOpt):
    """Let peers connect to a local port through the overlay."""
    p, u = _port_proto(port, udp)
    r = daemon_call(home, "share", port=p, udp=u)
    out.print(f"sharing {'udp' if u else 'tcp'} port {p} with your peers")
    if r.get("warning"):
        err.print(f"[yellow]warning:[/] {r['warning']}", highlight=False, soft_wrap=True)


@app.command()
def unshare(port: str = typer.Argument(..., help="PORT or PORT/udp."),
            udp: bool = UdpOpt, home: Optional[Path] = HomeOpt):
    """Stop sharing a port."""
    p, u = _port_proto(port, udp)
    daemon_call(home, "unshare", port=p, udp=u)
    out.print(f"stopped sharing {'udp' if u else 'tcp'} port {p}")


@app.command()
def forward(local: str = typer.Argument(..., help="Local port on 127.0.0.1 (PORT or PORT/udp)."),
            target: str = typer.Argument(..., help="PEER or PEER:PORT (default: the same port)."),
            udp: bool = UdpOpt, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """Forward 127.0.0.1:LOCAL to a peer's port: overlay forward 3389 peer-name."""
    from overlay.proxy.forward import parse_spec
    p, u = _port_proto(local, udp)
    try:
        spec = parse_spec(f"{p}{'/udp' if u else ''} {target}")
    except ValueError as e:
        fail(str(e))
    r = daemon_call(home, "forward", as_json, listen=spec.listen_port, peer=spec.peer, peer_port=spec.peer_port,
                    udp=spec.udp)
    r.pop("ok", None)
    print_json(r) if as_json else out.print(
        f"forwarding {lit(r['proto'])} {lit(r['listen'])} -> {lit(r['peer'])}:{lit(r['peer_port'])}", highlight=False)
    if r.get("warning") and not as_json:
        err.print(f"[yellow]warning:[/] {lit(r['warning'])}", highlight=False, soft_wrap=True)


@app.command()
def unforward(local: str = typer.Argument(..., help="PORT or PORT/udp."),
              udp: bool = UdpOpt, home: Optional[Path] = HomeOpt):
    """Remove a port forward."""
    p, u = _port_proto(local, udp)
    daemon_call(home, "unforward", listen=p, udp=u)
    out.print(f"removed forward of {'udp' if u else 'tcp'} port {p}")


# ---------------------------------------------------------------------------- networks
@app.command()
def create(network: str = NetworkArg,
           password: Optional[str] = typer.Option(None, "--password", help="Network password (prompted if absent)."),
           approval: bool = typer.Option(False, "--approval", help="New members need the owner's approval."),
           max_members: int = typer.Option(0, "--max-members", help="Member limit (0: none)."),
           home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """Create a network; you become its owner."""
    r = daemon_call(home, "create", as_json, network=network, password=_password(password),
                    approval=approval, max_members=max_members)
    print_json(r) if as_json else out.print(f"created network [bold]{lit(r['network'])}[/]")


@app.command()
def join(network: str = NetworkArg,
         password: Optional[str] = typer.Option(None, "--password", help="Network password (prompted if absent)."),
         home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """Join a network."""
    r = daemon_call(home, "join", as_json, network=network, password=_password(password))
    if as_json:
        print_json(r)
    elif r.get("status") == "pending":
        out.print(f"asked to join [bold]{lit(r['network'])}[/]; waiting for the owner's approval")
    else:
        out.print(f"joined network [bold]{lit(r['network'])}[/]")


@app.command()
def leave(network: str = NetworkArg, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """Leave a network."""
    r = daemon_call(home, "leave", as_json, network=network)
    print_json(r) if as_json else out.print(
        f"left network [bold]{lit(r['network'])}[/]" + (" (it had no other members and was deleted)" if r.get("deleted") else ""))


@app.command()
def chat(network: str = NetworkArg, text: Optional[str] = typer.Argument(None, help="Message to send."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Print messages live."),
         history: bool = typer.Option(False, "--history", help="Show the last messages kept by the server."),
         home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """Send a chat message to a network, or read its chat."""
    if text is None and not (follow or history):
        fail("give a message to send, or --history / --follow to read")
    if text is not None:
        r = daemon_call(home, "chat", as_json, network=network, text=text)
        if as_json:
            print_json(r)
        else:
            out.print(f"sent to {network.lower()}", highlight=False)
    if history:
        r = daemon_call(home, "history", as_json, network=network)
        for m in r["messages"]:
            _print_chat(m, as_json)
    if follow:
        h = Home(home)
        try:
            for ev in api.stream(h.socket_path, "follow", network=network.lower()):
                if ev.get("t") == "following":
                    err.print(f"following chat of {lit(network.lower())} (Ctrl-C to stop)")
                elif ev.get("t") == "chat":
                    _print_chat(ev, as_json)
                elif ev.get("t") == "removed":
                    fail(f"removed from {ev['network']} ({ev.get('reason')})", "removed", as_json)
                elif ev.get("t") == "stopping":
                    fail(f"overlay stopped for {h.path}: no more chat to follow (start it with "
                         f"`{_up_command(h, home)}`)", "stopped", as_json)
            fail(f"lost the daemon for {h.path} (it was killed?): no more chat to follow", "stopped", as_json)
        except api.DaemonNotRunning:
            fail(f"overlay is not running for {h.path}", "not_running", as_json)
        except api.ApiError as e:
            fail(e.message, e.code, as_json)
        except KeyboardInterrupt:
            pass


def _print_chat(m: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({k: m[k] for k in ("network", "id", "from", "from_key", "text", "ts")}), flush=True)
    else:
        from datetime import datetime
        ts = datetime.fromtimestamp(m["ts"]).strftime("%H:%M:%S")
        out.print(f"[dim]{ts}[/] [bold]{lit(m['from'])}[/]@{lit(m['network'])}: {lit(m['text'])}",
                  highlight=False, soft_wrap=True)
        sys.stdout.flush()


# ---------------------------------------------------------------------------- admin
def _admin(home, network, action, as_json=False, **kw) -> dict:
    return daemon_call(home, "admin", as_json, network=network, action=action, **kw)


@admin_app.command("lock")
def admin_lock(network: str = NetworkArg, home: Optional[Path] = HomeOpt):
    """Refuse new members."""
    _admin(home, network, "lock")
    out.print(f"{lit(network)} is locked: no new members")


@admin_app.command("unlock")
def admin_unlock(network: str = NetworkArg, home: Optional[Path] = HomeOpt):
    """Accept new members again."""
    _admin(home, network, "unlock")
    out.print(f"{lit(network)} is unlocked")


@admin_app.command("approval")
def admin_approval(network: str = NetworkArg, mode: str = typer.Argument(..., help="on or off"),
                   home: Optional[Path] = HomeOpt):
    """Require (on) or stop requiring (off) the owner's approval for joins."""
    if mode not in ("on", "off"):
        fail("approval mode must be 'on' or 'off'")
    _admin(home, network, f"approval-{mode}")
    out.print(f"{lit(network)}: approval {mode}")


@admin_app.command("pending")
def admin_pending(network: str = NetworkArg, home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """List join requests waiting for approval."""
    r = _admin(home, network, "pending", as_json)
    if as_json:
        print_json({"pending": r["pending"]})
        return
    if not r["pending"]:
        out.print("no pending requests")
    for p in r["pending"]:
        out.print(f"{lit(p['name'])}  {lit(p['key'])}", highlight=False)


def _targeted(action: str, verb: str, doc: str, who: str):
    def cmd(network: str = NetworkArg, name: str = typer.Argument(..., help=who),
            home: Optional[Path] = HomeOpt):
        _admin(home, network, action, target=name)
        out.print(f"{lit(name)} {verb} ({lit(network)})")
    cmd.__doc__ = doc
    return cmd


admin_app.command("approve")(_targeted("approve", "approved", "Let a pending node join.", "Name of the requester."))
admin_app.command("reject")(_targeted("reject", "rejected", "Turn down a pending join request.",
                                      "Name of the requester."))
admin_app.command("kick")(_targeted("kick", "kicked", "Remove a member (it may join again).", "Member name."))
admin_app.command("ban")(_targeted("ban", "banned", "Remove and refuse a node: member, pending or former member.",
                                   "Node name."))
admin_app.command("unban")(_targeted("unban", "unbanned", "Let a banned node join again.", "Node name."))
admin_app.command("transfer")(_targeted("transfer", "now owns the network",
                                        "Hand the network's ownership to another member.", "The new owner."))


@admin_app.command("type")
def admin_type(network: str = NetworkArg,
               kind: str = typer.Argument(..., help="mesh, hub-and-spoke or gateway."),
               home: Optional[Path] = HomeOpt):
    """Set the network type: mesh (everyone reaches everyone), hub-and-spoke (spokes reach only
    hubs), gateway (members reach only the gateway member)."""
    if kind not in ("mesh", "hub-and-spoke", "gateway"):
        fail("network type must be mesh, hub-and-spoke or gateway")
    _admin(home, network, "type", target=kind)
    out.print(f"{lit(network)} is a {kind} network", highlight=False)


@admin_app.command("hub")
def admin_hub(network: str = NetworkArg, name: str = typer.Argument(..., help="Member name."),
              mode: str = typer.Argument(..., help="on or off"), home: Optional[Path] = HomeOpt):
    """Make a member a hub (on) or a spoke (off) of a hub-and-spoke network."""
    if mode not in ("on", "off"):
        fail("hub mode must be 'on' or 'off'")
    r = _admin(home, network, f"hub-{mode}", target=name)
    out.print(f"{lit(name)} is {'a hub' if mode == 'on' else 'a spoke'} in {lit(network)}"
              + ("" if r.get("type") == "hub-and-spoke" else
                 f" (takes effect once it is hub-and-spoke: overlay admin type {lit(network)} hub-and-spoke)"),
              highlight=False)


@admin_app.command("gateway")
def admin_gateway(network: str = NetworkArg, name: str = typer.Argument(..., help="Member name."),
                  home: Optional[Path] = HomeOpt):
    """Name the gateway member of a gateway network (the others reach only it and its LAN)."""
    r = _admin(home, network, "gateway", target=name)
    out.print(f"{lit(name)} is the gateway of {lit(network)}"
              + ("" if r.get("type") == "gateway" else
                 f" (takes effect once it is a gateway network: overlay admin type {lit(network)} gateway)"),
              highlight=False)


@admin_app.command("encryption")
def admin_encryption(network: str = NetworkArg, mode: str = typer.Argument(..., help="on or off"),
                     home: Optional[Path] = HomeOpt):
    """Turn payload encryption off (or back on) for a network: peers still authenticate each other
    and every packet still carries its authentication tag, but anyone on the path can read the
    payload. Peers drop encryption only when every network they share is unencrypted."""
    if mode not in ("on", "off"):
        fail("encryption mode must be 'on' or 'off'")
    _admin(home, network, f"encryption-{mode}")
    out.print(f"{lit(network)}: encryption {mode}"
              + (" (payloads readable on the path; still authenticated)" if mode == "off" else ""), highlight=False)


@admin_app.command("routes")
def admin_routes(network: str = NetworkArg,
                 action: Optional[str] = typer.Argument(None, help="approve or remove (none: list)."),
                 name: Optional[str] = typer.Argument(None, help="The gateway member."),
                 prefix: Optional[str] = typer.Argument(None, help="The subnet, like 192.168.1.0/24."),
                 home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt):
    """List the subnets members advertise (and which are approved), or approve / remove one:
    only approved routes are handed to the other members."""
    if action is None:
        r = _admin(home, network, "routes", as_json)
        if as_json:
            print_json({"routes": r["routes"]})
            return
        if not r["routes"]:
            out.print(f"no member of {lit(network)} advertises routes (overlay up --advertise-routes SUBNET)")
        for g in r["routes"]:
            approved = set(g["approved"])
            offered = sorted(set(g["advertised"]) | approved)
            items = ", ".join(f"{lit(p)} ({'approved' if p in approved else 'not approved'}"
                              f"{'' if p in g['advertised'] or not g['online'] else ', no longer advertised'})"
                              for p in offered)
            out.print(f"{lit(g['name'])}{'' if g['online'] else ' (offline)'}: {items}", highlight=False)
        return
    if action not in ("approve", "remove") or name is None or prefix is None:
        fail("usage: overlay admin routes NET [approve|remove NAME PREFIX]")
    _admin(home, network, f"route-{action}", as_json, target=name, prefix=prefix)
    if as_json:
        print_json({"network": network, "name": name, "prefix": prefix, "approved": action == "approve"})
        return
    out.print(f"{lit(prefix)} through {lit(name)} {'approved' if action == 'approve' else 'removed'} ({lit(network)})",
              highlight=False)


@admin_app.command("limit")
def admin_limit(network: str = NetworkArg, count: int = typer.Argument(..., help="Maximum members (0: no limit)."),
                home: Optional[Path] = HomeOpt):
    """Set the member limit."""
    _admin(home, network, "limit", value=count)
    out.print(f"{lit(network)}: member limit {count or 'none'}")


@admin_app.command("password")
def admin_password(network: str = NetworkArg,
                   password: Optional[str] = typer.Option(None, "--password",
                                                          help="The new password (prompted if absent)."),
                   remove_members: bool = typer.Option(False, "--remove-members",
                                                       help="Also remove every member but you (they joined "
                                                            "with the old password) and drop pending requests."),
                   home: Optional[Path] = HomeOpt):
    """Change the network's password; existing members stay unless --remove-members."""
    password = _password(password, "New network password", confirm=True)
    r = _admin(home, network, "password", password=password, value=int(remove_members))
    out.print(f"{lit(network)}: password changed"
              + (f"; removed {r.get('removed', 0)} member(s) who joined with the old one" if remove_members else ""),
              highlight=False)


@admin_app.command("delete")
def admin_delete(network: str = NetworkArg, yes: bool = typer.Option(False, "--yes", help="Do not ask."),
                 home: Optional[Path] = HomeOpt):
    """Delete a network for everyone."""
    if not yes and not (sys.stdin is not None and sys.stdin.isatty()):
        fail(f"deleting {network} needs a confirmation and there is no terminal to ask: add --yes "
             f"(overlay admin delete {network} --yes)")
    if not yes and not typer.confirm(f"Delete network {visible(network)} for all its members?"):
        raise typer.Exit(1)
    _admin(home, network, "delete")
    out.print(f"deleted network {lit(network)}")


# ---------------------------------------------------------------------------- keys and service
@app.command("forget-server")
def forget_server(server: str = typer.Argument(..., help="HOST:PORT as given to --server (A:P,B:P: each)."),
                  home: Optional[Path] = HomeOpt):
    """Forget a server's pinned key (after the server was really reinstalled)."""
    h = Home(home)
    forgot = [s for s in dict.fromkeys(x.strip() for x in server.split(",")) if s and h.forget_server(s)]
    if not forgot:
        fail(f"no pinned key for {server}")
    server = ",".join(forgot)
    try:
        api.call(h.socket_path, "retry_server", timeout=5)
    except (api.DaemonNotRunning, api.ApiError, OSError):
        out.print(f"forgot the key of {lit(server)}; `overlay up` pins the new one on first contact")
    else:
        out.print(f"forgot the key of {lit(server)}; the running node reconnects now and pins the new one")


@app.command()
def demo(workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where to keep homes and logs.")):
    """Run a local server and two nodes, create and join a network, chat, and stop."""
    from overlay.demo import run_demo
    try:
        rc = run_demo(workdir, say=lambda s: out.print(s, highlight=False, soft_wrap=True))
    except RuntimeError as e:
        fail(str(e))
    raise typer.Exit(rc)


def main() -> None:
    """Run the CLI. Usage mistakes (unknown command or option, missing argument) are one
    `error:` line naming the help to read, exit status 1, like every other user mistake."""
    try:
        from typer._click import exceptions as click  # typer >= 0.20 carries its own click
    except ImportError:
        from click import exceptions as click
    no_args = getattr(click, "NoArgsIsHelpError", ())
    try:
        rc = app(prog_name="overlay", standalone_mode=False)
    except no_args as e:
        print(e.ctx.get_help())
        rc = 0
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "overlay"
        err.print(f"[bold red]error:[/] {e.format_message().rstrip('.')} (see `{where} --help`)", highlight=False,
                  soft_wrap=True)
        rc = 1
    except click.ClickException as e:
        err.print(f"[bold red]error:[/] {e.format_message()}", highlight=False, soft_wrap=True)
        rc = 1
    except typer.Abort:  # Ctrl-C or end of input at a prompt
        rc = 1
    except HomeError as e:
        err.print(f"[bold red]error:[/] {lit(e)}", highlight=False, soft_wrap=True)
        rc = 1
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
