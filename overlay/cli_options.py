"""The options and arguments many ``overlay`` commands share (typer), in one place."""

from __future__ import annotations

import typer

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
HomeOpt = typer.Option(None, "--home", envvar="OVERLAY_HOME", help="Node home directory (key, config, socket).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output (see docs/json.md).")
LogLevelOpt = typer.Option("info", "--log-level", help="Log detail: debug, info, warning or error.")
UdpOpt = typer.Option(False, "--udp", help="UDP instead of TCP (same as PORT/udp).")
NetworkArg = typer.Argument(..., help="Network name.")
