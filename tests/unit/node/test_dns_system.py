"""This machine's resolver and the node's DNS (overlay/node/dns_system.py): the domains given to
systemd-resolved, the resolv.conf edit and its restore, and the record that undoes both after a
crash. systemd-resolved itself is a fake here (the lab test speaks to a real one)."""

from __future__ import annotations

import ipaddress
import json
import socket

import pytest

from overlay.node import dns_system as ds
from overlay.node.dns_system import (Record, ResolvConf, ResolvedError, ResolvedWatch, SystemDns, domain_texts,
                                     restore_plan, reverse_zones, routing_domains, with_nameserver)

POOL = ipaddress.IPv4Network("100.64.0.0/10")
LO = socket.if_indextoname(1)   # the loopback device stands in for the overlay device


@pytest.mark.parametrize("pool, first, last, count", [
    ("100.64.0.0/10", "64.100.in-addr.arpa", "127.100.in-addr.arpa", 64),
    ("100.64.0.0/16", "64.100.in-addr.arpa", "64.100.in-addr.arpa", 1),
    ("10.0.0.0/8", "10.in-addr.arpa", "10.in-addr.arpa", 1),
    ("10.1.2.0/26", "2.1.10.in-addr.arpa", "2.1.10.in-addr.arpa", 1),   # its /24
    ("172.16.0.0/12", "16.172.in-addr.arpa", "31.172.in-addr.arpa", 16),
])
def test_reverse_zones_cover_the_pool_on_octet_boundaries(pool, first, last, count):
    z = reverse_zones(ipaddress.IPv4Network(pool))
    assert (z[0], z[-1], len(z)) == (first, last, count)
    assert len(reverse_zones(ipaddress.IPv4Network("0.0.0.0/0"))) == 256   # bounded
    assert reverse_zones(None) == []


def test_routing_domains_route_networks_and_search_the_suffix():
    d = routing_domains(["Lab", "home", "lab"], ipaddress.IPv4Network("100.64.0.0/16"))
    assert d == [("home", True), ("lab", True), ("overlay.internal", False), ("64.100.in-addr.arpa", True)]
    assert domain_texts(d) == ["~home", "~lab", "overlay.internal", "~64.100.in-addr.arpa"]


def test_with_nameserver_puts_ours_first_and_keeps_the_rest_once():
    orig = "# generated\nnameserver 10.0.0.1\nsearch example.com"
    new = with_nameserver(orig, "100.64.0.1")
    lines = new.splitlines()
    assert lines[0].startswith(ds.MARK) and lines[1] == "nameserver 100.64.0.1"
    assert lines[2:] == orig.splitlines()
    # applied again (a new address): one line of ours, never two
    again = with_nameserver(new, "100.64.0.2")
    assert again.count("nameserver 100.64.0.") == 1 and "nameserver 100.64.0.2" in again
    assert again.splitlines()[2:] == orig.splitlines()
    assert with_nameserver("", "100.64.0.1").splitlines()[1] == "nameserver 100.64.0.1"


def test_restore_plan():
    assert restore_plan("ours", "ours", "orig") == "restore"
    assert restore_plan("orig", "ours", "orig") == "nothing"
    assert restore_plan(None, "ours", "orig") == "nothing"
    assert restore_plan("someone else's", "ours", "orig") == "changed"


def _conf(tmp_path, text="nameserver 10.0.0.1\n"):
    path = tmp_path / "etc" / "resolv.conf"
    path.parent.mkdir()
    path.write_text(text)
    home = tmp_path / "home"
    home.mkdir()
    return path, home


def test_resolv_conf_edit_and_restore(tmp_path):
    path, home = _conf(tmp_path)
    rc, rec = ResolvConf(str(path)), Record()
    rc.apply("100.64.0.1", rec, home)
    assert path.read_text().splitlines()[1:] == ["nameserver 100.64.0.1", "nameserver 10.0.0.1"]
    backup = home / ("resolv.conf" + ds.BACKUP_SUFFIX)
    assert backup.read_text() == "nameserver 10.0.0.1\n"
    saved = json.loads((home / ds.STATE_FILE).read_text())   # recorded before the file changed
    assert saved["resolv_conf"]["path"] == str(path)
    assert ResolvConf.restore(rec, home) is None
    assert path.read_text() == "nameserver 10.0.0.1\n"
    assert not backup.exists() and not (home / ds.STATE_FILE).exists()
    assert not list(path.parent.glob(".*overlay-tmp"))


