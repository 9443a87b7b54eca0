"""`overlay ui`: the daemon's local web page, through real processes (server and nodes started
through the CLI): who gets in, the headers, the live event stream and chat both ways."""

import http.client
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from cluster import OVERLAY, Cluster
from overlay.ui.guard import SECRET_FILE

HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
           "cache-control": "no-store"}


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path) as c:
        c.start_server()
        yield c


def request(address: str, method: str, path: str, headers: dict | None = None, body: dict | None = None):
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None, headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def check_headers(headers: dict) -> None:
    for k, v in HEADERS.items():
        assert headers.get(k) == v, (k, headers)
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp


class Events:
    """An open /events stream, read event by event."""

    def __init__(self, address: str, cookie: str):
        host, port = address.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=15)
        self.conn.request("GET", "/events", headers={"Cookie": cookie})
        self.r = self.conn.getresponse()
        assert self.r.status == 200 and self.r.getheader("Content-Type").startswith("text/event-stream")

    def next(self, kind: str, cond=lambda data: True, limit: int = 200) -> dict:
        for _ in range(limit):
            event, data = None, None
            while True:
                line = self.r.readline().decode()
                assert line, "the event stream ended"
                line = line.rstrip("\n")
                if not line:
                    break
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
            if event == kind and cond(data):
                return data
        raise AssertionError(f"no {kind} event")

    def close(self) -> None:
        self.conn.close()


