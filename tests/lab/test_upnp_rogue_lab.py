"""A rogue UPnP device on the LAN (``rogue_igd.py`` on the site's router: it answers SSDP with a
LOCATION whose description never ends) against ``overlay up`` nodes started through the CLI.

The node's UPnP attempt must end with an error within its time limit, and the daemon's memory
peak (``VmHWM``) must stay within 50 MB of a node's on a site without the device: miniupnpc runs
in a capped worker process (``overlay/nat/upnp_worker.py``), so the endless description costs a
dead worker, not the node.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from repo_paths import SUPPORT
import lab
import natlab
from lab_overlay import LabNode, OverlayLab

pytestmark = pytest.mark.netns

ROGUE = SUPPORT / "rogue_igd.py"
MB = 1 << 20


@pytest.fixture(scope="module")
def env():
    lab.require_lab("conntrack")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    try:
        ol.start_server()
        ref = nl.add_site("ref", "port_restricted")
        r = ol.start_node(ref.hosts[0].name, "reference", "--port-mapping", "upnp")
        ol.wait_connected(r)
        ol.wait(lambda: upnp_error(r), 60, "the reference node's UPnP discovery to fail (no device)")
        yield nl, ol, hwm(r)
    finally:
        ol.close()
        nl.close()


def upnp_error(n: LabNode) -> str | None:
    pm = json.loads(n.ok("netcheck", "--json"))["port_mapping"]
    return pm and pm["upnp"] and pm["upnp"]["error"]


def hwm(n: LabNode) -> int:
    """The daemon's peak resident memory in bytes (``overlay up`` execs into the daemon: same PID)."""
    for line in Path(f"/proc/{n.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("mode", ["stream", "drip"])
def test_endless_description_from_a_rogue_device_is_bounded(env, mode):
    nl, ol, ref_hwm = env
    site = nl.add_site(f"rogue{mode[0]}", "port_restricted")
    rogue = nl.popen(site.name, [sys.executable, str(ROGUE), mode, str(site.lan[1])], label=f"rogue-{mode}")
    rogue.wait_for("ready")
    n = ol.start_node(site.hosts[0].name, f"victim{mode[0]}", "--port-mapping", "upnp")
    try:
        ol.wait_connected(n)
        ol.wait(lambda: "fetch from" in rogue.stdout(), 60, "the node fetching the rogue description")
        error = ol.wait(lambda: upnp_error(n), 60, "the node's UPnP attempt to end")
        grown = hwm(n) - ref_hwm
        print(f"{mode}: daemon VmHWM {hwm(n) / MB:.1f} MB, reference node {ref_hwm / MB:.1f} MB; UPnP: {error}")
        assert grown < 50 * MB, (grown / MB, error)
        assert n.connected(), ol.dump()
    finally:
        ol.stop_nodes(n)
        rogue.stop()