def test_resolv_conf_changed_by_someone_else_is_left(tmp_path):
    path, home = _conf(tmp_path)
    rec = Record()
    ResolvConf(str(path)).apply("100.64.0.1", rec, home)
    path.write_text("nameserver 192.0.2.9\n")   # a DHCP client rewrote it
    note = ResolvConf.restore(rec, home)
    assert note and "changed by someone else" in note
    assert path.read_text() == "nameserver 192.0.2.9\n"
    assert (home / ("resolv.conf" + ds.BACKUP_SUFFIX)).read_text() == "nameserver 10.0.0.1\n"   # kept


def test_resolv_conf_symlink_is_never_replaced(tmp_path):
    path, home = _conf(tmp_path)
    target = tmp_path / "stub-resolv.conf"
    target.write_text("nameserver 127.0.0.53\n")
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(OSError, match="symlink"):
        ResolvConf(str(path)).apply("100.64.0.1", Record(), home)
    assert path.is_symlink() and target.read_text() == "nameserver 127.0.0.53\n"


class FakeResolved:
    def __init__(self, running=True, fail=None):
        self.is_running, self.fail = running, fail
        self.calls: list[tuple] = []
        self.bus_owner = ":1.1"
        self.looks = 0

    def running(self):
        return self.is_running

    def owner(self):
        self.looks += 1
        return self.bus_owner if self.is_running else None

    def configure(self, ifindex, ip, port, domains):
        if self.fail:
            raise ResolvedError(self.fail)
        self.calls.append(("configure", ifindex, ip, port, list(domains)))

    def set_domains(self, ifindex, domains):
        self.calls.append(("domains", ifindex, list(domains)))

    def revert(self, ifindex):
        self.calls.append(("revert", ifindex))


def test_resolved_link_set_updated_reverted(tmp_path):
    fake = FakeResolved()
    sd = SystemDns(tmp_path, resolved=fake)
    sd.apply(LO, "100.64.0.1", 53, ["lab"], POOL)
    assert fake.calls[0][:4] == ("configure", 1, "100.64.0.1", 53)
    assert ("lab", True) in fake.calls[0][4] and ("overlay.internal", False) in fake.calls[0][4]
    assert sd.status()["via"] == "systemd-resolved" and "~lab" in sd.status()["domains"]
    assert Record.load(tmp_path).resolved == {"ifname": LO, "ifindex": 1}   # for the next start after a crash
    sd.set_domains(["lab", "home"], POOL)
    assert fake.calls[-1][0] == "domains" and ("home", True) in fake.calls[-1][2]
    sd.revert()
    assert fake.calls[-1] == ("revert", 1)
    assert Record.load(tmp_path).empty() and sd.status()["via"] is None


def test_a_crashed_nodes_link_settings_are_reverted_at_the_next_start(tmp_path):
    Record(resolved={"ifname": LO, "ifindex": 1}).save(tmp_path)
    fake = FakeResolved()
    SystemDns(tmp_path, resolved=fake).recover()
    assert fake.calls == [("revert", 1)]
    assert not (tmp_path / ds.STATE_FILE).exists()
    # a device that went with the node (or another device with that index now): left alone
    Record(resolved={"ifname": "ovl-gone0", "ifindex": 1}).save(tmp_path)
    fake = FakeResolved()
    SystemDns(tmp_path, resolved=fake).recover()
    assert fake.calls == [] and not (tmp_path / ds.STATE_FILE).exists()


def test_a_crashed_nodes_resolv_conf_is_restored_at_the_next_start(tmp_path, monkeypatch):
    path, home = _conf(tmp_path)
    monkeypatch.setenv(ds.RESOLV_CONF_ENV, str(path))
    sd = SystemDns(home, mode="resolv-conf", resolved=FakeResolved(running=False))
    sd.apply(LO, "100.64.0.1", 53, ["lab"], POOL)
    assert sd.status()["via"] == "resolv.conf" and "nameserver 100.64.0.1" in path.read_text()
    # killed here: the next start puts the original back
    SystemDns(home, mode="resolv-conf", resolved=FakeResolved(running=False)).recover()
    assert path.read_text() == "nameserver 10.0.0.1\n" and Record.load(home).empty()


