"""config.toml validation: every bad setting is one line naming the file, the key and what is
allowed; unknown keys are errors (with the closest known key); the example file is valid."""

from __future__ import annotations

import tomllib

import pytest

from repo_paths import REPO
from overlay.node.config import ConfigError, validate

EXAMPLE = REPO / "config.example.toml"


def test_example_config_is_valid_including_its_commented_out_settings():
    text = EXAMPLE.read_text()
    assert validate(tomllib.loads(text), EXAMPLE)
    # uncomment every "# key = value" and "# [[table]]" line: those must be valid settings too
    lines = []
    for line in text.splitlines():
        body = line[2:] if line.startswith("# ") else None
        if body and (body.startswith("[[") or (" = " in body and body.split(" = ")[0].isidentifier())):
            line = body
        lines.append(line)
    full = tomllib.loads("\n".join(lines))
    assert {"via_proxy", "proxy_users", "http_proxy", "address", "share", "forward", "peer"} <= set(full)
    validate(full, EXAMPLE)


@pytest.mark.parametrize("toml, expected", [
    ('keepalive = 3', 'keepalive = 3: expected a number of seconds from 7 to 600'),
    ('keepalive = "25"', 'keepalive = "25": expected a number of seconds from 7 to 600'),
    ('port = 70000', 'port = 70000: expected a UDP port (0: any) from 0 to 65535'),
    ('port = true', 'port = true: expected a UDP port'),
    ('server = "nohostport"', 'server = "nohostport": expected "HOST:PORT"'),
    ('socks = "127.0.0.1"', 'socks = "127.0.0.1": expected "HOST:PORT" or "off"'),
    ('name = "bad name!"', 'name = "bad name!": expected a name of 1-32 letters'),
    ('address = "10.0.0.300"', 'address = "10.0.0.300": expected an IPv4 address'),
    ('via_proxy = "ftp://x:1"', 'via_proxy = "ftp://x:1": expected "http://HOST:PORT"'),
    ('proxy_users = { alice = "" }', 'proxy_users: expected a table of user names'),
    ('keepalivee = 20', "unknown key 'keepalivee' (did you mean 'keepalive'?)"),
    ('colour = "red"', "unknown key 'colour' (known: server, name,"),
    ('[[share]]\nport = 8000\nproto = "sctp"', '[[share]] #1: proto = "sctp": expected "tcp" or "udp"'),
    ('[[share]]\nproto = "udp"', '[[share]] #1: missing port'),
    ('[[share]]\nport = 1\n[[share]]\nport = 0', '[[share]] #2: port = 0: expected a port from 1 to 65535'),
    ('[[forward]]\nlisten = 80\npeer = "bob"\nudp = "yes"', '[[forward]] #1: udp = "yes": expected true or false'),
    ('[[forward]]\nlisten = 80', '[[forward]] #1: missing peer'),
    ('[[forward]]\nlisten = 80\npeer = "bob"\npeerport = 81', "unknown key 'peerport' (did you mean 'peer_port'?)"),
    ('share = 8000', 'share: expected [[share]] tables'),
    ('[[peer]]\npublic_key = "k"\nallowed_ips = ["10.0.0.1/40"]', 'allowed_ips = [\'10.0.0.1/40\']: expected an IPv4'),
])
def test_bad_settings_name_file_key_and_what_is_allowed(toml, expected):
    with pytest.raises(ConfigError) as e:
        validate(tomllib.loads(toml), "/home/u/.config/overlay/config.toml")
    msg = str(e.value)
    assert msg.startswith("/home/u/.config/overlay/config.toml: ") and expected in msg, msg
    assert "\n" not in msg


def test_passwords_are_never_echoed():
    with pytest.raises(ConfigError) as e:
        validate({"proxy_users": {"alice": 5, "bob": "hunter2"}}, "c.toml")
    assert "hunter2" not in str(e.value)
