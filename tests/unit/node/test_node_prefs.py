"""prefs.json: the `overlay up` options remembered between runs (overlay/node/prefs.py)."""

import json

import pytest

from overlay.node.prefs import Prefs, PrefsError, option_flags, up_options


def test_given_options_replace_remembered_ones_and_defaults_are_dropped():
    remembered = {"socks": "127.0.0.1:9050", "advertise_routes": "10.1.0.0/24", "port": 41641}
    given, reused, keep = up_options({"socks": None, "advertise_routes": "", "port": None, "keepalive": 20.0,
                                      "proxy_user": [], "http_proxy": "off"}, remembered)
    assert given == {"advertise_routes": "off", "keepalive": 20.0, "http_proxy": "off"}
    assert reused == {"socks": "127.0.0.1:9050", "port": 41641}
    assert keep == {"socks": "127.0.0.1:9050", "port": 41641, "keepalive": 20.0}
    assert up_options({"socks": "off"}, remembered)[2]["socks"] == "off"   # on by default: 'off' is kept
    assert up_options({"port": 7}, remembered, reset=True)[1:] == ({}, {"port": 7})
    assert up_options({"proxy_user": ["off"]}, {"proxy_user": ["a:b"]})[2] == {}
    assert option_flags({"proxy_user": ["alice:secret"], "hard_nat_punch": False, "keepalive": 20.0}) == \
        "--proxy-user alice:… --no-hard-nat-punch --keepalive 20"


def test_options_survive_a_reload_and_a_bad_type_names_the_file(tmp_path):
    p = Prefs(tmp_path)
    p.remember_options({"socks": "127.0.0.1:9050", "wg_peer": ["K,h:1,10.0.0.2/32"], "keepalive": 20.0})
    assert Prefs(tmp_path).options == {"socks": "127.0.0.1:9050", "wg_peer": ["K,h:1,10.0.0.2/32"], "keepalive": 20.0}
    (tmp_path / "prefs.json").write_text(json.dumps({"options": {"port": "80"}}))
    with pytest.raises(PrefsError, match="prefs.json.*port"):
        Prefs(tmp_path)