def test_without_resolved_auto_changes_nothing_and_off_never_asks(tmp_path, monkeypatch):
    path, home = _conf(tmp_path)
    monkeypatch.setenv(ds.RESOLV_CONF_ENV, str(path))
    sd = SystemDns(home, resolved=FakeResolved(running=False))
    sd.apply(LO, "100.64.0.1", 53, ["lab"], POOL)
    assert sd.status() == {"mode": "auto", "via": None, "link": None, "domains": [], "file": None, "note": None}
    assert path.read_text() == "nameserver 10.0.0.1\n" and Record.load(home).empty()
    fake = FakeResolved()
    off = SystemDns(home, mode="off", resolved=fake)
    off.apply(LO, "100.64.0.1", 53, ["lab"], POOL)
    assert fake.calls == [] and off.status()["via"] is None


def test_resolved_refusing_leaves_a_note_and_no_record(tmp_path):
    sd = SystemDns(tmp_path, resolved=FakeResolved(fail="org.freedesktop.DBus.Error.AccessDenied: no"))
    sd.apply(LO, "100.64.0.1", 53, ["lab"], POOL)
    st = sd.status()
    assert st["via"] is None and "AccessDenied" in st["note"]
    assert Record.load(tmp_path).empty()
    assert sd.resolved.calls == [("revert", 1)]   # whatever it took before it refused is taken back


def test_no_system_bus_means_no_resolved(monkeypatch, tmp_path):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    assert ds.Resolved().running() is False
    with pytest.raises(ResolvedError, match="no system bus"):
        ds.Resolved().revert(1)


def test_a_damaged_record_is_dropped(tmp_path):
    (tmp_path / ds.STATE_FILE).write_text('{"resolved": "ovl0", "resolv_conf": {"path": 3}}')
    SystemDns(tmp_path, resolved=FakeResolved()).recover()
    assert not (tmp_path / ds.STATE_FILE).exists()


def test_status_text_says_where_names_answer():
    from overlay.cli_base import dns_system_lines
    dns = {"address": "100.64.0.7:53", "names": []}
    base = {"mode": "auto", "via": None, "link": None, "domains": [], "file": None, "note": None}
    assert dns_system_lines({**dns, "system": None}) == []
    hint = dns_system_lines({**dns, "system": base})[0]
    assert "add `nameserver 100.64.0.7` to /etc/resolv.conf, or run systemd-resolved" in hint
    assert "--dns-config resolv-conf" in hint
    assert dns_system_lines({**dns, "system": {**base, "mode": "off"}}) == []
    via = {**base, "via": "systemd-resolved", "link": "ovl0",
           "domains": ["~games", "overlay.internal"] + [f"~{i}.100.in-addr.arpa" for i in range(64, 128)]}
    assert dns_system_lines({**dns, "system": via}) == [
        "systemd-resolved asks it for ~games overlay.internal on ovl0 (and 64 reverse zones)"]
    assert "first nameserver in /etc/resolv.conf" in dns_system_lines(
        {**dns, "system": {**base, "via": "resolv.conf", "file": "/etc/resolv.conf"}})[0]
    lo = dns_system_lines({"address": "127.0.0.1:1053", "system": base})[0]
    assert "dig -p 1053 @127.0.0.1" in lo


def test_watch_decides_from_the_bus_names_owner():
    w = ResolvedWatch(period=15)
    assert w.due(0)
    assert w.seen(None, 0) == "" and not w.due(14.9) and w.due(15)   # never ran: nothing to say
    assert w.seen(":1.5", 15) == "apply"                             # it appeared
    w.tried(":1.5", True)
    assert w.seen(":1.5", 30) == ""                                  # the same resolved: nothing
    assert w.seen(":1.9", 45) == "apply"                             # restarted: a new owner
    w.tried(":1.9", False)                                           # ... that refused
    assert w.seen(":1.9", 60) == ""                                  # one try per owner
    assert w.seen(None, 75) == ""                                    # gone, but it never had our settings
    assert w.seen(":1.12", 90) == "apply"
    w.tried(":1.12", True)
    assert w.seen(None, 105) == "gone" and w.seen(None, 120) == ""   # said once
    assert w.seen(":1.12", 135) == "apply"                           # back (even with a name seen before)


