"""``overlay service``: run the node as a systemd user service (install, uninstall).

The unit runs a bare ``overlay up --home HOME``: the server and name live in the home (prefs.json),
where ``up`` finds them, so changing them never means rewriting the unit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from overlay.cli_base import err, fail, out
from overlay.cli_options import HELP_OPTIONS, HomeOpt
from overlay.node.home import Home

service_app = typer.Typer(no_args_is_help=True, context_settings=HELP_OPTIONS,
                          help="Run the node as a systemd user service.")


def _unit_name(h: Home) -> str:
    """overlay.service for the default home; overlay-<hash of the home>.service for any other, so
    each node on the machine gets its own unit."""
    from overlay.node.home import default_home
    if h.path.resolve() == default_home().resolve():
        return "overlay.service"
    import hashlib
    return f"overlay-{hashlib.sha256(str(h.path.resolve()).encode()).hexdigest()[:8]}.service"


def _unit_path(unit: str) -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "systemd" / "user" / unit


@service_app.command("install")
def service_install(server: Optional[str] = typer.Option(None, "--server", help="Mediation server HOST:PORT (or A:P,B:P) "
                                                         "(remembered for `overlay up`, as by `up --server`)."),
                    name: Optional[str] = typer.Option(None, "--name", help="This node's name (remembered, "
                                                       "default: the host name)."),
                    home: Optional[Path] = HomeOpt):
    """Write and enable a systemd user unit running `overlay up` for this home (no admin rights needed)."""
    from overlay.node.prefs import Prefs
    from overlay.node.settings import (
        NO_SERVER,
        SettingsError,
        check_server_and_name,
        server_and_name,
    )
    h = Home(home)
    cfg = h.config()
    prefs = Prefs(h.path)
    server, name = server_and_name(server, name, cfg, prefs)
    if not server:
        fail(NO_SERVER)
    try:
        name = check_server_and_name(server, name)
    except SettingsError as e:
        fail(str(e))
    unit = _unit_name(h)
    path = _unit_path(unit)
    _require_systemd(f"`overlay up --home {h.path.resolve()}` in your init system or container entrypoint "
                     "instead; nothing was written")
    # the unit runs a bare `overlay up`: server and name live in the home, where `up` finds them
    h.ensure()
    prefs.remember(server=server, name=name)
    path.parent.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("overlay") or f"{sys.executable} -m overlay"
    path.write_text(
        f"[Unit]\nDescription=overlay VPN node ({h.path.resolve()})\nAfter=network-online.target\n\n"
        "[Service]\n"
        f"ExecStart={exe} up --home {h.path.resolve()}\n"
        "Restart=on-failure\nRestartSec=5\n\n"
        "[Install]\nWantedBy=default.target\n")
    out.print(f"wrote {path}", highlight=False, soft_wrap=True)
    problem = _systemctl("enable", "--now", unit)
    if problem:
        path.unlink(missing_ok=True)   # leave nothing behind that does not run
        fail(f"{problem}; removed {path} again")
    out.print(f"{unit} runs `overlay up --home {h.path.resolve()}` as {name} with server {server}", highlight=False, soft_wrap=True)
    _linger_hint()


@service_app.command("uninstall")
def service_uninstall(home: Optional[Path] = HomeOpt):
    """Stop, disable and remove the systemd user unit of this home."""
    unit = _unit_name(Home(home))
    path = _unit_path(unit)
    if not path.exists():
        fail(f"no unit installed at {path}" + ("" if home else " (installed for another home? give its --home)"))
    running = _systemd_running()
    problem = _systemctl("disable", "--now", unit) if running else None
    path.unlink(missing_ok=True)   # whatever systemctl answered
    if problem:
        fail(f"{problem}; removed {path} anyway")
    out.print(f"removed {path}" + ("" if running else " (systemd is not running here: nothing to stop)"),
              highlight=False, soft_wrap=True)
    if running:
        subprocess.run(["systemctl", "--user", "daemon-reload"], capture_output=True)


def _systemd_running() -> bool:
    """Whether systemd runs this machine (PID 1); False in most containers. `systemctl
    is-system-running` answers "offline" there (and systemd's own sd_booted() checks /run/systemd/system)."""
    if shutil.which("systemctl") is None:
        return False
    try:
        r = subprocess.run(["systemctl", "is-system-running"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.stdout.strip() != "offline"


def _require_systemd(instead: str) -> None:
    if shutil.which("systemctl") is None:
        fail(f"systemctl not found: this machine has no systemd to run the service; run {instead}")
    if not _systemd_running():
        init = Path("/proc/1/comm").read_text().strip() if Path("/proc/1/comm").exists() else "another program"
        fail(f"systemd is not running on this machine (PID 1 is {init}, as in most containers): no service can "
             f"be installed; run {instead}")


def _systemctl(*args: str) -> Optional[str]:
    """Run `systemctl --user ARGS` (after a daemon-reload): None once done, else the error line to show."""
    command = f"systemctl --user {' '.join(args)}"
    r = subprocess.run(["systemctl", "--user", "daemon-reload"], capture_output=True, text=True)
    if r.returncode == 0:
        r = subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True)
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip().splitlines()
        return (f"{command} failed: {why[-1] if why else f'exit status {r.returncode}'}"
                + (" (no user session bus: log in as this user, or run `loginctl enable-linger` as root)"
                   if why and "bus" in why[-1].lower() else ""))
    out.print(f"{command}: done", highlight=False, soft_wrap=True)
    return None


def _linger_hint() -> None:
    """A user service stops at logout unless the user lingers: say how to keep it running."""
    import getpass
    if shutil.which("loginctl") is None:
        return
    user = getpass.getuser()
    r = subprocess.run(["loginctl", "show-user", user, "--property=Linger", "--value"], capture_output=True,
                       text=True)
    if r.returncode == 0 and r.stdout.strip() == "no":
        err.print(f"[yellow]note:[/] the node runs only while {user} is logged in; to keep it running without "
                  f"a login: loginctl enable-linger {user}", highlight=False, soft_wrap=True)
