"""The daemon's end of the local API (overlay/node/api.py): one JSON request per connection from
the CLI, answered by the running ``Daemon``; ``follow`` streams events (chat, members, join
requests) until the client hangs up or the daemon stops.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import TYPE_CHECKING

from overlay.control.messages import RequestError, normalize_name
from overlay.node.control_client import NotConnected
from overlay.node.services import nothing_listens
from overlay.node.share_source import loopback_for, vip_for

if TYPE_CHECKING:
    from overlay.node.daemon import Daemon

FOLLOW_QUEUE = 1000


class LocalApi:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.followers: set[asyncio.Queue] = set()

    def publish(self, ev: dict) -> None:
        """An event for every `follow` stream."""
        for q in list(self.followers):
            if q.full():
                q.get_nowait()  # a slow follower loses the oldest line, never blocks the daemon
            q.put_nowait(ev)

    async def stop_followers(self, wait: float = 1.0) -> None:
        """Tell every `chat --follow` that the daemon stops, and give them a moment to hear it."""
        for q in list(self.followers):
            if q.full():
                q.get_nowait()
            q.put_nowait({"t": "stopping"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self.followers and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if not line:
                return
            try:
                req = json.loads(line)
                cmd = req.pop("cmd")
            except (ValueError, KeyError, AttributeError):
                await self._reply(writer, {"ok": False, "code": "bad_request", "error": "malformed API request"})
                return
            if cmd == "follow":
                await self._follow(req, reader, writer)
                return
            await self._reply(writer, await self.answer(cmd, req))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # the daemon is stopping; a task ending cancelled would be logged as an error
        finally:
            writer.close()

    async def answer(self, cmd: str, req: dict) -> dict:
        """The reply to one command: {"ok": True, ...} or {"ok": False, "code", "error"} with the
        one line the CLI prints (the local web page, overlay/ui, answers with it too)."""
        try:
            return {"ok": True, **await self.command(cmd, req)}
        except RequestError as e:
            return {"ok": False, "code": e.code, "error": e.message}
        except NotConnected as e:
            return {"ok": False, "code": "not_connected", "error": str(e)}
        except (TypeError, KeyError, ValueError) as e:
            return {"ok": False, "code": "bad_request", "error": f"bad arguments for {cmd}: {e}"}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()

    async def _follow(self, req: dict, reader, writer) -> None:
        network = req.get("network")
        q: asyncio.Queue = asyncio.Queue(FOLLOW_QUEUE)
        self.followers.add(q)
        loop = asyncio.get_running_loop()
        eof = get = None
        try:
            await self._reply(writer, {"ok": True, "t": "following", "network": network})
            eof = loop.create_task(reader.read(1))
            while True:
                get = loop.create_task(q.get())
                done, _ = await asyncio.wait({get, eof}, return_when=asyncio.FIRST_COMPLETED)
                if eof in done:
                    return
                ev = get.result()
                if ev.get("t") == "stopping":
                    await self._reply(writer, {"ok": True, "t": "stopping"})
                    return
                if network and ev.get("network") != network:
                    continue
                await self._reply(writer, {"ok": True, **ev})
        finally:
            self.followers.discard(q)
            for task in (eof, get):
                if task is not None:
                    task.cancel()

    async def _server(self, msg: dict) -> dict:
        d = self.daemon
        if d.client is None:
            raise NotConnected("this node runs without a mediation server (no --server)")
        reply = await d.client.request(msg)
        reply.pop("t", None)
        reply.pop("id", None)
        return reply

    async def command(self, cmd: str, a: dict) -> dict:
        d = self.daemon
        if cmd == "ping":
            return {}
        if cmd == "status":
            return d.status()
        if cmd == "peer":   # one peer by name, name.network or virtual IP; else why there is none
            return {"peer": d.resolve_peer(str(a["peer"])).to_json()}
        if cmd == "whois":  # the peer behind a share's loopback source address, a virtual IP or a name
            return whois(d, str(a["address"]))
        if cmd == "share":
            port = int(a["port"])
            if not 0 < port < 65536:
                raise RequestError("bad_request", f"port {port} out of range")
            d.shares.add(port, bool(a.get("udp")))
            d.prefs.add_share(port, bool(a.get("udp")))
            reply: dict = {"shares": d.shares.listing()}
            if nothing_listens(port, bool(a.get("udp"))):
                reply["warning"] = (f"nothing listens on 127.0.0.1:{port}{'/udp' if a.get('udp') else ''} yet: "
                                    "peers are refused until something does")
            return reply
        if cmd == "unshare":
            if not d.shares.remove(int(a["port"]), bool(a.get("udp"))):
                raise RequestError("not_shared", f"port {a['port']}{'/udp' if a.get('udp') else ''} is not shared")
            d.prefs.remove_share(int(a["port"]), bool(a.get("udp")))
            return {"shares": d.shares.listing()}
        if cmd == "forward":
            warning = d.forward_target_warning(a["peer"])
            r = await d.add_forward(int(a["listen"]), a["peer"], int(a["peer_port"]), bool(a.get("udp")))
            d.prefs.add_forward(int(r["listen"].rsplit(":", 1)[1]), r["peer"], int(a["peer_port"]), bool(a.get("udp")),
                                key=r["key"])
            return {**r, "warning": warning} if warning else r
        if cmd == "unforward":
            fwd = d.forwards.pop((int(a["listen"]), bool(a.get("udp"))), None)
            d.prefs.remove_forward(int(a["listen"]), bool(a.get("udp")))
            if fwd is None:
                raise RequestError("not_forwarded", f"port {a['listen']}{'/udp' if a.get('udp') else ''} is not forwarded")
            fwd.close()
            return {}
        if cmd == "netcheck":
            if d.dataplane.server_udp is None:
                raise NotConnected("not connected to the server yet")
            await asyncio.wait_for(d.dataplane.start_probe(), 10)
            return {"udp": d.dataplane.udp_ok, "nat": d.dataplane.nat_summary(),
                    "port_mapping": d.dataplane.port_mapping_summary(), "local_port": d.dataplane.port, "server": d.client.server if d.client else None,
                    "candidates": d.dataplane.local_candidates(), "ipv6": d.dataplane.ipv6_summary(),
                    "turn": d.dataplane.turn_summary()}
        if cmd == "ping_peer":
            return await d.ping(a["peer"], min(10.0, float(a.get("wait", 2.0))))
        if cmd == "retry_server":
            if d.client is not None:
                d.client.retry_now()
            return {}
        if cmd == "down":
            asyncio.get_running_loop().call_soon(d.stop)
            return {}
        if cmd == "create":
            msg = {"t": "create", "network": a["network"], "password": a["password"]}
            if a.get("approval"):
                msg["approval"] = True
            if a.get("max_members"):
                msg["max_members"] = int(a["max_members"])
            return await self._server(msg)
        if cmd == "join":
            return await self._server({"t": "join", "network": a["network"], "password": a["password"]})
        if cmd == "leave":
            return await self._server({"t": "leave", "network": a["network"]})
        if cmd == "chat":
            return await self._server({"t": "chat", "network": a["network"], "text": a["text"]})
        if cmd == "history":
            name = normalize_name(a["network"], "network name")
            await self._server({"t": "history", "network": name})
            view = d.state.networks.get(name)
            return {"network": name, "messages": list(view.chat) if view else []}
        if cmd == "admin":
            msg = {"t": "admin", "network": a["network"], "action": a["action"]}
            if a.get("target") is not None:
                msg["target"] = a["target"]
            if a.get("value") is not None:
                msg["value"] = int(a["value"])
            if a.get("password") is not None:
                msg["password"] = a["password"]
            if a.get("prefix") is not None:
                msg["prefix"] = a["prefix"]
            reply = await self._server(msg)
            if a["action"] in ("approve", "reject", "ban") and a.get("target"):
                d.state.forget_pending(normalize_name(a["network"], "network name"), a["target"].strip().lower())
            return reply
        if cmd == "presence":
            online = bool(a["online"])
            reply = await self._server({"t": "presence", "network": a["network"], "online": online})
            net = reply["network"]
            (d.state.away.discard if online else d.state.away.add)(net)
            d.prefs.set_away(net, not online)
            d.sync_peers()
            return reply
        if cmd == "rename":
            name = normalize_name(a["name"], "node name")
            if d.client is not None:
                await self._server({"t": "rename", "name": name})
                d.client.name = name  # the next hello (reconnect) uses it too
            d.name = name
            d.state.me["name"] = name
            d.names_changed()   # DNS answers the new name at once
            d.prefs.remember(server=d.client.server_list if d.client else None, name=name)
            return {"name": name}
        raise RequestError("unknown_command", f"unknown command {cmd!r}")


def whois(d: Daemon, text: str) -> dict:
    """The peer a loopback address (127.B.C.D, as a shared service sees it), a virtual IP or a name
    stands for."""
    t = text.strip()
    pool = d.dataplane.pool
    try:
        loopback = ipaddress.IPv4Address(t).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        if pool is None:
            raise NotConnected("this node does not know its server's address pool yet: it is not connected")
        vip = vip_for(t, pool)
        if vip is None:
            raise RequestError("unknown_peer", f"{t} stands for no peer: a connection from it is a program on this "
                               "machine, or a peer's while shares cannot use an address per peer (overlay status "
                               "says why) or from outside the pool (a host behind a gateway member, a static "
                               "WireGuard peer)")
        p = d.find_peer(vip)
        if p is None:
            if vip == d.state.me.get("ip"):
                raise RequestError("self", f"{t} stands for {vip}, this node's own virtual IP")
            raise RequestError("unknown_peer", f"{t} stands for {vip}, which no peer of this node has")
    else:
        p = d.resolve_peer(t)
    per_peer = d.kernel_if is None and d.shares.source_info()["mode"] == "per_peer"
    return {"query": t, "name": p.name, "virtual_ip": p.ip,
            "loopback": loopback_for(p.ip, pool) if per_peer else None,
            "networks": list(p.networks), "key": p.key_text, "online": p.online}
