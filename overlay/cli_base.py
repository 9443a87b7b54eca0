"""What every ``overlay`` command shares, without typer: output (``out``, ``err``, ``lit``), the one
``error:`` line (``fail``), the daemon's API (``daemon_call``), and ``overlay status`` itself.

``overlay status [--json] [--home DIR]`` is what people and scripts run most, so ``main`` answers it
from here, before typer and its option machinery are imported (benchmarks/bench_startup.py);
everything else goes on to ``overlay.cli``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NoReturn, Optional

from overlay.escape import visible
from overlay.node import api
from overlay.node.home import Home


# Output that is not a terminal (a pipe, a file) is as wide as its longest line: whole lines for
# grep and cut, table rows never wrapped or cut at 80 columns. (rich flushes after every print.)
PIPE_WIDTH = 10_000


class _LazyConsole:
    """A rich Console made on first use: `status --json` and scripts never import rich."""

    def __init__(self, **kw):
        self._kw = kw
        self._console = None

    def __getattr__(self, name):
        if self._console is None:
            from rich.console import Console
            console = Console(**self._kw)
            if not console.is_terminal:
                console = Console(**self._kw, width=PIPE_WIDTH, soft_wrap=True)
            self._console = console
        return getattr(self._console, name)


# emoji=False: ":smile:" in a chat message stays text. Every value that did not come from this file
# (chat text, names, server and daemon messages, command-line arguments) goes through lit().
out = _LazyConsole(emoji=False)
err = _LazyConsole(stderr=True, emoji=False)


def lit(value: object) -> str:
    """``value`` for a rich markup string: printed literally (no markup, no escape sequences)."""
    from rich.markup import escape
    text = visible(value)
    body = text.rstrip("\\")
    tail = len(text) - len(body)
    if not tail:
        return escape(body)
    # trailing backslashes would escape whatever tag the caller puts next: double them before an empty tag
    return escape(body) + "\\" * (2 * tail) + "[default][/default]"


def fail(message: str, code: str = "error", as_json: bool = False) -> NoReturn:
    if as_json:
        print(json.dumps({"error": {"code": code, "message": message}}))
    else:
        err.print(f"[bold red]error:[/] {lit(message)}", highlight=False, soft_wrap=True)
    sys.exit(1)


def daemon_call(home: Optional[Path], cmd: str, as_json: bool = False, **args) -> dict:
    h = Home(home)
    try:
        return api.call(h.socket_path, cmd, **args)
    except api.DaemonNotRunning:
        fail(f"overlay is not running for {h.path} (start it with `{_up_command(h, home)}`)", "not_running", as_json)
    except api.ApiError as e:
        fail(e.message, e.code, as_json)


def _up_command(h: Home, home: Optional[Path]) -> str:
    """The `overlay up` that starts this home's node: bare if it ran before (prefs.json)."""
    from overlay.node.prefs import Prefs, PrefsError
    try:
        ran_before = Prefs(h.path).server is not None
    except PrefsError:
        ran_before = False
    return "overlay up" + ("" if ran_before else " --server HOST:PORT") + (f" --home {home}" if home else "")


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))

def dns_system_lines(dns: dict) -> list[str]:
    """How this machine's programs reach the node's names (status "dns"), as text lines."""
    sysd = dns.get("system")
    if not sysd:   # userspace mode: a loopback address and port
        return []
    if sysd.get("via") == "systemd-resolved":
        names = [d for d in sysd["domains"] if not d.endswith(".in-addr.arpa")]
        reverse = len(sysd["domains"]) - len(names)
        return [f"systemd-resolved asks it for {' '.join(names)} on {sysd['link']}"
                + (f" (and {reverse} reverse zone{'s' if reverse != 1 else ''})" if reverse else "")]
    if sysd.get("via") == "resolv.conf":
        return [f"it is the first nameserver in {sysd['file']} (restored when the node stops)"]
    if sysd.get("note"):
        return [sysd["note"]]
    if sysd.get("mode") == "off":
        return []
    host, port = dns["address"].rsplit(":", 1)
    if port != "53":
        return [f"names answer at {dns['address']} for programs told so (dig -p {port} @{host} NAME.NET)"]
    return [f"DNS: names answer at {dns['address']}; to use them, add `nameserver {host}` to /etc/resolv.conf, "
            "or run systemd-resolved, or `overlay up --dns-config resolv-conf`"]


