"""NodeSettings: `overlay up`'s options + config.toml + prefs.json resolved once into the typed
settings the daemon runs with, and their one serialization to the daemon process."""

from __future__ import annotations

import base64
import json

import pytest

from overlay.node.prefs import Prefs
from overlay.node.settings import (
    NodeSettings,
    SettingsError,
    StaticPeer,
    UpOptions,
    resolve,
    server_and_name,
)

KEY = base64.b64encode(bytes(range(32))).decode()


def _prefs(tmp_path, **options) -> Prefs:
    p = Prefs(tmp_path)
    p.remember(server="remembered.example:7777", name="remembered")
    if options:
        p.remember_options(options)
    return Prefs(tmp_path)


def test_an_option_given_beats_config_beats_remembered_beats_default(tmp_path):
    last = _prefs(tmp_path, socks="127.0.0.1:2000", keepalive=30.0, port=4000, http_proxy="127.0.0.1:3128")
    notes = []
    s = resolve(UpOptions(port=5000), {"keepalive": 40}, last, lambda flags, device: notes.append((flags, device)))
    assert (s.server, s.name) == ("remembered.example:7777", "remembered")
    assert s.port == 5000                                  # given
    assert s.keepalive == 40.0 and isinstance(s.keepalive, float)   # config.toml over remembered
    assert s.socks == "127.0.0.1:2000"                     # remembered over the default
    assert s.http_proxy == "127.0.0.1:3128"
    assert s.hard_nat and s.port_mapping == ("pcp", "nat-pmp", "upnp")   # defaults
    assert notes == [("--socks 127.0.0.1:2000 --http-proxy 127.0.0.1:3128", False)]
    assert s.remember_options == {"socks": "127.0.0.1:2000", "keepalive": 30.0, "port": 5000,
                                  "http_proxy": "127.0.0.1:3128"}
    # --reset forgets the remembered options; the defaults come back
    s = resolve(UpOptions(reset=True), {}, last)
    assert (s.socks, s.http_proxy, s.port, s.keepalive) == ("127.0.0.1:1080", None, 0, 25.0)


def test_off_and_empty_turn_a_text_setting_off(tmp_path):
    last = _prefs(tmp_path, http_proxy="127.0.0.1:3128")
    for off in ("off", ""):
        s = resolve(UpOptions(socks=off, http_proxy=off, advertise_routes=off, via_proxy=off), {}, last)
        assert (s.socks, s.http_proxy, s.advertise_routes, s.via_proxy) == (None, None, (), None)


def test_one_rule_per_setting_with_the_cli_texts(tmp_path):
    last = _prefs(tmp_path)
    cases = [
        (UpOptions(port=70000), "--port 70000: expected 0-65535"),
        (UpOptions(keepalive=3), "--keepalive 3: expected 7-600 seconds"),
        (UpOptions(socks="nope"), "--socks: 'nope': expected HOST:PORT"),
        (UpOptions(proxy_user=["alice"]), "--proxy-user 'alice': expected USER:PASSWORD"),
        (UpOptions(tun=True, tap=True), "--tun, --tap and --userspace exclude each other: choose one"),
        (UpOptions(dev="ovl0"), "--dev needs --tun or --tap"),
        (UpOptions(port_mapping="pcp,nope"), "--port-mapping: unknown port mapping protocol 'nope'"),
        (UpOptions(advertise_routes="10.0.0.0/33"), "--advertise-routes: "),
        (UpOptions(via_proxy="ftp://x"), "--via-proxy 'ftp://x': expected http://HOST:PORT"),
        (UpOptions(wg_peer=["x,y"]), "--wg-peer 'x,y': expected PUBLIC_KEY,HOST:PORT,ALLOWED_IP/PREFIX[,...]"),
        (UpOptions(server="host"), "'host': expected HOST:PORT"),
    ]
    for opts, text in cases:
        with pytest.raises(SettingsError) as e:
            resolve(opts, {}, last)
        assert str(e.value).startswith(text), (opts, str(e.value))
    empty = Prefs(tmp_path / "empty")
    with pytest.raises(SettingsError, match="without a server, give this node's inner address"):
        resolve(UpOptions(wg_peer=[f"{KEY},127.0.0.1:51820,10.9.0.1/32"]), {}, empty)


def test_server_and_name_precedence(tmp_path):
    last = _prefs(tmp_path)
    assert server_and_name(None, None, {"name": "cfg"}, last) == ("remembered.example:7777", "cfg")
    assert server_and_name("given:1", None, {"server": "cfg:2"}, last)[0] == "given:1"


