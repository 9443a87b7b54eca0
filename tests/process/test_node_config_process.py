"""`overlay up` reports a bad config.toml setting in one line. The validation itself:
tests/unit/node/test_node_config.py."""

from __future__ import annotations

import subprocess
from cluster import OVERLAY


def test_overlay_up_reports_a_bad_setting_in_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('server = "127.0.0.1:9"\nname = "n"\nkeepalive = 3\n')
    r = subprocess.run([*OVERLAY, "up", "--home", str(home)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"error: {home / 'config.toml'}: keepalive = 3: expected a number of seconds "
                                "from 7 to 600"), r.stderr
    (home / "config.toml").write_text('[[share]]\nport = 8000\nproto = "sctp"\n')
    r = subprocess.run([*OVERLAY, "up", "--home", str(home)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and 'proto = "sctp": expected "tcp" or "udp"' in r.stderr, r.stderr
