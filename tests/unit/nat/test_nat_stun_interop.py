"""Our STUN codec against an independent implementation (aioice's), both directions."""

from __future__ import annotations

import pytest

from overlay.nat import stun

aioice = pytest.importorskip("aioice.stun", reason="needs aioice (an independent STUN implementation)")


def aioice_request(**attrs) -> bytes:
    m = aioice.Message(message_method=aioice.Method.BINDING, message_class=aioice.Class.REQUEST)
    for k, v in attrs.items():
        m.attributes[k] = v
    m.add_fingerprint()
    return bytes(m)


@pytest.mark.parametrize("observed", [("192.0.2.77", 40123), ("2001:db8::5", 1234)])
def test_aioice_client_reads_our_response(observed):
    raw = aioice_request(SOFTWARE="aioice")
    req = stun.parse(raw)
    assert req.software == "aioice" and req.has_fingerprint
    resp = aioice.parse_message(stun.binding_response(raw, observed))
    assert resp.message_class == aioice.Class.RESPONSE
    assert resp.transaction_id == req.transaction_id
    assert resp.attributes["XOR-MAPPED-ADDRESS"] == observed
    assert "FINGERPRINT" in resp.attributes  # aioice verifies it while parsing


def test_aioice_ice_check_gets_420_from_plain_server():
    m = aioice.Message(message_method=aioice.Method.BINDING, message_class=aioice.Class.REQUEST)
    m.attributes["PRIORITY"] = 1
    m.attributes["USERNAME"] = "a:b"
    m.add_message_integrity(b"key")
    m.add_fingerprint()
    resp = aioice.parse_message(stun.binding_response(bytes(m), ("192.0.2.1", 5)))
    assert resp.message_class == aioice.Class.ERROR and resp.attributes["ERROR-CODE"][0] == 420


def test_our_transaction_reads_aioice_response():
    server = ("198.51.100.1", 3478)
    tx = stun.StunTransaction(server, 0.0)
    (req, to), = tx.datagrams_to_send(0.0)
    q = aioice.parse_message(req)  # aioice checks our FINGERPRINT
    assert to == server and q.message_class == aioice.Class.REQUEST and q.attributes["SOFTWARE"] == "overlay"
    a = aioice.Message(message_method=aioice.Method.BINDING, message_class=aioice.Class.RESPONSE, transaction_id=q.transaction_id)
    a.attributes["XOR-MAPPED-ADDRESS"] = ("203.0.113.9", 50001)
    a.add_fingerprint()
    assert tx.receive(bytes(a), server, 0.02) and tx.result == ("203.0.113.9", 50001)
