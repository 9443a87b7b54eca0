"""UPnP IGD decision core (``overlay.nat.upnp.UpnpCore``) with scripted IGD answers: when it
discovers, maps, renews, falls back to a permanent lease, backs off, and deletes."""

from __future__ import annotations

import random

import pytest

from overlay.nat import upnp
from overlay.nat.upnp import Igd, UpnpCore


def step(c: UpnpCore, now: float) -> list[tuple]:
    c.handle_timer(now)
    return c.jobs_to_run()


def test_discovers_maps_with_a_lease_renews_at_half_and_deletes():
    c = UpnpCore(41641, 0.0, lease=3600)
    [job] = step(c, 0.0)
    assert job == ("discover",) and c.get_timer() is None          # one job at a time
    c.job_done(job, {"external_ip": "203.0.113.7", "lan_addr": "192.168.1.20"}, 2.0)
    [job] = c.jobs_to_run()
    assert job == ("map", 41641, 41641, 3600)
    c.job_done(job, {"external_ip": "203.0.113.7"}, 2.1)
    assert c.mapped == ("203.0.113.7", 41641) and c.changed and c.answered
    assert c.get_timer() == pytest.approx(1802.1)
    [job] = step(c, 1802.1)
    assert job == ("map", 41641, 41641, 3600) and c.mapped is not None   # renewal keeps it advertised
    c.job_done(job, {"external_ip": "203.0.113.7"}, 1802.2)
    assert c.delete() == [("delete", 41641)]
    assert c.summary() == {"answered": True, "external_ip": "203.0.113.7", "mapped": "203.0.113.7:41641",
                           "error": None, "lease": 3600}


def test_no_igd_backs_off_and_asks_again():
    c = UpnpCore(41641, 0.0, retry_after=300)
    [job] = step(c, 0.0)
    c.job_done(job, {"error": "no UPnP IGD answered"}, 2.0)
    assert c.answered is False and c.error == "no UPnP IGD answered" and c.mapped is None
    assert c.get_timer() == 302.0 and step(c, 100.0) == []
    assert step(c, 302.0) == [("discover",)]
    assert c.delete() == []


def test_permanent_leases_only_retries_with_lease_zero_and_never_renews():
    c = UpnpCore(41641, 0.0)
    [job] = step(c, 0.0)
    c.job_done(job, {"external_ip": "203.0.113.7", "lan_addr": "192.168.1.20"}, 1.0)
    [job] = c.jobs_to_run()
    c.job_done(job, {"error": "OnlyPermanentLeasesSupported"}, 1.1)
    [job] = c.jobs_to_run()
    assert job == ("map", 41641, 41641, 0) and c.permanent
    c.job_done(job, {"external_ip": "203.0.113.7"}, 1.2)
    assert c.mapped and c.get_timer() is None and c.summary()["lease"] == 0
    assert c.delete() == [("delete", 41641)]               # a permanent mapping is still removed on exit


def test_conflicting_port_tries_two_random_ports_then_fails():
    c = UpnpCore(41641, 0.0, rng=random.Random(1))
    [job] = step(c, 0.0)
    c.job_done(job, {"external_ip": "203.0.113.7"}, 1.0)
    ports = []
    for i in range(3):
        [job] = c.jobs_to_run()
        ports.append(job[1])
        c.job_done(job, {"error": "ConflictInMappingEntry"}, 1.0 + i)
    assert ports[0] == 41641 and all(1024 <= p < 65536 for p in ports[1:])
    assert c.mapped is None and c.error == "ConflictInMappingEntry" and c.jobs_to_run() == []


def test_refused_mapping_is_an_error_and_stale_or_bogus_results_are_ignored():
    c = UpnpCore(41641, 0.0)
    [job] = step(c, 0.0)
    c.job_done(("map", 1, 1, 1), {"external_ip": "6.6.6.6"}, 0.5)     # not the job in flight
    assert c.state == upnp.DISCOVERING and c.external_ip is None
    c.job_done(job, "garbage", 0.6)                                   # not a dict: an error, no crash
    assert c.state == upnp.FAILED and c.error == "bad result"
    c = UpnpCore(41641, 0.0)
    [job] = step(c, 0.0)
    c.job_done(job, {"external_ip": "203.0.113.7"}, 1.0)
    [job] = c.jobs_to_run()
    c.job_done(job, {"error": "Action Failed"}, 1.1)
    assert c.mapped is None and c.error == "Action Failed" and c.answered is True


def test_held_back_until_allowed():
    c = UpnpCore(41641, 0.0, may_map=False)
    [job] = step(c, 0.0)
    c.job_done(job, {"external_ip": "203.0.113.7", "lan_addr": "10.0.0.2"}, 1.0)
    assert c.state == upnp.FOUND and c.jobs_to_run() == [] and c.summary()["external_ip"] == "203.0.113.7"
    c.allow_mapping(5.0)
    assert c.jobs_to_run() == [("map", 41641, 41641, upnp.LEASE)]


def test_igd_without_discovery_says_so():
    assert Igd().run(("map", 1, 1, 1)) == {"error": "no UPnP IGD selected"}
    assert Igd().run(("frobnicate",)) == {"error": "no UPnP IGD selected"}
