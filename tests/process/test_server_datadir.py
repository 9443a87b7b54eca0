"""The server's data directory is owner-only, and an exposed one is fixed at start (issue 9.5)."""

from __future__ import annotations

import os
import stat

from cluster import Cluster


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_data_directory_is_private_and_fixed_at_start(tmp_path):
    old = os.umask(0o022)           # the common umask: files 0644, directories 0755 unless asked
    try:
        with Cluster(tmp_path) as c:
            c.start_server()
            a = c.start_node("alice")
            a.ok("create", "net", "--password", "pw")
            a.ok("chat", "net", "secret plans")
            data = tmp_path / "server"
            files = sorted(p.name for p in data.iterdir())
            assert {"server.key", "overlay.db"} <= set(files)
            assert _mode(data) == 0o700
            assert {p: _mode(data / p) for p in files} == {p: 0o600 for p in files}
            assert "open to other users" not in c.server.output()

            # an exposed directory (an older server, a restored backup) is fixed with a warning
            c.stop_server()
            os.chmod(data, 0o755)
            for p in data.iterdir():
                os.chmod(p, 0o644)
            c.start_server()
            c.wait(a.connected, timeout=30, what="alice back")
            assert _mode(data) == 0o700
            assert all(_mode(p) == 0o600 for p in data.iterdir())
            log = c.server.output()
            assert f"{data} was open to other users (mode 0755); now 0700" in log
            assert f"{data / 'overlay.db'} was open to other users (mode 0644); now 0600" in log
            assert "secret plans" in a.ok("chat", "net", "--history")
    finally:
        os.umask(old)
