"""Structure rules: layering between packages (checked on what gets imported), shared primitives."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imported_by(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_server_and_the_relay_do_not_depend_on_the_proxy():
    for module in ("overlay.server.app", "overlay.relay.server"):
        mods = _imported_by(module)
        assert module in mods
        assert not {m for m in mods if m == "proxy" or m.startswith(("proxy.", "overlay.proxy"))}, module


def test_every_rate_limit_is_the_one_token_bucket():
    """No hand-written buckets: each rate limit's table holds ``overlay.tokenbucket.TokenBucket``s."""
    from types import SimpleNamespace

    from overlay import crypto
    from overlay.nat import DiscoCodec, PeerPath
    from overlay.ratelog import LogLimiter
    from overlay.relay.server import RelayServer
    from overlay.tokenbucket import TokenBucket
    from overlay.wire.ratelimit import RateLimiter

    relay = RelayServer(lambda a, b: True)
    assert relay._spend(b"k" * 32, 10, 0.0) and isinstance(relay._buckets[b"k" * 32], TokenBucket)
    limiter = RateLimiter()
    assert limiter.allow(("192.0.2.1", 1), 0.0) and isinstance(limiter._buckets["192.0.2.1"], TokenBucket)
    logs = LogLimiter()
    assert logs.allow("%s: refused", 0.0) == (True, 0)
    assert isinstance(logs._buckets["%s: refused"][0], TokenBucket)
    path = PeerPath(DiscoCodec(crypto.generate_private_key()), b"p" * 32)
    assert path._probe_allowed(("192.0.2.2", 41641), 0.0) and isinstance(path._probes, TokenBucket)
    from overlay.server.app import ControlConnection
    conn = ControlConnection(SimpleNamespace(private_key=crypto.generate_private_key()))
    assert isinstance(conn.requests, TokenBucket)


def test_host_port_text_has_one_parser():
    from overlay import hostport
    from overlay.nat import candidate
    from overlay.wire import standalone

    assert candidate.parse_hostport is hostport.parse_hostport
    assert standalone.parse_hostport is hostport.parse_hostport and not hasattr(standalone, "_hostport")
    with pytest.raises(candidate.AddressError, match="bad address"):
        candidate.parse_addr("[2001:db8::1:80")           # half a bracket pair
