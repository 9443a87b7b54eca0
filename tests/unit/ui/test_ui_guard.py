"""The local web page's guard (overlay/ui/guard.py), sans-I/O: who gets in, what a POST needs."""

import os
import stat

from overlay.ui.guard import SECRET_FILE, Guard, load_secret, read_secret

SECRET = "A" * 43
HOST = "127.0.0.1:8123"


def guard() -> Guard:
    return Guard(SECRET, "127.0.0.1", 8123)


def cookie(value: str = SECRET) -> str:
    return f"theme=dark; overlay_ui_8123={value}"


def test_secret_url_sets_a_strict_http_only_cookie_and_redirects_to_a_clean_url():
    v = guard().check("GET", f"/?s={SECRET}", {"host": HOST})
    h = dict(v.headers)
    assert v.status == 303 and h["Location"] == "/"
    assert h["Set-Cookie"].startswith(f"overlay_ui_8123={SECRET};")
    assert "HttpOnly" in h["Set-Cookie"] and "SameSite=Strict" in h["Set-Cookie"]


def test_wrong_secret_and_no_cookie_are_refused():
    assert guard().check("GET", "/?s=" + "B" * 43, {"host": HOST}).status == 403
    assert guard().check("GET", "/", {"host": HOST}).status == 403
    assert guard().check("GET", "/events", {"host": HOST, "cookie": cookie("B" * 43)}).status == 403
    # another node's cookie on the same machine (another port) does not open this one
    assert guard().check("GET", "/", {"host": HOST, "cookie": f"overlay_ui_9000={SECRET}"}).status == 403
    assert guard().check("GET", "/", {"host": HOST, "cookie": cookie()}).status == 0


def test_host_header_must_be_the_listening_address_exactly():
    for host in ("evil.example:8123", "localhost:8123", "127.0.0.1", "127.0.0.1:8124", None):
        headers = {"cookie": cookie()} if host is None else {"host": host, "cookie": cookie()}
        assert guard().check("GET", "/", headers).status == 403, host
    # the secret URL is refused on a foreign Host too (a rebinding page must not get the cookie set)
    assert guard().check("GET", f"/?s={SECRET}", {"host": "evil.example:8123"}).status == 403


def test_post_needs_cookie_same_origin_and_csrf_token():
    g = guard()
    good = {"host": HOST, "cookie": cookie(), "origin": f"http://{HOST}", "x-csrf-token": g.csrf}
    assert g.check("POST", "/api/chat", good).status == 0
    assert g.check("POST", "/api/chat", {**good, "origin": "http://evil.example"}).status == 403
    assert g.check("POST", "/api/chat", {**good, "origin": "null"}).status == 403
    assert g.check("POST", "/api/chat", {k: v for k, v in good.items() if k != "origin"}).status == 403
    assert g.check("POST", "/api/chat", {**good, "x-csrf-token": "0" * 64}).status == 403
    assert g.check("POST", "/api/chat", {k: v for k, v in good.items() if k != "cookie"}).status == 403
    assert g.check("PUT", "/api/chat", good).status == 405


def test_ipv6_loopback_host_is_bracketed():
    g = Guard(SECRET, "::1", 8123)
    assert g.host == "[::1]:8123" and g.origin == "http://[::1]:8123"
    assert g.check("GET", "/", {"host": "[::1]:8123", "cookie": cookie()}).status == 0


def test_secret_file_is_private_and_kept_across_restarts(tmp_path):
    s = load_secret(tmp_path)
    path = tmp_path / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(tmp_path) == s == read_secret(tmp_path)
    # a secret others could read is replaced
    os.chmod(path, 0o644)
    s2 = load_secret(tmp_path)
    assert s2 != s and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("short\n")
    assert read_secret(tmp_path) is None and load_secret(tmp_path) != "short"
