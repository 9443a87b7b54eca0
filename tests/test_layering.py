"""Layering rules between packages, checked on what actually gets imported."""

from __future__ import annotations

import subprocess
import sys


def _imported_by(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_the_server_and_the_relay_do_not_depend_on_the_proxy():
    for module in ("overlay.server.app", "overlay.relay.server"):
        mods = _imported_by(module)
        assert module in mods
        assert not {m for m in mods if m == "proxy" or m.startswith(("proxy.", "overlay.proxy"))}, module