def show_status(home: Optional[Path], as_json: bool) -> None:
    """This node, its server connection, networks and peers."""
    st = daemon_call(home, "status", as_json)
    st.pop("ok", None)
    if as_json:
        print_json(st)
        return
    node, srv = st["node"], st["server"]
    conn = "[green]connected[/]" if srv["connected"] else f"[yellow]{lit(srv['state'])}[/]"
    others = len(srv.get("servers") or []) - 1
    more = f" (+{others} more listed)" if others > 0 else ""
    out.print(f"[bold]{lit(node['name'])}[/]  {lit(node['virtual_ip'] or '-')}  server {lit(srv['address'])}{more} "
              f"{conn}")
    if srv.get("error"):
        out.print(f"  [red]{lit(srv['error'])}[/]", soft_wrap=True)
    iface = st.get("interface")
    if iface:
        out.print(f"{iface['kind'].upper()} device {lit(iface['name'])}, MTU {iface['mtu'] or '-'}"
                  + (f", MAC {iface['mac']}" if iface.get("mac") else ""), highlight=False)
    for pr in st.get("proxies", []):
        out.print(f"{lit(pr['kind'])} proxy on {lit(pr['address'])}", highlight=False)
    if st.get("dns"):
        out.print(f"DNS for peers on {lit(st['dns']['address'])} ({len(st['dns']['names'])} names)", highlight=False)
        for line in dns_system_lines(st["dns"]):
            out.print(f"  {lit(line)}", highlight=False, soft_wrap=True)
    gw = st.get("gateway")
    if gw:
        in_pool = gw.get("in_pool") or []
        waiting = [r for r in gw["advertised"] if r not in gw["approved"] and r not in in_pool]
        out.print("gateway for " + (", ".join(lit(r) for r in gw["approved"]) or "nothing yet")
                  + (f" (waiting for approval: {', '.join(lit(r) for r in waiting)})" if waiting else "")
                  + (" (the kernel forwards)" if gw.get("mode") == "kernel" else ""), highlight=False)
        if in_pool:
            out.print(f"  [red]{lit(', '.join(in_pool))} can never be approved: "
                      f"{'it overlaps' if len(in_pool) == 1 else 'they overlap'} the overlay's address pool "
                      f"{lit(st['server'].get('pool'))} (advertise subnets outside it)[/]", highlight=False)
        gs = gw.get("stats") or {}
        if gs.get("error"):
            out.print(f"  [red]{lit(gs['error'])}[/]", soft_wrap=True)
        elif gw.get("mode") == "userspace" and gw.get("icmp") is None and gs.get("echo_dropped"):
            out.print("  members' pings to LAN hosts go unanswered (no ICMP socket): "
                      "sudo sysctl -w net.ipv4.ping_group_range='0 2147483647'", highlight=False, soft_wrap=True)
    if st.get("shares"):
        out.print("sharing " + ", ".join(f"{lit(x['port'])}/{lit(x['proto'])}" for x in st["shares"]),
                  highlight=False)
        src = st.get("share_source") or {}
        if src.get("mode") == "per_peer":
            out.print("  your services see each peer as its own address 127.x.y.z: overlay whois ADDR names it",
                      highlight=False)
        elif src.get("mode") == "virtual_ip":
            out.print("  your services see each peer's virtual IP: overlay whois ADDR names it", highlight=False)
        elif src.get("mode") == "localhost":
            out.print(f"  your services see every peer as 127.0.0.1: {lit(src.get('note'))}", highlight=False)
    for f in st.get("forwards", []):
        out.print(f"forward {lit(f['proto'])} {lit(f['listen'])} -> {lit(f['peer'])}:{lit(f['peer_port'])} "
                  f"({lit(f['active'])} active)", highlight=False)
    if not st["networks"]:
        out.print("no networks (overlay create NET / overlay join NET)")
    for net in st["networks"]:
        flags = [net["role"] or ""]
        if net.get("type", "mesh") != "mesh":
            flags.append(net["type"])
        if net.get("encrypted") is False:
            flags.append("UNENCRYPTED")
        if net["locked"]:
            flags.append("locked")
        if net["approval"]:
            flags.append("approval")
        if net["max_members"]:
            flags.append(f"max {net['max_members']}")
        if net.get("away"):
            flags.append("offline")
        from rich.table import Table
        t = Table(title=lit(f"{net['name']} ({', '.join(f for f in flags if f)})"), title_justify="left")
        for col in ("name", "virtual ip", "status", "role", "path"):
            t.add_column(col)
        peers = {p["key"]: p for p in st["peers"]}
        for m in net["members"]:
            p = peers.get(m["key"], {})
            state = "[green]online[/]" if m["online"] else "[dim]offline[/]"
            path = "this node" if m["self"] else (p.get("path") or "-")
            marker = " [yellow](unencrypted)[/]" if p.get("encrypted") is False and not m["self"] else ""
            if p.get("rtt_ms") is not None:
                path += f" {p['rtt_ms']:.1f} ms"
            role = (m["role"] + (f", {m['kind']}" if m.get("kind") not in (None, "member") else "")
                    + (f" ({m['iface']})" if m.get("iface") else ""))
            if m.get("routes"):
                role += ", routes " + ", ".join(m["routes"])
            t.add_row(lit(m["name"]), lit(m["ip"]), state, lit(role), lit(path) + marker)
        out.print(t)
        if net.get("away"):
            out.print(f"  you are offline in {lit(net['name'])}: overlay online {lit(net['name'])}", highlight=False)
        for p in net.get("pending", []):
            out.print(f"  {lit(p['name'])} asks to join {lit(net['name'])}: overlay admin approve {lit(net['name'])} "
                      f"{lit(p['name'])} (or reject)", highlight=False, soft_wrap=True)
        if net["role"] == "owner":
            _routes_to_approve(home, net["name"], st["server"].get("pool"))


