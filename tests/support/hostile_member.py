"""A hostile member for lab tests: ``python hostile_member.py up ARGS`` runs ``overlay up ARGS``
altered so that it advertises its own virtual IP (its overlay device's address) as a LAN path
candidate, answers discovery from any source (the pool included) and lets its own outer packets
into its tunnel: what a member that wants its peers' outer packets to run in a loop through their
own tunnels would do. Only the test process starts it; nothing in the package knows of it.

``overlay up`` replaces itself with ``python -m overlay.node.run FD ...`` (the daemon); here that
exec comes back to this file (``--daemon FD ...``), which alters the data plane and runs the daemon.
"""

from __future__ import annotations

import os
import sys


def _alter() -> None:
    from overlay.node import dataplane
    addresses = dataplane.interface_addresses
    # every interface, the overlay device included, and no pool left out
    dataplane.interface_addresses = lambda exclude_ifaces=(), exclude_net=None: addresses()
    try:    # the defences this member does without (absent from older versions of the package)
        from overlay.node import tunnel_guard
    except ImportError:
        return
    tunnel_guard.TunnelGuard.blocked = lambda self, addr: False
    tunnel_guard.TunnelGuard.inside = lambda self, host: False
    tunnel_guard.own_outer_destination = lambda packet, port: None


def _exec_daemon(exe, argv):
    """``os.execv`` as the CLI calls it for the daemon, sent back to this file instead."""
    if argv[1:3] == ["-m", "overlay.node.run"]:
        argv = [argv[0], os.path.abspath(__file__), "--daemon", *argv[3:]]
    _execv(exe, argv)


_execv = os.execv

if __name__ == "__main__":
    if sys.argv[1:2] == ["--daemon"]:
        _alter()
        from overlay.node import run
        sys.exit(run.main(["run", *sys.argv[2:]]))
    os.execv = _exec_daemon
    from overlay.cli_base import main
    sys.argv[0] = "overlay"
    main()
