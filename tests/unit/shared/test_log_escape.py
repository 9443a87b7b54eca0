"""Strings from the LAN and from peers reach the node's log escaped (``overlay.escape``): a UPnP
IGD's external address carrying terminal escape sequences, a name carrying a newline that would
forge a log line. Run in a child process with the daemon's own logging set-up
(``overlay.node.run`` calls ``log_to_stderr``), so the log text checked is what a terminal or a
journal would get."""

from __future__ import annotations

import subprocess
import sys

from overlay.escape import visible

CHILD = r'''
import asyncio, logging
from overlay.escape import log_to_stderr
log_to_stderr("info")
from overlay import crypto
from overlay.nat.portmap import PortMapper
from overlay.node.dataplane import DataPlane

EVIL = "\x1b]0;owned\x07\x1b[2J203.0.113.5"

async def main():
    dp = DataPlane(crypto.generate_private_key())
    dp.loop = asyncio.get_running_loop()
    pm = PortMapper("192.168.1.1", "192.168.1.20", 41641, dp.now(), protocols=("upnp",))
    dp.portmap.set_mapper(pm)
    pm.handle_timer(dp.now())
    [job] = pm.jobs_to_run()
    pm.job_done(job, {"external_ip": EVIL, "lan_addr": "192.168.1.20"}, dp.now())   # the IGD's answers
    [job] = pm.jobs_to_run()
    pm.job_done(job, {"external_ip": EVIL}, dp.now())
    dp.portmap.changed()                        # logs the mapping, as after a real job
    logging.getLogger("overlay.dataplane").info("path to %s: relay", "evil\n00:00:00 overlay.node INFO forged")

asyncio.run(main())
'''


def test_upnp_answer_and_peer_name_with_control_characters_land_in_the_log_escaped():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    log = r.stderr
    assert "\x1b" not in log and "\x07" not in log, repr(log)
    assert "router maps \\x1b]0;owned\\x07\\x1b[2J203.0.113.5:41641 to UDP port" in log, log
    lines = log.splitlines()
    assert len(lines) == 2, lines                # the newline in the name forged no third line
    assert lines[1].endswith("path to evil\\x0a00:00:00 overlay.node INFO forged: relay"), lines


def test_visible_escapes_controls_and_bidi_overrides_only():
    assert visible("caf\u00e9 \u2603 ok") == "caf\u00e9 \u2603 ok"
    assert visible("a\x1b[31mb\x9bc\u202ed\x7f") == "a\\x1b[31mb\\x9bc\\u202ed\\x7f"