def _routes_to_approve(home: Optional[Path], network: str, pool: Optional[str]) -> None:
    """For the owner: the routes members offer that wait for approval (asked of the server)."""
    import ipaddress
    try:
        r = api.call(Home(home).socket_path, "admin", network=network, action="routes", timeout=5)
    except (api.DaemonNotRunning, api.ApiError, OSError):
        return   # not connected to the server: nothing to tell
    for g in r.get("routes", []):
        waiting = [p for p in g["advertised"] if p not in g["approved"]
                   and not (pool and ipaddress.IPv4Network(p).overlaps(ipaddress.IPv4Network(pool)))]
        if waiting:
            out.print(f"  {lit(g['name'])} offers {lit(', '.join(waiting))}, waiting for your approval: overlay admin "
                      f"routes {lit(network)} approve {lit(g['name'])} {lit(waiting[0]) if len(waiting) == 1 else 'PREFIX'}",
                      highlight=False, soft_wrap=True)


def fast_status(argv: list[str]) -> bool:
    """Handle `overlay status [--json] [--home DIR]`; False for anything else (options, -h)."""
    if not argv or argv[0] != "status":
        return False
    home, as_json = os.environ.get("OVERLAY_HOME") or None, False
    rest = argv[1:]
    while rest:
        a = rest.pop(0)
        if a == "--json":
            as_json = True
        elif a == "--home" and rest:
            home = rest.pop(0)
        elif a.startswith("--home=") and len(a) > 7:
            home = a[7:]
        else:
            return False
    show_status(Path(home) if home else None, as_json)
    return True


def main() -> None:
    """The `overlay` command: status straight away, the rest through typer (overlay.cli)."""
    if fast_status(sys.argv[1:]):
        sys.exit(0)
    from overlay.cli import main as cli_main
    cli_main()
