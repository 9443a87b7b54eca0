"""NAT classification and port prediction: unit cases and every NAT class of the simulator."""

from __future__ import annotations

import dataclasses

import natsim
import pytest

from overlay.nat import classify as c
from overlay.nat.classify import NatProbe, Observation, classify

LOCAL = ("10.0.0.2", 41641)
S = [("203.0.113.1", 3478), ("203.0.113.1", 3479), ("203.0.113.2", 3478), ("203.0.113.2", 3479)]


def obs(*ports, ip="198.51.100.1"):
    return [Observation(s, None if p is None else (ip, p)) for s, p in zip(S, ports)]


def test_no_answer_means_no_udp():
    r = classify(LOCAL, obs(None, None, None, None))
    assert not r.udp and r.public is None and r.predicted_ports(4) == []


def test_no_nat():
    r = classify(("198.51.100.1", 41641), obs(41641, 41641, 41641, 41641))
    assert r.udp and r.behind_nat is False and r.mapping == c.EIM


def test_endpoint_independent_mapping_with_port_preservation():
    r = classify(LOCAL, obs(41641, 41641, 41641, 41641))
    assert r.behind_nat and r.mapping == c.EIM and r.port_preserved and not r.varies_by_destination
    assert r.public == ("198.51.100.1", 41641) and r.predicted_ports(3) == []


def test_address_dependent_mapping():
    r = classify(LOCAL, obs(40000, 40000, 40001, 40001))
    assert r.mapping == c.ADM and r.varies_by_destination


def test_sequential_symmetric_prediction():
    r = classify(LOCAL, obs(40000, 40001, 40002, 40003))
    assert r.mapping == c.APDM and r.allocation == c.SEQUENTIAL and r.delta == 1
    assert r.confidence == 1.0 and r.predictable
    assert r.predicted_ports(3) == [40004, 40005, 40006]


def test_sequential_with_step_and_outlier():
    # another host behind the NAT took a port in between: 2 of 3 deltas agree
    r = classify(LOCAL, obs(50000, 50002, 50006, 50008))
    assert r.allocation == c.SEQUENTIAL and r.delta == 2 and r.confidence == pytest.approx(2 / 3)
    assert r.predicted_ports(2) == [50010, 50012]


def test_prediction_wraps_within_port_range():
    r = classify(LOCAL, obs(65533, 65534, 65535, 1024))  # the counter wrapped: still +1
    assert r.allocation == c.SEQUENTIAL and r.delta == 1 and r.confidence == 1.0
    assert r.predicted_ports(2) == [1025, 1026]
    r = classify(LOCAL, obs(65532, 65533, 65534, 65535))
    assert r.predicted_ports(2) == [1024, 1025]


def test_sequential_with_an_unanswered_request():
    # the request to the third endpoint took port 40002 but its answer was lost
    r = classify(LOCAL, obs(40000, 40001, None, 40003))
    assert r.allocation == c.SEQUENTIAL and r.delta == 1 and r.confidence == pytest.approx(1 / 3)
    assert r.predicted_ports(1) == [40004]
    r = classify(LOCAL, obs(40003, 40002, None, 40000))  # a counter running down
    assert r.allocation == c.SEQUENTIAL and r.delta == -1 and r.predicted_ports(1) == [39999]
    r = classify(LOCAL, obs(40000, 40001, 40002, None))  # the last request took 40003
    assert r.last_port == 40003 and r.predicted_ports(1) == [40004]


def test_random_allocation():
    r = classify(LOCAL, obs(31001, 55873, 2090, 47311))
    assert r.mapping == c.APDM and r.allocation == c.RANDOM and not r.predictable and r.predicted_ports(4) == []


def test_one_server_address_only_is_endpoint_dependent_with_low_confidence():
    r = classify(LOCAL, [Observation(S[0], ("198.51.100.1", 40000)), Observation(S[1], ("198.51.100.1", 40001))])
    assert r.mapping == c.APDM  # same address, different ports, different mappings
    r = classify(LOCAL, [Observation(S[0], ("198.51.100.1", 40000)), Observation(S[2], ("198.51.100.1", 40001))])
    assert r.mapping == c.EDM and r.allocation == c.SEQUENTIAL and r.confidence == pytest.approx(1 / 3)


def test_partial_answers():
    r = classify(LOCAL, obs(40000, None, 40001, 40002))
    assert r.udp and r.allocation == c.SEQUENTIAL and r.last_port == 40002


# ------------------------------------------------------------------ over the simulator


def probe_behind(cfg: natsim.NatConfig | None, *, block_udp: bool = False):
    net = natsim.Network(seed=7)
    servers = natsim.stun_servers(net)
    if cfg is None:
        host = net.host("198.51.100.1")
    else:
        host = net.host("10.0.0.2", nat=net.nat("198.51.100.1", cfg))
    if block_udp:
        for s in servers:
            net.block("198.51.100.1", s[0])
    app = _ProbeApp(NatProbe((host.ip, 41641), servers, 0.0))
    host.bind(41641, app).kick()
    net.run_until(10.0)
    assert app.probe.done
    return app.probe.report()


class _ProbeApp:
    def __init__(self, probe: NatProbe):
        self.probe = probe

    def datagram_received(self, data, addr, now):
        self.probe.receive(data, addr, now)

    def datagrams_to_send(self, now):
        return self.probe.datagrams_to_send(now)

    def get_timer(self):
        return self.probe.get_timer()

    def handle_timer(self, now):
        self.probe.handle_timer(now)


@pytest.mark.parametrize(
    "cfg, mapping, allocation",
    [
        (natsim.NatConfig(natsim.EI, natsim.EI), c.EIM, None),
        (natsim.NatConfig(natsim.EI, natsim.APD, natsim.RANDOM), c.EIM, None),
        (natsim.NatConfig(natsim.AD, natsim.APD), c.ADM, c.SEQUENTIAL),
        (natsim.NatConfig(natsim.APD, natsim.APD), c.APDM, c.SEQUENTIAL),
        (natsim.NatConfig(natsim.APD, natsim.APD, delta=3), c.APDM, c.SEQUENTIAL),
        (natsim.NatConfig(natsim.APD, natsim.EI, natsim.RANDOM), c.APDM, c.RANDOM),
    ],
)
def test_simulated_nat_classes(cfg, mapping, allocation):
    r = probe_behind(cfg)
    assert r.udp and r.behind_nat and r.public[0] == "198.51.100.1"
    assert r.mapping == mapping and r.allocation == allocation
    if allocation == c.SEQUENTIAL:
        assert r.delta == cfg.delta
        # the prediction must match what the NAT really hands out next
        assert r.predicted_ports(2)[0] == r.last_port + cfg.delta


def test_simulated_port_preservation():
    r = probe_behind(natsim.NatConfig(natsim.EI, natsim.APD, port_preservation=True))
    assert r.port_preserved and r.public == ("198.51.100.1", 41641)
    # symmetric with port preservation: the first mapping keeps the port, later ones count up
    r = probe_behind(natsim.NatConfig(natsim.APD, natsim.APD, port_preservation=True))
    assert r.mapping == c.APDM and r.allocation == c.SEQUENTIAL and r.delta == 1
    assert r.confidence == pytest.approx(2 / 3)


def test_simulated_no_nat_and_blocked_udp():
    r = probe_behind(None)
    assert r.udp and r.behind_nat is False
    r = probe_behind(dataclasses.replace(natsim.NAT_TYPES["port-restricted"]), block_udp=True)
    assert not r.udp
