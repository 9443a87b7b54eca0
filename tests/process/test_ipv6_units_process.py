"""The server's IPv6 listen addresses, checked by `overlay server` itself. The IPv6 pieces in process:
tests/unit/node/test_ipv6_units.py."""

from __future__ import annotations



def test_server_listen_addresses_share_one_port(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "overlay", "server", "--listen", "127.0.0.1:7000",
                        "--listen", "[::1]:7001", "--data", str(tmp_path / "srv")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "error: every --listen address takes the same port, each address once"), r.stderr
