"""The local web page's HTTP server in the node daemon: asyncio streams + h11 (the HTTP/1.1
parser; see pyproject.toml for why not a framework), one request per connection.

Routes (every one behind overlay/ui/guard.py): ``/?s=SECRET`` (sets the cookie), ``/`` and its
two files (static/), ``GET /events`` (server-sent events: ``status`` when the status JSON
changes, ``chat`` per chat line), ``POST /api/COMMAND`` (a JSON object of arguments for the
daemon's local API command, answered as the CLI is: ``{"ok": false, "error": LINE}`` on error).

Nothing runs while no page is open: an event stream hooks into the local API's followers and
ticks (counters) only while it is connected. Sizes, times and connections are bounded.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from importlib import resources
from typing import TYPE_CHECKING, Callable

import h11

from overlay.hostport import parse_hostport
from overlay.ui.guard import SECURITY_HEADERS, Guard, load_secret

if TYPE_CHECKING:
    from pathlib import Path

    from overlay.node.local_api import LocalApi

log = logging.getLogger("overlay.ui")

MAX_HEAD = 16 * 1024          # request line + headers
MAX_BODY = 16 * 1024          # a POST's JSON
REQUEST_TIMEOUT = 10.0        # to send the whole request
MAX_CONNECTIONS = 32
MAX_STREAMS = 8               # open /events streams (tabs)
STALLED = 30.0                # an event stream whose reader stops reading that long is closed
TICK = 1.5                    # seconds between status checks while a stream is open (counters)
STREAM_QUEUE = 200
# the local API commands the page may run (POST /api/COMMAND)
COMMANDS = frozenset({"chat", "history", "ping_peer", "share", "unshare", "forward", "unforward", "create",
                      "join", "leave", "admin", "presence", "status"})
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}


class UiServer:
    def __init__(self, api: LocalApi, status: Callable[[], dict], home: Path, address: str):
        self.api = api
        self.status = status
        self.home = home
        self.host, self.port = parse_hostport(address, allow_zero=True)
        self.guard: Guard | None = None
        self._server: asyncio.Server | None = None
        self._connections = 0
        self._queues: set[asyncio.Queue] = set()   # the open /events streams

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        self.guard = Guard(load_secret(self.home), self.host, self.port)

    @property
    def address(self) -> str:
        assert self.guard is not None
        return self.guard.host

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    # ------------------------------------------------------------------ one connection
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            try:
                req, body = await asyncio.wait_for(self._read_request(conn, reader), REQUEST_TIMEOUT)
            except (h11.RemoteProtocolError, ValueError) as e:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._send(conn, writer, 400, f"bad request: {e}".encode(), "text/plain")
                return
            except asyncio.TimeoutError:
                return
            if req is None:
                return
            await self._handle(conn, reader, writer, req, body)
        except (ConnectionError, h11.LocalProtocolError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._connections -= 1
            writer.close()

    @staticmethod
    async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[h11.Request | None, bytes]:
        req = None
        body = bytearray()
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await reader.read(8192)
                conn.receive_data(data)
                if not data and conn.their_state != h11.DONE:
                    return None, b""
                continue
            if isinstance(ev, h11.Request):
                req = ev
                length = dict(ev.headers).get(b"content-length")
                if length is not None and int(length) > MAX_BODY:
                    raise ValueError("request body too large")
            elif isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > MAX_BODY:
                    raise ValueError("request body too large")
            elif isinstance(ev, h11.EndOfMessage):
                return req, bytes(body)
            elif isinstance(ev, h11.ConnectionClosed):
                return None, b""

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: bytes,
                    ctype: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close"),
                   *SECURITY_HEADERS, *extra]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers, reason=http.HTTPStatus(status).phrase)))
        writer.write(conn.send(h11.Data(data=body)) if body else b"")
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _handle(self, conn: h11.Connection, reader, writer, req: h11.Request, body: bytes) -> None:
        assert self.guard is not None
        method, target = req.method.decode("ascii", "replace"), req.target.decode("ascii", "replace")
        headers: dict[str, str] = {}
        for name, value in req.headers:
            key = name.decode("latin-1")
            sep = "; " if key == "cookie" else ", "
            text = value.decode("latin-1")
            headers[key] = headers[key] + sep + text if key in headers else text
        verdict = self.guard.check(method, target, headers)
        if verdict.status == 303:
            await self._send(conn, writer, 303, b"", "text/plain", verdict.headers)
            return
        if verdict.status:
            await self._send(conn, writer, verdict.status, verdict.reason.encode() + b"\n", "text/plain; charset=utf-8",
                             verdict.headers)
            return
        path = target.partition("?")[0]
        if method in ("GET", "HEAD") and path in STATIC:
            name, ctype = STATIC[path]
            data = resources.files("overlay.ui").joinpath("static", name).read_bytes()
            if name == "index.html":
                data = data.replace(b"{{csrf}}", self.guard.csrf.encode())
            await self._send(conn, writer, 200, data if method == "GET" else b"", ctype)
            return
        if method == "GET" and path == "/events":
            await self._events(conn, reader, writer)
            return
        if method == "POST" and path.startswith("/api/"):
            await self._command(conn, writer, path[len("/api/"):], body)
            return
        await self._send(conn, writer, 404, b"not found\n", "text/plain; charset=utf-8")

    async def _command(self, conn, writer, cmd: str, body: bytes) -> None:
        if cmd not in COMMANDS:
            reply: dict = {"ok": False, "code": "unknown_command", "error": f"unknown command {cmd!r}"}
        else:
            try:
                args = json.loads(body or b"{}")
                if not isinstance(args, dict):
                    raise ValueError("expected a JSON object")
            except ValueError as e:
                reply = {"ok": False, "code": "bad_request", "error": f"bad request: {e}"}
            else:
                reply = await self.api.answer(cmd, args)
                for q in self._queues:       # the pages show what the command changed at once
                    if not q.full():
                        q.put_nowait({"t": "refresh"})
        await self._send(conn, writer, 200, json.dumps(reply).encode(), "application/json")

    # ------------------------------------------------------------------ server-sent events
    async def _events(self, conn, reader, writer) -> None:
        if len(self._queues) >= MAX_STREAMS:
            await self._send(conn, writer, 503, b"too many open pages\n", "text/plain; charset=utf-8")
            return
        q: asyncio.Queue = asyncio.Queue(STREAM_QUEUE)
        self._queues.add(q)
        self.api.followers.add(q)
        loop = asyncio.get_running_loop()
        eof = loop.create_task(reader.read(1))   # the page hung up
        get = None
        try:
            writer.write(conn.send(h11.Response(status_code=200, headers=[
                ("Content-Type", "text/event-stream; charset=utf-8"), *SECURITY_HEADERS])))
            last = ""
            while True:
                text = json.dumps(self.status(), sort_keys=True)
                if text != last:
                    writer.write(conn.send(h11.Data(data=b"event: status\ndata: " + text.encode() + b"\n\n")))
                    last = text
                await asyncio.wait_for(writer.drain(), STALLED)   # a page that stops reading is dropped
                get = loop.create_task(q.get())
                done, _ = await asyncio.wait({get, eof}, timeout=TICK, return_when=asyncio.FIRST_COMPLETED)
                if eof in done:
                    return
                if get not in done:
                    get.cancel()
                    continue
                ev = get.result()
                if ev.get("t") == "stopping":
                    return
                if ev.get("t") == "chat":
                    writer.write(conn.send(h11.Data(data=b"event: chat\ndata: " + json.dumps(ev).encode() + b"\n\n")))
        finally:
            self.api.followers.discard(q)
            self._queues.discard(q)
            for task in (eof, get):
                if task is not None:
                    task.cancel()


async def start(api: LocalApi, status: Callable[[], dict], home: Path, address: str) -> UiServer:
    srv = UiServer(api, status, home, address)
    await srv.start()
    log.info("web page on http://%s/ (`overlay ui` opens it)", srv.address)
    return srv