def test_settings_cross_to_the_daemon_typed_and_whole(tmp_path):
    last = _prefs(tmp_path)
    cfg = {"share": [{"port": 8080}, {"port": 53, "proto": "udp"}],
           "forward": [{"listen": 2222, "peer": "bob", "peer_port": 22}],
           "peer": [{"public_key": KEY, "endpoint": "127.0.0.1:51820", "allowed_ips": "10.9.0.1/32"}],
           "proxy_users": {"alice": "pw"}}
    s = resolve(UpOptions(advertise_routes="192.168.2.0/24,192.168.1.0/24", address="10.9.0.2"), cfg, last)
    (peer,) = s.static_peers
    assert peer == StaticPeer(KEY, bytes(range(32)), f"wg-{KEY[:6]}", ("127.0.0.1", 51820), ("10.9.0.1/32",))
    assert s.advertise_routes == ("192.168.1.0/24", "192.168.2.0/24")
    assert [(f.listen, f.peer, f.peer_port, f.udp) for f in s.forwards] == [(2222, "bob", 22, False)]
    assert [(x.port, x.udp) for x in s.shares] == [(8080, False), (53, True)]
    wire = json.loads(json.dumps(s.to_json()))   # what overlay/node/run.py reads from its pipe
    assert NodeSettings.from_json(wire) == s


def test_ui_is_on_by_default_on_loopback_only_and_off_turns_it_off(tmp_path):
    last = _prefs(tmp_path)
    assert resolve(UpOptions(), {}, last).ui == "127.0.0.1:0"
    assert resolve(UpOptions(ui="[::1]:8080"), {}, last).ui == "[::1]:8080"
    assert resolve(UpOptions(ui="off"), {}, last).ui is None
    assert resolve(UpOptions(), {"ui": "off"}, last).ui is None
    assert resolve(UpOptions(), {"ui": "127.0.0.2:9000"}, last).ui == "127.0.0.2:9000"
    for bad in ("0.0.0.0:8080", "192.168.1.2:80", "localhost:80", "127.0.0.1"):
        with pytest.raises(SettingsError, match="^--ui: "):
            resolve(UpOptions(ui=bad), {}, last)
    # remembered like the other options: the next `overlay up` keeps it off
    assert resolve(UpOptions(ui="off"), {}, last).remember_options["ui"] == "off"
    assert resolve(UpOptions(), {}, _prefs(tmp_path, ui="off")).ui is None


def test_dns_is_auto_off_or_a_loopback_address_only(tmp_path):
    from overlay.node.config import ConfigError, validate
    last = _prefs(tmp_path)
    assert resolve(UpOptions(), {}, last).dns == "auto"
    assert resolve(UpOptions(dns="off"), {}, last).dns is None
    assert resolve(UpOptions(), {"dns": "127.0.0.2:5353"}, last).dns == "127.0.0.2:5353"
    s = resolve(UpOptions(dns="127.0.0.1:1053"), {}, last)
    assert s.dns == "127.0.0.1:1053" and s.remember_options == {"dns": "127.0.0.1:1053"}
    assert NodeSettings.from_json(json.loads(json.dumps(s.to_json()))).dns == "127.0.0.1:1053"
    for bad in ("0.0.0.0:53", "192.168.1.5:53", "localhost:53", "127.0.0.1"):   # never on a LAN interface
        with pytest.raises(SettingsError, match="--dns"):
            resolve(UpOptions(dns=bad), {}, last)
        with pytest.raises(ConfigError, match="dns"):
            validate({"dns": bad}, "config.toml")


def test_dns_config_is_auto_resolv_conf_or_off(tmp_path):
    from overlay.node.config import ConfigError, validate
    last = _prefs(tmp_path)
    assert resolve(UpOptions(), {}, last).dns_config == "auto"
    assert resolve(UpOptions(), {"dns_config": "resolv-conf"}, last).dns_config == "resolv-conf"
    s = resolve(UpOptions(dns_config="off"), {}, last)
    assert s.dns_config == "off" and s.remember_options == {"dns_config": "off"}
    assert NodeSettings.from_json(json.loads(json.dumps(s.to_json()))).dns_config == "off"
    assert resolve(UpOptions(), {}, _prefs(tmp_path, dns_config="resolv-conf")).dns_config == "resolv-conf"
    with pytest.raises(SettingsError, match="--dns-config"):
        resolve(UpOptions(dns_config="resolvconf"), {}, last)
    with pytest.raises(ConfigError, match="dns_config"):
        validate({"dns_config": "yes"}, "config.toml")
