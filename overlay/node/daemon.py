"""The node daemon (``overlay up``): server connection, local API, and (later) the data plane.

It runs with the ``NodeSettings`` that ``overlay up`` resolved (overlay/node/settings.py), holds the
node's view of its networks (``NodeState``), serves the CLI over the local API socket (its commands:
overlay/node/local_api.py) and forwards network commands to the mediation server.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import signal
import socket

from overlay import crypto
from overlay.control.messages import CAP_NO_INNER_CHECKSUM, RequestError, key_to_text, normalize_name
from overlay.hostport import parse_hostport
from overlay.nat.candidate import format_addr
from overlay.node import api
from overlay.netstack.asyncio_glue import StackDriver
from overlay.netstack.stack import Stack
from overlay.netstack.tcp import TcpConfig
from overlay.node.control_client import ControlClient, NotConnected
from overlay.node.dataplane import INNER_MTU, DataPlane
from overlay.node.dns import Names, Responder
from overlay.node.dns_server import DnsServer
from overlay.node.dns_system import SystemDns, routing_domains
from overlay.node.gateway import Gateway
from overlay.node.home import Home, HomeError
from overlay.node.inbound_filter import InboundFilter
from overlay.node.kernel_device import DEFAULT_NAME, DeviceError, KernelInterface
from overlay.node.local_api import LocalApi
from overlay.node.pinger import Pinger
from overlay.node.prefs import Prefs
from overlay.node.settings import DEFAULT_DNS, DNS_PORT, NodeSettings, dns_address
from overlay.node.services import OverlayDialer, RouteWithdrawn, Shares
from overlay.proxy.forward import Forward
from overlay.proxy.listen import ListenError
from overlay.proxy.server import AuthRequired, HttpProxyServer, SocksServer
from overlay.node.state import NodeState, Peer

log = logging.getLogger("overlay.node")

TCP_BUFFER = 4 << 20
PUNCH_RETRY = 10.0  # ask the server to introduce an online peer without a direct path at most this often


class DaemonError(Exception):
    pass


class Daemon:
    def __init__(self, home: Home, settings: NodeSettings):
        s = self.settings = settings
        self.home = home
        self.prefs = Prefs(home.path)  # runtime shares and forwards, last server and name
        self.private_key = home.private_key()
        self.public_key = crypto.public_key(self.private_key)
        self.name = normalize_name(s.name, "node name")
        self.state = NodeState()
        self.state.me = {"name": self.name, "key": key_to_text(self.public_key)}
        # Without a server the node is a plain WireGuard endpoint for its static peers.
        self.client = ControlClient(home, s.server, self.name, self.private_key, via_proxy=s.via_proxy,
                                    on_event=self._on_event, on_reset=self.state.begin_resync,
                                    on_session=self._on_session, on_synced=self._on_synced) if s.server else None
        if self.client:   # the hello names the member lists held: unchanged ones are not sent again
            self.client.hello_sync = self.state.sync_digests
        self.dataplane = DataPlane(self.private_key, port=s.port, keepalive=s.keepalive, hard_nat=s.hard_nat,
                                   port_mapping=s.port_mapping,
                                   send_control=self.client.post if self.client else lambda msg: None)
        self.shares = Shares(pool=lambda: self.dataplane.pool)  # a loopback source address per peer
        self.address = s.address
        self.static_peers = s.static_peers
        self._static_peers = [Peer(sp.name, sp.key, sp.key_text, sp.allowed_ips[0].split("/")[0], True, static=True)
                              for sp in s.static_peers]
        self.dataplane.on_endpoints = self._repunch
        self.kernel_if: KernelInterface | None = None
        if s.interface:
            self.kernel_if = KernelInterface(
                s.interface, s.dev or DEFAULT_NAME, self.dataplane, self.public_key,
                only_shared=InboundFilter(self.shares.tcp, self.shares.udp) if s.only_shared else None,
                advertised=sorted(s.advertise_routes))
            if self.client:
                self.client.hello_extra["iface"] = s.interface
        elif self.client:
            # every inner packet ends in our userspace stacks (or, as a gateway, in OS sockets):
            # peers may leave TCP/UDP checksums 0 (Stack.checksum_free)
            self.client.hello_extra["caps"] = [CAP_NO_INNER_CHECKSUM]
        self._fatal: str | None = None
        self.advertise_routes = sorted(s.advertise_routes)
        # a gateway member: approved routes' destinations end in userspace stacks, then OS sockets;
        # with a TUN/TAP device the kernel forwards them instead (KernelInterface.set_gateway_routes)
        self.gateway = (Gateway(self.dataplane.send_packets, mtu=INNER_MTU,
                                checksum_free=self.dataplane.table.checksum_free)
                        if self.advertise_routes and self.kernel_if is None else None)
        if self.advertise_routes and self.client:
            self.client.hello_extra["routes"] = self.advertise_routes
        self.netstack: StackDriver | None = None
        self._punched: dict[bytes, float] = {}
        self._turn_renewal: asyncio.TimerHandle | None = None
        self._turn_task: asyncio.Task | None = None
        self.pinger = Pinger()
        self.dialer = OverlayDialer(self.find_peer, lambda: self.netstack, kernel=s.interface is not None,
                                    find_route=self._dial_route,
                                    path=lambda key: self.dataplane.peer_path(key)[0])
        self.proxy_users = dict(s.proxy_users) if s.proxy_users else None
        self.proxies: list = []
        self.forwards: dict[tuple[int, bool], Forward] = {}
        self._dns_task: asyncio.Task | None = None
        self._names: Names | None = None   # the DNS names table, rebuilt when the state changed
        self.dns = DnsServer(Responder(self.dns_names, local=self._local_source)) if s.dns else None
        # this machine's resolver (TUN/TAP): systemd-resolved per link, or opt-in resolv.conf
        self.dns_system = SystemDns(home.path, s.dns_config)
        self._dns_system_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.api = LocalApi(self)
        self._api_server: asyncio.AbstractServer | None = None
        self.ui = None       # the local web page (overlay/ui/server.py UiServer) once it listens
        self._stop = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        await self._start_api()
        self.dns_system.recover()   # what a killed node of this home left in the resolver
        await self._start_ui()
        self.prefs.remember(server=self.client.server_list if self.client else None, name=self.name)
        loop = asyncio.get_running_loop()
        try:
            self.dataplane.start()
        except OSError as e:
            raise DaemonError(f"cannot bind UDP port {self.dataplane.port}: {e.strerror or e} (choose another "
                              "with --port N or `port` in config.toml; 0 picks any free port)") from None
        if self.kernel_if is not None:
            try:
                self.kernel_if.open()
            except DeviceError as e:
                self.dataplane.close()
                raise DaemonError(str(e)) from None
            if self.kernel_if.checksum_free and self.client:
                self.client.hello_extra["caps"] = [CAP_NO_INNER_CHECKSUM]
        s = self.settings
        self.prefs.remember_interface(s.interface, s.dev, s.only_shared)  # once the device is open
        try:
            await self._start_proxies()
        except (ListenError, ValueError) as e:
            self._close_data()
            raise DaemonError(str(e)) from None
        if self.dns is not None and (s.dns != DEFAULT_DNS or self.kernel_if is None):
            try:
                await self._start_dns(s.dns)   # with a TUN/TAP device, 'auto' waits for the virtual IP
            except DaemonError:
                self._close_data()
                raise
        if s.remember_options is not None:   # ... and the options once the proxies listen
            self.prefs.remember_options(dict(s.remember_options))
        try:
            for p in self.static_peers:
                self.dataplane.add_static_peer(p.key, name=p.name, endpoint=p.endpoint,
                                               allowed_ips=list(p.allowed_ips),
                                               persistent_keepalive=p.persistent_keepalive)
        except ValueError as e:
            self._close_data()
            raise DaemonError(str(e)) from None
        if self.address:
            self.state.me["ip"] = self.address
            self._attach_stack(self.address)
            if self._fatal:
                self._close_data()
                raise DaemonError(self._fatal)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        client = loop.create_task(self.client.run()) if self.client else None
        # systemd-resolved restarted, or started after the node: its link settings again
        resolved_watch = (loop.create_task(self.dns_system.keep(self._dns_system_lock, self._dns_networks,
                                                                lambda: self.dataplane.pool))
                          if self.kernel_if is not None else None)
        try:
            await self._stop.wait()
        finally:
            await self.api.stop_followers()
            if client:
                client.cancel()
            self._api_server.close()
            if self.ui is not None:
                self.ui.close()
            for srv in self.proxies:
                srv.close()
            for fwd in self.forwards.values():
                fwd.close()
            if self.netstack:
                self.netstack.close()
            if self.gateway:
                self.gateway.close()
            if resolved_watch is not None:
                resolved_watch.cancel()
                await asyncio.gather(resolved_watch, return_exceptions=True)
            self.dns_system.revert()
            if self.dns is not None:
                self.dns.close()
            self._close_data()
            try:
                os.unlink(self.home.socket_path)
            except FileNotFoundError:
                pass
            log.info("daemon stopped")
        if self._fatal:
            raise DaemonError(self._fatal)

    def stop(self) -> None:
        self._stop.set()

    def _close_data(self) -> None:
        if self.kernel_if is not None:
            self.kernel_if.close()
        self.dataplane.close()

    async def _start_api(self) -> None:
        self.home.ensure()
        path = self.home.socket_path
        if (problem := api.socket_path_problem(path)) is not None:
            raise DaemonError(problem)
        if path.exists():
            try:
                api.call(path, "ping", timeout=2)
            except (api.DaemonNotRunning, api.ApiError, OSError):
                path.unlink()  # stale socket from a killed daemon
            else:
                raise DaemonError(f"a daemon is already running for {self.home.path} "
                                  f"(stop it with `overlay down --home {self.home.path}`)")
        old = os.umask(0o177)
        try:
            self._api_server = await asyncio.start_unix_server(self.api.connection, path=str(path), limit=api.MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    async def _start_ui(self) -> None:
        """The local web page (overlay/ui), imported only when it is on."""
        if not self.settings.ui:
            return
        from overlay.ui import server as ui_server
        try:
            self.ui = await ui_server.start(self.api, self.status, self.home.path, self.settings.ui)
        except OSError as e:
            raise DaemonError(f"cannot serve the web page on {self.settings.ui}: {e.strerror or e} (choose "
                              "another address with --ui HOST:PORT, or --ui off)") from None

    # ------------------------------------------------------------------ server events
    def _on_session(self, hello: dict) -> None:
        self.state.me.update(name=hello["name"], ip=hello["ip"], key=hello["key"])
        self.dataplane.set_pool(hello.get("pool"))
        for r in self._routes_in_pool():
            log.warning("--advertise-routes %s overlaps the overlay's address pool %s of server %s: it can never be "
                        "approved (advertise the LAN's subnet, outside the pool)", r, self.dataplane.pool,
                        self.client.server)
        if self.address or hello["ip"]:   # none before this node's first network ("address" event)
            self._attach_stack(self.address or hello["ip"])
        self.state.away = set(self.prefs.away)
        for net in self.state.away:  # presence per network is not kept by the server across sessions
            self.client.post({"t": "presence", "network": net, "online": False})
        self._punched.clear()
        self.dataplane.set_server(self.client.server_ip or self.client.host, hello["udp_port"],
                                  base64.b64decode(hello["udp_token"]), hello.get("stun_ports"),
                                  hello.get("stun_alt_ip"), hello.get("udp_addrs"))
        self.client.post({"t": "endpoints", "candidates": self.dataplane.local_candidates()})
        self._set_turn(hello.get("turn"))
        self.sync_peers()

    def _on_synced(self) -> None:
        """The server's snapshots after the hello are all in: drop networks and members it no
        longer lists (kept meanwhile, so a reconnection or a move to another server of the list
        leaves peers, tunnels and paths as they were)."""
        if self.state.end_resync():
            self.sync_peers()

    def _set_turn(self, creds) -> None:
        """The server's TURN credentials (``overlay/node/turn_path.py``): renewed at half their life."""
        self.dataplane.set_turn(creds)
        if self._turn_renewal is not None:
            self._turn_renewal.cancel()
        self._turn_renewal = None
        if isinstance(creds, dict) and isinstance(creds.get("ttl"), int) and creds["ttl"] > 0:
            loop = asyncio.get_running_loop()
            self._turn_renewal = loop.call_later(max(60, creds["ttl"] / 2), self._start_turn_renewal)

    def _start_turn_renewal(self) -> None:
        self._turn_task = asyncio.get_running_loop().create_task(self._renew_turn())   # (a reference kept)

    async def _renew_turn(self) -> None:
        try:
            reply = await self.client.request({"t": "turn"})
        except (NotConnected, RequestError, asyncio.TimeoutError, ConnectionError) as e:   # the next hello brings new ones
            log.info("TURN credentials not renewed: %s", e)
            return
        self._set_turn(reply.get("turn"))

    def _attach_stack(self, address: str) -> None:
        """The userspace TCP/IP stack answering for our overlay address, or the kernel interface."""
        if self.kernel_if is not None:
            pool = self.dataplane.pool or ipaddress.IPv4Network(f"{address}/24", strict=False)
            try:
                self.kernel_if.configure(address, pool)
            except DeviceError as e:
                self._fatal = str(e)
                self._stop.set()
                return
            self.dataplane.inner_sink = self._inbound
            if self.dns is not None and self.settings.dns == DEFAULT_DNS:   # on the virtual IP, port 53
                self._dns_task = asyncio.get_running_loop().create_task(self._start_dns(f"{address}:53",
                                                                                        fallback=True))
            return
        if self.netstack is not None and self.netstack.stack.address == address:
            return
        if self.netstack is not None:
            self.netstack.close()
        loop = asyncio.get_running_loop()
        # 4 MiB windows: a 256 KiB window halves throughput at the ~3 ms RTT of a busy tunnel
        # (measured in benchmarks/bench_forward.py); memory is only used while an app reads slowly.
        stack = Stack(address, mtu=INNER_MTU, now=loop.time(), verify_checksums=False,
                      checksum_free=self.dataplane.table.checksum_free,
                      tcp=TcpConfig(send_buffer=TCP_BUFFER, recv_buffer=TCP_BUFFER))
        self.netstack = StackDriver(stack, lambda pkt: self.dataplane.send_packets([pkt]),
                                    send_packets=self.dataplane.send_packets)
        self.shares.attach(self.netstack)
        self.dataplane.inner_sink = self._inbound

    async def _start_dns(self, where: str, fallback: bool = False) -> None:
        """Answer DNS on ``where`` ("auto": 127.0.0.1:DNS_PORT, else any free port). A busy or
        forbidden address given explicitly stops the daemon; 'auto' falls back to the loopback."""
        assert self.dns is not None
        if where == DEFAULT_DNS:
            where, fallback = f"127.0.0.1:{DNS_PORT}", True
        host, port = where.rsplit(":", 1) if fallback else dns_address(where)
        if self.dns.address == (host, int(port)):
            return
        self.dns.close()
        tries = [(host, int(port))] + ([("127.0.0.1", DNS_PORT), ("127.0.0.1", 0)] if fallback else [])
        for h, p in dict.fromkeys(tries):
            try:
                await self.dns.start(h, p)
                if self.kernel_if is not None and self.settings.dns == DEFAULT_DNS and self.state.me.get("ip"):
                    await self._tell_system_dns(h, p)
                return
            except OSError as e:
                if not fallback:
                    raise DaemonError(f"cannot answer DNS on {where}: {e.strerror or e} (choose another address "
                                      "with --dns 127.0.0.1:PORT, or --dns off)") from None
                (log.info if (h, p) == ("127.0.0.1", DNS_PORT) else log.warning)(
                    "cannot answer DNS on %s:%d (%s): trying %s", h, p, e.strerror or e,
                    "any free loopback port" if p == DNS_PORT else "the loopback")

    def _local_source(self, source) -> bool:
        """A DNS query from this machine (loopback or our own virtual IP), not from a peer (nor from
        a LAN host sending to our virtual IP: Linux delivers to a local address on any interface)."""
        host = source[0] if isinstance(source, tuple) else None
        try:
            return host is not None and (ipaddress.ip_address(host).is_loopback or host == self.state.me.get("ip"))
        except ValueError:
            return False

    async def _tell_system_dns(self, host: str, port: int) -> None:
        """Our DNS answers on ``host``:``port``: tell this machine's resolver (TUN/TAP mode)."""
        assert self.kernel_if is not None
        if host != self.state.me.get("ip"):
            self.dns_system.note = (f"port 53 of the device's address {self.state.me.get('ip')} was refused, so "
                                    f"names answer on {host}:{port} only (ask it with dig -p {port} @{host} NAME.NET)")
            return
        async with self._dns_system_lock:
            await asyncio.to_thread(self.dns_system.apply, self.kernel_if.name, host, port, self._dns_networks(),
                                    self.dataplane.pool)
        self.names_changed()   # networks joined while the thread ran: their domains now

    def _dns_networks(self) -> list[str]:
        return [n for n in self.state.networks if n not in self.state.away]

    async def _sync_system_dns(self) -> None:
        async with self._dns_system_lock:
            await asyncio.to_thread(self.dns_system.set_domains, self._dns_networks(), self.dataplane.pool)

    def names_changed(self) -> None:
        """Something DNS answers from changed (peers, presence, a rename): rebuild on the next query."""
        self._names = None
        if (self.dns_system.via == "systemd-resolved"
                and routing_domains(self._dns_networks(), self.dataplane.pool) != self.dns_system.domains):
            self.dns_system.domains = routing_domains(self._dns_networks(), self.dataplane.pool)
            task = asyncio.get_running_loop().create_task(self._sync_system_dns())   # networks joined or left
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def dns_names(self) -> Names:
        """The DNS names table from the live state (rebuilt after any change: ``_names`` = None)."""
        if self._names is None:
            nets = [n for n in self.state.networks if n not in self.state.away]
            me = dict(self.state.me, networks=nets)
            self._names = Names.build((p.to_json() for p in self._all_peers()), me, nets, self.dataplane.pool)
        return self._names

    def _inbound(self, packets: list[bytes]) -> None:
        packets = self.pinger.intercept(packets)
        if not packets:
            return
        if self.kernel_if is not None:
            self.kernel_if.deliver(packets)
        elif self.netstack is not None:
            if self.gateway is not None:
                mine = socket.inet_aton(self.netstack.stack.address)
                lan = [p for p in packets if p[16:20] != mine and not self.dataplane.is_group(p[16:20])]
                if lan:
                    packets = [p for p in packets if p[16:20] == mine]
                    self.gateway.deliver(lan)
            self.netstack.receive_packets(packets)

    def route_peer(self, host: str) -> Peer | None:
        """The online (else any) member whose approved gateway route holds the IPv4 ``host``."""
        try:
            if ipaddress.IPv4Address(host) in (self.dataplane.pool or ()):
                return None
        except ValueError:
            return None
        entry = self.dataplane.route_peer(host)
        if entry is None or entry.path is None:
            return None
        return self.find_peer(base64.b64encode(entry.key).decode())

    def withdrawn_route(self, host: str) -> tuple[str, str] | None:
        """(gateway member, route) when the IPv4 ``host`` is only inside an approved route that
        member no longer advertises (it came back online without it)."""
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            return None
        for p in self.state.peers().values():
            for r in p.withdrawn:
                if ip in ipaddress.IPv4Network(r):
                    return p.name, r
        return None

    def _dial_route(self, host: str) -> Peer | None:
        """``route_peer`` for the dialer: a withdrawn route is refused at once, naming its gateway."""
        p = self.route_peer(host)
        if p is None and (w := self.withdrawn_route(host)) is not None:
            raise RouteWithdrawn(host, *w)
        return p

    def find_peer(self, text: str) -> Peer | None:
        """A peer by name, name.network, virtual IP or key; None if no such peer."""
        t = text.strip().lower().rstrip(".")
        for p in self._all_peers():
            if t in (p.name, p.ip, p.key_text.lower()) or any(t == f"{p.name}.{n}" for n in p.networks):
                return p
        return None

    def _all_peers(self) -> list[Peer]:
        """Overlay peers (sharing a network) and static WireGuard peers, as status shows them."""
        return [*self.state.peers().values(), *self._static_peers]

    def resolve_peer(self, text: str) -> Peer:
        p = self.find_peer(text)
        if p is None and text.strip().lower().rstrip(".") in (self.name, self.state.me.get("ip")):
            raise RequestError("self", f"{text} is this node (`overlay status` lists your peers)")
        if p is None:
            raise RequestError("unknown_peer", self._no_peer(text))
        return p

    def _no_peer(self, text: str, fix: str = "") -> str:
        """Why no peer answers to ``text``: in a hub-and-spoke (gateway) network where this node is a
        spoke (member), the others share the network but are out of reach by design: say so."""
        notes = []
        mine = self.state.me.get("key")
        for view in sorted(self.state.networks.values(), key=lambda v: v.name):
            me = view.members.get(mine)
            kind, net_type = me.kind if me else None, view.info.get("type")
            if net_type == "hub-and-spoke" and kind != "hub":
                hubs = sorted(m.name for m in view.members.values() if m.kind == "hub" and m.key != mine)
                notes.append(f"spokes do not reach each other in the hub-and-spoke network {view.name}, "
                             f"only its hubs ({', '.join(hubs) or 'none yet'})")
            elif net_type == "gateway" and kind != "gateway":
                gws = sorted(m.name for m in view.members.values() if m.kind == "gateway" and m.key != mine)
                notes.append(f"members do not reach each other in the gateway network {view.name}, "
                             f"only its gateway ({', '.join(gws) or 'none yet'})")
        if notes:
            return f"no peer named {text!r} is reachable from this node: " + "; ".join(notes)
        return f"no peer named {text!r} shares a network with this node" + fix

    # ------------------------------------------------------------------ proxies, forwards, shares
    async def _start_proxies(self) -> None:
        for addr, cls, flag in ((self.settings.socks, SocksServer, "--socks"),
                                (self.settings.http_proxy, HttpProxyServer, "--http-proxy")):
            if not addr or addr == "off":
                continue
            host, port = parse_hostport(addr, allow_zero=True)
            try:
                srv = cls(self.dialer, host, port, self.proxy_users)
                await srv.start()
            except AuthRequired:
                raise
            except ListenError as e:
                raise ListenError(f"{e} (choose another address with {flag} HOST:PORT, or {flag} off)") from None
            self.proxies.append(srv)
            log.info("%s on %s:%d", srv.kind, *srv.address)
        for sh in self.settings.shares:
            self.shares.add(sh.port, sh.udp)
        for fw in self.settings.forwards:
            await self.add_forward(fw.listen, fw.peer, fw.peer_port, fw.udp)
        await self._restore_runtime()

    async def _restore_runtime(self) -> None:
        """Shares and forwards added at run time before the last stop (prefs.json)."""
        for sh in self.prefs.shares:
            self.shares.add(sh["port"], sh["proto"] == "udp")
        for fw in self.prefs.forwards:
            if (fw["listen"], fw["udp"]) in self.forwards:
                continue
            try:
                await self.add_forward(fw["listen"], fw["peer"], fw["peer_port"], fw["udp"], key=fw["key"])
            except RequestError as e:
                    log.warning("forward %d%s -> %s:%d not restored: %s (overlay unforward %d%s drops it)",
                            fw["listen"], "/udp" if fw["udp"] else "", fw["peer"], fw["peer_port"], e.message,
                            fw["listen"], "/udp" if fw["udp"] else "")

    async def add_forward(self, listen: int, peer: str, peer_port: int, udp: bool, key: str | None = None) -> dict:
        """A forward to ``peer`` (name, name.network, virtual IP, or a LAN address behind a gateway).
        It follows the peer's key (``key``, else the key ``peer`` names now or once the node learns
        it, see :meth:`_pin_forwards`), not the name: a rename does not break it."""
        if (listen, udp) in self.forwards:
            raise RequestError("forward_exists", f"port {listen}{'/udp' if udp else ''} is already forwarded")
        p = self.find_peer(key or peer)
        target = p.key_text if p else (key or peer)
        fwd = Forward(self.dialer, listen, target, peer_port, udp,
                      label=lambda: (q.name if (q := self.find_peer(fwd.peer)) else peer))
        try:
            await fwd.start()
        except ListenError as e:
            raise RequestError("port_busy", f"{e} (forward another local port: overlay forward OTHER_PORT"
                                            f"{'/udp' if udp else ''} {peer}:{peer_port})") from None
        self.forwards[(fwd.address[1], udp)] = fwd
        return self._forward_info(fwd)

    def forward_target_warning(self, peer: str) -> str | None:
        """Refuse a forward to a name no network of ours knows; a warning for an offline peer."""
        p = self.find_peer(peer) or self.route_peer(peer.strip())
        if p is None:
            if self.client is not None and not self.client.connected:
                return f"not connected to the server yet: cannot check that {peer} is a peer"
            raise RequestError("unknown_peer", self._no_peer(peer, " (`overlay status` lists your peers)"))
        if not p.online:
            return f"{p.name} is offline: the forward works once it is online"
        return None

    def _pin_forwards(self) -> None:
        """Forwards whose peer was not known when they started (config.toml, or not connected yet)
        follow its key from now on; runtime forwards remember it, and the peer's current name."""
        saved = {(f["listen"], f["udp"]): f for f in self.prefs.forwards}
        for (port, udp), fwd in self.forwards.items():
            p = self.find_peer(fwd.peer)
            if p is None:
                continue
            fwd.peer = p.key_text
            if (f := saved.get((port, udp))) is not None:
                self.prefs.add_forward(port, p.name, f["peer_port"], udp, key=p.key_text)

    def _forward_info(self, f: Forward) -> dict:
        p = self.find_peer(f.peer)
        return {"listen": f"{f.address[0]}:{f.address[1]}", "peer": f.peer_name, "peer_port": f.peer_port,
                "proto": "udp" if f.udp else "tcp", "active": f.active, "key": p.key_text if p else None}

    async def ping(self, target: str, timeout: float = 2.0) -> dict:
        """One echo to a peer, or to a LAN host behind a gateway member (an approved route holds it)."""
        host = None
        if self.find_peer(target) is None and (gw := self.route_peer(target.strip())) is not None:
            host, p = target.strip(), gw
        elif self.find_peer(target) is None and (w := self.withdrawn_route(target.strip())) is not None:
            raise RequestError("route_withdrawn", f"{target.strip()}: gateway {w[0]} no longer advertises {w[1]}")
        else:
            p = self.resolve_peer(target)
        if not p.online:
            raise RequestError("peer_offline", f"{p.name} is offline"
                                               + (f" (the gateway to {host})" if host else ""))
        me = self.state.me.get("ip")
        if not me:
            raise NotConnected("not connected to the server yet")
        dst = host or p.ip
        info = {"peer": p.name, "ip": dst, "gateway": p.name if host else None}
        seq, pkt = self.pinger.request(me, dst)
        fut = self.pinger.wait(seq)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self.dataplane.send_packets([pkt])
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            path, _ = self.dataplane.peer_path(p.key)
            return {**info, "seq": seq, "rtt_ms": None, "path": path}
        rtt = (loop.time() - t0) * 1000
        path, _ = self.dataplane.peer_path(p.key)
        return {**info, "seq": seq, "rtt_ms": rtt, "path": path}

    def sync_peers(self) -> None:
        """Tell the data plane who our peers are, and ask the server to introduce new online ones."""
        peers = self.state.peers()
        self.names_changed()
        self.dataplane.update_peers(peers)
        self._pin_forwards()
        if self.advertise_routes:
            own = [(r, ips) for r, ips in self.state.own_routes() if r in self.advertise_routes]
            if self.gateway is not None:
                self.gateway.set_routes(own)
            elif self.kernel_if is not None:
                self.kernel_if.set_gateway_routes(own)
        if self.kernel_if is not None:
            self.kernel_if.set_peers()
        if self.client is None or (not self.client.connected and self.client.state != "hello"):
            return
        now = asyncio.get_running_loop().time()
        for key, p in peers.items():
            entry = self.dataplane.peers.get(key)
            if not p.online or entry is None or entry.path.current_path is not None:
                continue
            if now - self._punched.get(key, float("-inf")) < PUNCH_RETRY:
                continue
            self._punched[key] = now
            self.client.post({"t": "punch", "peer": p.key_text})

    def _repunch(self) -> None:
        """Our candidates changed (first probe, rebinding): ask for fresh introductions."""
        self._punched.clear()
        self.sync_peers()

    def _on_event(self, ev: dict) -> None:
        t = ev.get("t")
        if t == "punch":
            self.dataplane.punch(ev)
            return
        if t == "relay":
            self.dataplane.relay_from_tcp(ev)
            return
        if t == "address":                # the server gave us our virtual IP (first network)
            self.state.me["ip"] = ev["ip"]
            self.names_changed()
            self._attach_stack(self.address or ev["ip"])
            return
        change = self.state.apply(ev)
        if t in ("members", "member_left", "removed", "network", "presence"):   # network: type, encryption
            self.sync_peers()
        while self.state.needs_snapshot:  # a presence event over other members than ours: the full list
            self.client.post({"t": "members", "network": self.state.needs_snapshot.pop()})
        if change:
            log.info("%s", change)
        if ev.get("t") in ("chat", "removed", "join_request", "join_approved", "join_rejected", "members",
                           "member_left"):
            self.api.publish(ev)

    def status(self) -> dict:
        c = self.client
        me = dict(self.state.me)
        return {
            "node": {"name": me.get("name", self.name), "public_key": me.get("key"),
                     "virtual_ip": me.get("ip"), "home": str(self.home.path)},
            "server": {"address": c.server, "servers": c.servers_status(), "switches": c.choice.switch_count,
                       "state": c.state, "connected": c.connected,
                       "error": c.last_error, "pool": str(self.dataplane.pool) if self.dataplane.pool else None,
                       "key": key_to_text(c.server_key) if c.server_key else None} if c else
                      {"address": None, "servers": [], "switches": 0, "state": "none", "connected": False,
                       "error": None, "key": None,
                       "pool": None},
            "networks": self.state.status(),
            "peers": [self._peer_status(p) for p in sorted(self._all_peers(), key=lambda p: p.name)],
            "proxies": [{"kind": "socks5" if isinstance(p, SocksServer) else "http",
                         "address": f"{p.address[0]}:{p.address[1]}"} for p in self.proxies],
            "interface": self.kernel_if.info() if self.kernel_if is not None else None,
            "ui": self.ui.address if self.ui is not None else None,
            "shares": self.shares.listing(),
            # what a shared service sees as the peer's address (TUN/TAP: the kernel delivers its virtual IP)
            "share_source": (self.shares.source_info() if self.kernel_if is None
                             else {"mode": "virtual_ip", "note": None}),
            "gateway": self._gateway_status() if self.advertise_routes else None,
            "netstack": dict(self.netstack.stack.stats) if self.netstack is not None else None,
            "forwards": [self._forward_info(f) for f in self.forwards.values()],
            "dns": {"address": format_addr(self.dns.address), "names": self.dns_names().names(),
                    "stats": dict(self.dns.responder.stats),
                    "system": self.dns_system.status() if self.kernel_if is not None else None}
                   if self.dns is not None and self.dns.address else None,
            "udp": {"port": self.dataplane.port, "server_udp": self.dataplane.udp_ok,
                    "public": format_addr(self.dataplane.srflx) if self.dataplane.srflx else None,
                    "nat": self.dataplane.nat_summary(), "birthday": self.dataplane.birthday_stats(),
                    "sequential": self.dataplane.sequential_stats(), "ipv6": self.dataplane.ipv6_summary(),
                    "port_mapping": self.dataplane.port_mapping_summary(),
                    "turn": self.dataplane.turn_summary(), "relays": self.dataplane.relays_summary(),
                    "tunnel_guard": self.dataplane.guard.summary()},
        }

    def _routes_in_pool(self) -> list[str]:
        """Advertised routes the server will never let an owner approve: they overlap its pool."""
        pool = self.dataplane.pool
        return [r for r in self.advertise_routes if pool is not None and ipaddress.IPv4Network(r).overlaps(pool)]

    def _gateway_status(self) -> dict:
        approved = [r for r, _ in self.state.own_routes() if r in self.advertise_routes]
        unusable = {"in_pool": self._routes_in_pool()}
        if self.gateway is not None:
            icmp = self.gateway.icmp
            return {"advertised": self.advertise_routes, "approved": approved, **unusable, "mode": "userspace",
                    "icmp": icmp.mode, "stats": {**self.gateway.stats, **{f"echo_{k}": v for k, v in
                                                                             icmp.table.stats.items()}}}
        return {"advertised": self.advertise_routes, "approved": approved, **unusable, "mode": "kernel",
                "icmp": "kernel",
                "stats": self.kernel_if.router_stats() if self.kernel_if is not None else {}}

    def _peer_status(self, p: Peer) -> dict:
        path, rtt = self.dataplane.peer_path(p.key)
        if not p.online:
            path, rtt = None, None
        try:
            wg = self.dataplane.device.peer_stats(p.key)
            rx, tx = wg["rx_bytes"], wg["tx_bytes"]
        except KeyError:      # not a tunnel peer (yet)
            rx = tx = 0
        return {**p.to_json(), "path": path, "rtt_ms": rtt, "rx_bytes": rx, "tx_bytes": tx}


async def run_daemon(home: Home, settings: NodeSettings) -> None:
    try:
        daemon = Daemon(home, settings)
    except HomeError as e:
        raise DaemonError(str(e)) from None
    await daemon.run()
