"""A home whose path is too long for a Unix socket: one clear error line, no traceback."""

from __future__ import annotations

import subprocess
import sys

OVERLAY = [sys.executable, "-m", "overlay"]


def test_a_home_too_deep_for_the_api_socket_says_so(tmp_path):
    home = tmp_path / ("d" * 60) / ("e" * 60)
    up = subprocess.run([*OVERLAY, "up", "--server", "127.0.0.1:9", "--name", "deep", "--home", str(home),
                         "--socks", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    status = subprocess.run([*OVERLAY, "status", "--home", str(home)], capture_output=True, text=True, timeout=30)
    for r in (up, status):
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        assert "error:" in r.stderr and "too deep for its API socket" in r.stderr and "--home" in r.stderr, r.stderr