def test_a_restarted_resolved_gets_the_link_again(tmp_path):
    fake = FakeResolved()
    sd = SystemDns(tmp_path, resolved=fake)
    sd.apply(LO, "100.64.0.1", 53, ["lab"], POOL)
    assert [c[0] for c in fake.calls] == ["configure"]
    sd.recheck(["lab"], POOL, now=100)
    looks = fake.looks
    sd.recheck(["lab"], POOL, now=101)                    # not due: the bus is not asked
    assert fake.looks == looks and [c[0] for c in fake.calls] == ["configure"]
    fake.is_running = False                               # stopped: it forgot the link
    sd.recheck(["lab"], POOL, now=200)
    st = sd.status()
    assert st["via"] is None and "systemd-resolved stopped" in st["note"]
    assert Record.load(tmp_path).empty()                  # nothing left to revert
    fake.is_running, fake.bus_owner = True, ":1.77"       # a new one
    sd.recheck(["lab", "home"], POOL, now=300)            # the networks as they are now
    assert fake.calls[-1][:4] == ("configure", 1, "100.64.0.1", 53) and ("home", True) in fake.calls[-1][4]
    assert sd.status()["via"] == "systemd-resolved" and sd.status()["note"] is None
    assert Record.load(tmp_path).resolved == {"ifname": LO, "ifindex": 1}
    # restarted between two looks (never seen gone): the owner changed
    fake.bus_owner = ":1.80"
    sd.recheck(["lab"], POOL, now=400)
    assert [c[0] for c in fake.calls] == ["configure", "configure", "configure"]
    sd.recheck(["lab"], POOL, now=500)
    assert len(fake.calls) == 3


def test_resolved_started_after_the_node_gets_the_link_and_a_refusal_is_tried_once(tmp_path):
    fake = FakeResolved(running=False)
    sd = SystemDns(tmp_path, resolved=fake)
    sd.apply(LO, "100.64.0.1", 53, ["lab"], POOL)
    assert sd.status()["via"] is None and fake.calls == []
    sd.recheck(["lab"], POOL, now=10)
    assert fake.calls == []
    fake.is_running = True
    sd.recheck(["lab"], POOL, now=20)                     # not due yet
    assert fake.calls == []
    sd.recheck(["lab"], POOL, now=30)
    assert fake.calls[0][0] == "configure" and sd.status()["via"] == "systemd-resolved"
    # an unprivileged node: refused once, not asked again every look
    fake2 = FakeResolved(running=False, fail="org.freedesktop.DBus.Error.AccessDenied: no")
    sd2 = SystemDns(tmp_path, resolved=fake2)
    sd2.apply(LO, "100.64.0.1", 53, ["lab"], POOL)
    fake2.is_running = True
    for now in (10, 20, 30, 40):
        sd2.recheck(["lab"], POOL, now=now)
    assert fake2.calls == [("revert", 1)] and "AccessDenied" in sd2.status()["note"]


def test_no_looks_before_apply_with_off_or_with_resolv_conf(tmp_path, monkeypatch):
    path, home = _conf(tmp_path)
    monkeypatch.setenv(ds.RESOLV_CONF_ENV, str(path))
    fake = FakeResolved()
    SystemDns(home, resolved=fake).recheck(["lab"], POOL, now=10)   # the node's DNS is not on the device
    off = SystemDns(home, mode="off", resolved=fake)
    off.apply(LO, "100.64.0.1", 53, ["lab"], POOL)
    off.recheck(["lab"], POOL, now=10)
    assert fake.looks == 0
    rc = SystemDns(home, mode="resolv-conf", resolved=FakeResolved(running=False))
    rc.apply(LO, "100.64.0.1", 53, ["lab"], POOL)
    looks = rc.resolved.looks
    rc.recheck(["lab"], POOL, now=10)
    assert rc.resolved.looks == looks and rc.status()["via"] == "resolv.conf"
    rc.revert()


def test_keep_looks_from_a_thread_and_stops_when_cancelled(tmp_path):
    """The asyncio glue: ``keep`` rechecks under the daemon's lock; cancelled, it lets the look end."""
    import asyncio

    from polling import wait_async

    async def main():
        fake = FakeResolved()
        sd = SystemDns(tmp_path, resolved=fake, watch=ResolvedWatch(period=0.01))
        sd.apply(LO, "100.64.0.1", 53, ["lab"], POOL)
        lock = asyncio.Lock()
        task = asyncio.get_running_loop().create_task(sd.keep(lock, lambda: ["lab"], lambda: POOL))
        await wait_async(lambda: fake.looks >= 2, 10, "a look at the bus")
        fake.bus_owner = ":1.99"
        await wait_async(lambda: len(fake.calls) == 2, 10, "the link set again")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled() and not lock.locked()
        sd.revert()
        assert fake.calls[-1] == ("revert", 1)

    asyncio.run(main())
