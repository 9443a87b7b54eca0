"""The node daemon's process: ``overlay up`` validates its options, then replaces itself with
``python -m overlay.node.run`` (same PID), so the daemon does not carry the CLI's libraries
(typer, rich, pydantic: ~14 MiB resident and ~100 ms of imports) for its whole life.

The settings (``NodeSettings`` of overlay/node/settings.py, as JSON) travel through an inherited
pipe, never the command line or the environment (proxy passwords must not show in ``ps``). Failures are one ``error:`` line and exit status 1,
as from the CLI.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys

from overlay.escape import log_to_stderr


def read_settings(fd: int) -> dict:
    with os.fdopen(fd, "rb") as f:
        return json.loads(f.read())


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[1].isdigit():
        print("error: overlay.node.run is started by `overlay up`", file=sys.stderr)
        return 1
    s = read_settings(int(argv[1]))
    log_to_stderr(s.get("log_level", "INFO"))   # peer and LAN strings in log lines: escaped
    from overlay.node.daemon import DaemonError, run_daemon
    from overlay.node.home import Home, HomeError
    from overlay.node.settings import NodeSettings
    home, settings = Home(s["home"]), NodeSettings.from_json(s["settings"])
    # What the imports made (most of the heap, there for the daemon's life) leaves the collector's
    # view: the full collections that many short connections set off do not walk it every time.
    gc.freeze()
    try:
        asyncio.run(run_daemon(home, settings))
    except (DaemonError, HomeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
