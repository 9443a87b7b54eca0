"""A TUN node tells this machine's resolver about its names, and undoes it (real kernel, real
systemd-resolved).

systemd-resolved: a real one (Debian's systemd-resolved package; .ci/run installs it and puts the
host's /etc/resolv.conf back) in the lab host of node ralice, on a D-Bus system bus of its own (a
dbus-daemon on a socket in the test's directory: DBUS_SYSTEM_BUS_ADDRESS for resolved, ralice and
resolvectl) and with /run of its own (a tmpfs in a mount namespace), so the host's /run, bus and
resolver are untouched. The C library in that lab host asks resolved's stub (127.0.0.53:
``ip netns exec`` mounts /etc/netns/NAMESPACE/resolv.conf over /etc/resolv.conf): ``getent hosts
rbob.NET`` works through the link's routing domains. The device is persistent (``overlay
setup-interface``), so that what the node set outlives it unless the node reverts it: on a clean
exit it does, after ``kill -9`` the next start does.

resolv.conf: node rbob with ``--dns-config resolv-conf`` edits the /etc/resolv.conf of its lab host
(again the file ``ip netns exec`` mounts from /etc/netns/...: a bind-mounted file, as in containers)
and puts it back on exit, and after ``kill -9`` at the next start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import lab
import natlab
from lab_overlay import OVERLAY, PASSWORD, OverlayLab, wait

pytestmark = pytest.mark.netns

NET = "rlab"
RESOLVED = "/lib/systemd/systemd-resolved"
DEV = "ovlr0"
BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


@pytest.fixture(scope="module")
def world():
    lab.require_lab("nft", "ip", "getent")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    nl = natlab.NatLab()
    ol = OverlayLab(nl)
    ok = False
    etcs: list[Path] = []
    try:
        for site in ("ra", "rb"):
            nl.add_site(site, "port_restricted")
        ol.start_server()
        bob = ol.start_node("rb1", "rbob", "--tun")
        ok = True
        yield nl, ol, bob, etcs
    finally:
        for etc in etcs:
            shutil.rmtree(etc, ignore_errors=True)
        if not ok:
            print(ol.dump())
        ol.close()
        nl.close(failed=not ok)


def _etc(nl, host: str, etcs: list[Path], resolv_conf: str) -> Path:
    """/etc/netns/NAMESPACE/resolv.conf: the /etc/resolv.conf of programs started in ``host``."""
    etc = Path("/etc/netns") / nl.ns(host).name
    etc.mkdir(parents=True, exist_ok=True)
    etcs.append(etc)
    (etc / "resolv.conf").write_text(resolv_conf)
    return etc / "resolv.conf"


def _getent(nl, host: str, name: str) -> list[str]:
    r = nl.run(host, ["getent", "hosts", name], check=False, timeout=20)
    return r.stdout.split()


def _bus_owned(address: str, name: str) -> bool:
    from jeepney import DBusAddress, new_method_call
    from jeepney.io.blocking import open_dbus_connection
    from jeepney.wrappers import unwrap_msg
    try:
        conn = open_dbus_connection(bus=address)
    except OSError:
        return False
    try:
        msg = new_method_call(DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus"),
                              "NameHasOwner", "s", (name,))
        return bool(unwrap_msg(conn.send_and_get_reply(msg, timeout=5))[0])
    finally:
        conn.close()


def test_resolved_gets_the_link_and_loses_it_on_exit_and_after_a_crash(world):
    if not os.access(RESOLVED, os.X_OK):
        pytest.skip(f"{RESOLVED} not installed (Debian: systemd-resolved; .ci/run installs it)")
    lab.require_lab("dbus-daemon", "unshare", "resolvectl")
    nl, ol, bob, etcs = world
    host = "ra1"
    # the bus socket's directory: not under pytest's 0700 directories (resolved runs as user systemd-resolve)
    tmp = Path(tempfile.mkdtemp(prefix="overlay-bus-"))
    procs: list = []
    alice = None
    try:
        tmp.chmod(0o755)
        socket_path = tmp / "system_bus_socket"
        (tmp / "bus.conf").write_text(BUS_CONF.format(socket=socket_path))
        bus = f"unix:path={socket_path}"
        env = {"DBUS_SYSTEM_BUS_ADDRESS": bus}
        procs.append(nl.popen(host, ["dbus-daemon", "--nofork", "--config-file", str(tmp / "bus.conf")],
                              label="ra1-dbus"))

        def logs() -> str:
            return "".join(f"----- {p.name} (rc {p.poll()})\n{p.stdout()}{p.stderr()[-4000:]}" for p in procs)
        wait(socket_path.exists, 10, "the test's system bus", on_fail=logs)
        # the lab host's resolv.conf names resolved's stub (resolved too reads it: no other servers)
        _etc(nl, host, etcs, "nameserver 127.0.0.53\noptions timeout:2 attempts:2\n")

        def start_resolved(label: str):
            procs.append(nl.popen(host, ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                         f"mount -t tmpfs tmpfs /run && mkdir /run/systemd && exec {RESOLVED}"],
                                  env=env, label=label))
            wait(lambda: _bus_owned(bus, "org.freedesktop.resolve1"), 20, "systemd-resolved on the test's bus",
                 on_fail=logs)
            return procs[-1]
        resolved = start_resolved("ra1-resolved")

        def resolvectl(*args: str) -> str:
            r = nl.run(host, ["resolvectl", *args], env=env, check=False)
            return r.stdout + r.stderr

        nl.run(host, [*OVERLAY, "setup-interface", "--tun", "--dev", DEV, "--user", "root"])
        alice = ol.start_node(host, "ralice", "--tun", "--dev", DEV, env=env)
        ol.pair(alice, bob, NET)
        ol.wait(lambda: (alice.peer("rbob") or {}).get("online"), 30, "ralice sees rbob")
        vip_a, vip_b = alice.status()["node"]["virtual_ip"], alice.peer("rbob")["ip"]
        ol.wait(lambda: ((alice.status().get("dns") or {}).get("system") or {}).get("via") == "systemd-resolved",
                30, "ralice told systemd-resolved")
        system = alice.status()["dns"]["system"]
        assert system["link"] == DEV and f"~{NET}" in system["domains"] and "overlay.internal" in system["domains"]
        assert f"systemd-resolved asks it for ~{NET} overlay.internal on {DEV}" in alice.ok("status")
        ol.wait(lambda: vip_a in resolvectl("dns", DEV), 10, "resolved has the link's DNS server")
        assert f"~{NET}" in resolvectl("domain", DEV)
        # programs resolve peers' names through the C library and resolved's stub
        last: dict = {}

        def resolves(name: str, want: str) -> bool:
            last["r"] = got = _getent(nl, host, name)
            return bool(got) and got[0] == want
        ol.wait(lambda: resolves(f"rbob.{NET}", vip_b), 30, f"getent hosts rbob.{NET}")
        # a bare name: resolved's API applies the search domain overlay.internal (its stub does not:
        # it lists the search domains in its stub-resolv.conf for the C library)
        ol.wait(lambda: vip_b in resolvectl("query", "rbob"), 20, "resolvectl query rbob (the search domain)")
        ol.wait(lambda: f"rbob.{NET}.overlay.internal" in _getent(nl, host, vip_b), 20, f"getent hosts {vip_b} (PTR)")
        # resolved restarts (a package upgrade, systemctl restart): the new one knows nothing of the
        # link; the node notices (a new owner of resolved's bus name) and sets it again
        resolved.stop()
        wait(lambda: not _bus_owned(bus, "org.freedesktop.resolve1"), 10, "systemd-resolved gone", on_fail=logs)
        resolved = start_resolved("ra1-resolved-again")
        wait(lambda: vip_a in resolvectl("dns", DEV) and f"~{NET}" in resolvectl("domain", DEV), 60,
             "the link set again in the new systemd-resolved",
             on_fail=lambda: resolvectl("status", DEV) + logs() + alice.log()[-3000:])
        ol.wait(lambda: resolves(f"rbob.{NET}", vip_b), 30, f"getent hosts rbob.{NET} after the restart")
        assert "systemd-resolved (re)started" in alice.log()
        assert alice.status()["dns"]["system"]["via"] == "systemd-resolved"
        # domains follow the networks
        alice.ok("create", "rlab2", "--password", PASSWORD)
        ol.wait(lambda: "~rlab2" in resolvectl("domain", DEV), 20, "~rlab2 added")
        alice.ok("leave", "rlab2")
        ol.wait(lambda: "~rlab2" not in resolvectl("domain", DEV), 20, "~rlab2 removed")
        # a clean exit reverts the link (the persistent device stays)
        alice.stop()
        assert DEV in nl.run(host, ["ip", "-o", "link"]).stdout
        ol.wait(lambda: f"~{NET}" not in resolvectl("domain", DEV) and vip_a not in resolvectl("dns", DEV), 10,
                "the link reverted on exit")
        assert not (alice.home / "dns-system.json").exists()
        # kill -9: the settings stay; the next start (here with --dns-config off) reverts them
        alice.restart()
        ol.wait(lambda: f"~{NET}" in resolvectl("domain", DEV), 30, "set again after a restart")
        os.kill(alice.proc.popen.pid, 9)
        alice.proc.popen.wait(timeout=10)
        assert f"~{NET}" in resolvectl("domain", DEV) and (alice.home / "dns-system.json").exists()
        alice = ol.start_node(host, "ralice", "--tun", "--dev", DEV, "--dns-config", "off", env=env)
        ol.wait(lambda: not (alice.home / "dns-system.json").exists() and f"~{NET}" not in resolvectl("domain", DEV),
                20, "a crashed node's link settings reverted at the next start")
        assert "left by a node that did not stop cleanly" in alice.log()
        ol.wait(lambda: ((alice.status().get("dns") or {}).get("system") or {}).get("mode") == "off", 30,
                "ralice up with --dns-config off")
        assert alice.status()["dns"]["system"]["via"] is None
        # resolved starts after the node: status says what to add, then the node sets the link
        alice.stop()
        resolved.stop()
        wait(lambda: not _bus_owned(bus, "org.freedesktop.resolve1"), 10, "systemd-resolved gone", on_fail=logs)
        alice = ol.start_node(host, "ralice", "--tun", "--dev", DEV, "--dns-config", "auto", env=env)   # (off was remembered)
        ol.wait(lambda: (alice.status().get("dns") or {}).get("address") == f"{vip_a}:53", 30, "ralice's DNS on its VIP")
        assert alice.status()["dns"]["system"]["via"] is None
        assert f"add `nameserver {vip_a}` to /etc/resolv.conf, or run systemd-resolved" in alice.ok("status")
        resolved = start_resolved("ra1-resolved-late")
        wait(lambda: vip_a in resolvectl("dns", DEV) and f"~{NET}" in resolvectl("domain", DEV), 60,
             "the link set in a systemd-resolved started after the node",
             on_fail=lambda: resolvectl("status", DEV) + logs() + alice.log()[-3000:])
        ol.wait(lambda: resolves(f"rbob.{NET}", vip_b), 30, f"getent hosts rbob.{NET} (resolved started late)")
        assert alice.status()["dns"]["system"]["via"] == "systemd-resolved"
    finally:
        if alice is not None:
            alice.stop()
        nl.run(host, [*OVERLAY, "setup-interface", "--tun", "--dev", DEV, "--user", "root", "--remove"], check=False)
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_without_resolved_status_says_what_to_add_and_resolv_conf_is_opt_in(world):
    nl, ol, bob, etcs = world
    host = "rb1"
    original = "nameserver 192.0.2.53\noptions timeout:1 attempts:1\n"
    conf = _etc(nl, host, etcs, original)   # mounted over /etc/resolv.conf in rbob's lab host
    # the default: nothing changed, and status says what to add
    bob.restart()   # (its /etc/resolv.conf is now the lab's file)
    ol.wait(lambda: (bob.status().get("dns") or {}).get("address", "").endswith(":53"), 30, "rbob's DNS on its VIP")
    vip_b = bob.status()["node"]["virtual_ip"]
    assert bob.status()["dns"]["system"]["via"] is None
    text = bob.ok("status")
    assert f"add `nameserver {vip_b}` to /etc/resolv.conf, or run systemd-resolved" in text, text
    assert conf.read_text() == original
    # opt-in: the node's nameserver first, the original kept; restored on exit
    bob.stop()
    bob = ol.start_node(host, "rbob", "--tun", "--dns-config", "resolv-conf")
    ol.wait(lambda: ((bob.status().get("dns") or {}).get("system") or {}).get("via") == "resolv.conf", 30,
            "rbob edited resolv.conf")
    lines = conf.read_text().splitlines()
    assert lines[1] == f"nameserver {vip_b}" and lines[2:] == original.splitlines(), lines
    assert "first nameserver in /etc/resolv.conf" in bob.ok("status")
    ol.wait(lambda: (got := _getent(nl, host, "rbob")) and got[0] == vip_b, 20, "getent hosts rbob")
    bob.stop()
    assert conf.read_text() == original
    # kill -9: left edited; the next start (with --dns-config off) restores it
    bob.restart()
    ol.wait(lambda: f"nameserver {vip_b}" in conf.read_text(), 30, "edited again")
    os.kill(bob.proc.popen.pid, 9)
    bob.proc.popen.wait(timeout=10)
    assert f"nameserver {vip_b}" in conf.read_text()
    bob = ol.start_node(host, "rbob", "--tun", "--dns-config", "off")
    ol.wait(lambda: conf.read_text() == original, 20, "resolv.conf restored at the next start")
    ol.wait(lambda: not (bob.home / "dns-system.json").exists(), 10, "record cleared")
    bob.stop()