def test_ui_page_guards_events_and_chat(cluster):
    a = cluster.start_node("alice")
    b = cluster.start_node("bob", "--ui", "off")
    a.ok("create", "games", "--password", "pw")
    b.ok("join", "games", "--password", "pw")

    # the UI off: no address, and `overlay ui` says how to turn it on
    assert b.status()["ui"] is None
    assert "the web page is off" in b.fails("ui", "--no-open")

    url = a.ok("ui", "--no-open").strip()
    address = a.status()["ui"]
    # a taken address, or one beyond loopback, is one error line naming the fix
    carol = cluster.tmp / "home-carol"
    r = subprocess.run([*OVERLAY, "up", "--server", cluster.server_addr, "--name", "carol", "--socks", "127.0.0.1:0",
                        "--ui", address, "--home", str(carol)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and f"cannot serve the web page on {address}" in r.stderr and "--ui off" in r.stderr
    r = subprocess.run([*OVERLAY, "up", "--server", cluster.server_addr, "--name", "carol", "--ui", "0.0.0.0:0",
                        "--home", str(carol)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "--ui: 0.0.0.0 is not a loopback address" in r.stderr
    secret = (a.home / SECRET_FILE).read_text().strip()
    assert stat.S_IMODE((a.home / SECRET_FILE).stat().st_mode) == 0o600
    assert url == f"http://{address}/?s={secret}" and address.startswith("127.0.0.1:")

    # no cookie: 403 (with the headers all the same)
    status, headers, _ = request(address, "GET", "/")
    assert status == 403
    check_headers(headers)
    assert request(address, "GET", "/events")[0] == 403
    assert request(address, "GET", "/?s=" + "x" * 43)[0] == 403

    # the secret URL: a redirect to a clean URL that sets the cookie
    status, headers, _ = request(address, "GET", url.split(address, 1)[1])
    assert status == 303 and headers["location"] == "/"
    set_cookie = headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    cookie = set_cookie.split(";", 1)[0]
    assert cookie.endswith("=" + secret)

    status, headers, body = request(address, "GET", "/", {"Cookie": cookie})
    assert status == 200
    check_headers(headers)
    html = body.decode()
    assert '<script src="/app.js"' in html and "<script>" not in html
    csrf = re.search(r'<meta name="csrf" content="([0-9a-f]{64})">', html).group(1)
    status, headers, js = request(address, "GET", "/app.js", {"Cookie": cookie})
    assert status == 200 and headers["content-type"].startswith("text/javascript") and b"EventSource" in js
    assert request(address, "GET", "/app.css", {"Cookie": cookie})[0] == 200

    # DNS rebinding: a foreign Host header is refused, cookie or not
    assert request(address, "GET", "/", {"Cookie": cookie, "Host": f"evil.example:{address.split(':')[1]}"})[0] == 403

    # cross-site POSTs: without Origin, with a foreign one, without the CSRF token
    good = {"Cookie": cookie, "Origin": f"http://{address}", "X-CSRF-Token": csrf,
            "Content-Type": "application/json"}
    chat = {"network": "games", "text": "forged"}
    for bad in ({k: v for k, v in good.items() if k != "Origin"}, {**good, "Origin": "http://evil.example"},
                {k: v for k, v in good.items() if k != "X-CSRF-Token"}, {k: v for k, v in good.items() if k != "Cookie"}):
        status, headers, _ = request(address, "POST", "/api/chat", bad, chat)
        assert status == 403
        check_headers(headers)

    # the event stream: the status first, then a chat line sent from another node's CLI
    ev = Events(address, cookie)
    try:
        st = ev.next("status")
        assert st["node"]["name"] == "alice" and st["ui"] == address
        assert [n["name"] for n in st["networks"]] == ["games"]
        # the tunnel's traffic per peer, in the status the page gets
        a.ok("ping", "bob", "-c", "1")
        ev.next("status", lambda d: any(p["name"] == "bob" and p["rx_bytes"] > 0 and p["tx_bytes"] > 0
                                        for p in d["peers"]))
        b.ok("chat", "games", "hello from the CLI")
        line = ev.next("chat", lambda d: d["text"] == "hello from the CLI")
        assert line["from"] == "bob" and line["network"] == "games"

        # a chat line sent from the page reaches bob's `overlay chat --follow`
        follow = subprocess.Popen([*OVERLAY, "chat", "games", "--follow", "--json", "--home", str(b.home)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert "following chat of games" in follow.stderr.readline()
            status, _, body = request(address, "POST", "/api/chat", good, {"network": "games", "text": "hi from the page"})
            assert status == 200 and json.loads(body)["ok"] is True
            line = json.loads(follow.stdout.readline())
            assert line["text"] == "hi from the page" and line["from"] == "alice"
        finally:
            follow.terminate()
            follow.wait(5)
        # ... and shows on the page's own stream too
        ev.next("chat", lambda d: d["text"] == "hi from the page")
    finally:
        ev.close()

    # an error is the CLI's one line; the forged lines never reached the chat
    cli_error = a.fails("chat", "nosuchnet", "x")
    status, _, body = request(address, "POST", "/api/chat", good, {"network": "nosuchnet", "text": "x"})
    reply = json.loads(body)
    assert reply["ok"] is False and reply["error"] in cli_error
    assert "forged" not in a.ok("chat", "games", "--history")
    # only the page's commands: not `down`
    status, _, body = request(address, "POST", "/api/down", good, {})
    assert json.loads(body)["ok"] is False and a.connected()


OTHER_USER = """
import http.client, json, sys
out = {}
try:
    open(sys.argv[1]).read()
    out["secret"] = "read"
except PermissionError:
    out["secret"] = "refused"
host, port = sys.argv[2].rsplit(":", 1)
for path in ("/", "/?s=" + "x" * 43, "/events"):
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request("GET", path)
    out[path] = c.getresponse().status
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.access("/usr/bin/python3", os.X_OK),
                    reason="needs root, setpriv and a system python3 to act as another user")
def test_another_local_user_cannot_read_the_secret_or_use_the_page():
    # a folder every user may enter (pytest's tmp_path is root's alone, which would hide the file's mode)
    top = Path(tempfile.mkdtemp(prefix="overlay-ui-"))
    try:
        os.chmod(top, 0o711)
        with Cluster(top) as c:
            c.start_server()
            a = c.start_node("alice")
            address = a.status()["ui"]
            os.chmod(a.home, 0o711)   # even in a home others may enter, the secret is the owner's alone
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                                "-c", OTHER_USER, str(a.home / SECRET_FILE), address],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout) == {"secret": "refused", "/": 403, "/?s=" + "x" * 43: 403, "/events": 403}
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_hostile_requests_get_an_error_and_the_daemon_goes_on(cluster):
    import socket
    a = cluster.start_node("alice")
    address = a.status()["ui"]
    host, port = address.rsplit(":", 1)

    def raw(data: bytes) -> bytes:
        with socket.create_connection((host, int(port)), timeout=15) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    assert raw(b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(b"GET / HTTP/1.1\r\nHost: " + address.encode() + b"\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
               ).startswith(b"HTTP/1.1 400")
    secret = (a.home / SECRET_FILE).read_text().strip()
    big = (b"POST /api/chat HTTP/1.1\r\nHost: " + address.encode() + b"\r\nContent-Length: 100000\r\n"
           b"Cookie: overlay_ui_" + port.encode() + b"=" + secret.encode() + b"\r\n\r\n" + b"x" * 100)
    assert raw(big).startswith(b"HTTP/1.1 400")
    assert a.connected() and request(address, "GET", "/")[0] == 403
