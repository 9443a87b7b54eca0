"""End to end through the `overlay` command: a real server and real node daemons on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from pathlib import Path

from repo_paths import REPO
from cluster import OVERLAY, Cluster, free_port


@pytest.fixture
def cluster(tmp_path, request):
    """A server (SQLite; ``parametrize("cluster", BACKENDS, indirect=True)``: each backend) and its nodes."""
    database = request.getfixturevalue("pg_url") if getattr(request, "param", "sqlite") == "postgres" else None
    with Cluster(tmp_path, database) as c:
        c.start_server()
        yield c


# the representative tests that run against PostgreSQL too (`overlay server --database`)
BACKENDS = ["sqlite", "postgres"]
both_backends = pytest.mark.parametrize("cluster", BACKENDS, indirect=True)


def members(node, net):
    n = node.network(net)
    return {m["name"]: m for m in n["members"]} if n else {}


@both_backends
def test_networks_presence_chat(cluster):
    a = cluster.start_node("alice")
    b = cluster.start_node("bob")
    c = cluster.start_node("carol")
    d = cluster.start_node("dave")

    assert "created network games" in a.ok("create", "games", "--password", "s3cret")
    assert "wrong password" in c.fails("join", "games", "--password", "nope")
    assert "does not exist" in c.fails("join", "nosuch", "--password", "x")
    b.ok("join", "games", "--password", "s3cret")
    c.ok("join", "Games", "--password", "s3cret")  # names are case-insensitive
    d.ok("create", "other", "--password", "pw")

    cluster.wait(lambda: len(members(a, "games")) == 3, what="alice sees 3 members")
    ms = members(c, "games")
    assert set(ms) == {"alice", "bob", "carol"}
    assert all(m["online"] for m in ms.values())
    ips = {m["ip"] for m in ms.values()}
    assert len(ips) == 3 and all(ip.startswith("100.") for ip in ips)
    assert ms["alice"]["role"] == "owner" and ms["bob"]["role"] == "member"

    # isolation: dave shares no network with the others and sees none of them
    assert {p["name"] for p in d.status()["peers"]} == set()
    assert {p["name"] for p in a.status()["peers"]} == {"bob", "carol"}

    # the CLI's --json status follows the documented schema
    st = b.cli_status()
    assert st["node"]["name"] == "bob" and st["node"]["virtual_ip"] == ms["bob"]["ip"]
    assert st["server"]["connected"] is True
    assert {"name", "key", "ip", "online", "networks", "path", "rtt_ms"} <= set(st["peers"][0])
    human = b.ok("status")
    assert "games" in human and "alice" in human and ms["alice"]["ip"] in human

    # chat: a follower prints live messages; history is kept for later readers
    follow = subprocess.Popen([*OVERLAY, "chat", "games", "--follow", "--json", "--home", str(c.home)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "following chat of games" in follow.stderr.readline()
        b.ok("chat", "games", "hello from bob")
        line = json.loads(follow.stdout.readline())
        assert line["text"] == "hello from bob" and line["from"] == "bob" and line["network"] == "games"
    finally:
        follow.terminate()
        follow.wait(5)
    assert "not a member" in d.fails("chat", "games", "intruder")
    hist = a.ok("chat", "games", "--history")
    assert "bob@games: hello from bob" in hist

    # presence: a killed daemon goes offline for the others, and comes back with the same IP
    b.kill(signal.SIGKILL)
    cluster.wait(lambda: not members(a, "games")["bob"]["online"], timeout=10, what="bob offline")
    # pinging an offline peer says so at once
    r = a.run("ping", "bob", "-c", "1", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["error"] == {"code": "peer_offline", "message": "bob is offline"}
    b.start()
    cluster.wait(lambda: members(a, "games")["bob"]["online"], timeout=15, what="bob online again")
    assert members(a, "games")["bob"]["ip"] == ms["bob"]["ip"]

    # leave
    c.ok("leave", "games")
    cluster.wait(lambda: "carol" not in members(a, "games"), what="carol gone")
    assert c.network("games") is None
    assert "not a member" in c.fails("leave", "games")


@both_backends
def test_admin_commands(cluster):
    a = cluster.start_node("owner")
    b = cluster.start_node("bob")
    c = cluster.start_node("carol")
    a.ok("create", "lan", "--password", "pw")

    # lock / unlock
    a.ok("admin", "lock", "lan")
    assert "locked" in b.fails("join", "lan", "--password", "pw")
    a.ok("admin", "unlock", "lan")
    b.ok("join", "lan", "--password", "pw")

    # member limit
    a.ok("admin", "limit", "lan", "2")
    assert "full" in c.fails("join", "lan", "--password", "pw")
    a.ok("admin", "limit", "lan", "0")

    # approval
    a.ok("admin", "approval", "lan", "on")
    assert "waiting for the owner's approval" in c.ok("join", "lan", "--password", "pw")
    pending = json.loads(a.ok("admin", "pending", "lan", "--json"))["pending"]
    assert [p["name"] for p in pending] == ["carol"]
    a.ok("admin", "reject", "lan", "carol")
    assert json.loads(a.ok("admin", "pending", "lan", "--json"))["pending"] == []
    c.ok("join", "lan", "--password", "pw")
    a.ok("admin", "approve", "lan", "carol")
    cluster.wait(lambda: "carol" in members(b, "lan"), what="carol approved")
    a.ok("admin", "approval", "lan", "off")

    # only the owner administers
    assert "only the owner" in b.fails("admin", "kick", "lan", "carol")

    # kick: removed, may rejoin
    a.ok("admin", "kick", "lan", "carol")
    cluster.wait(lambda: c.network("lan") is None, what="carol kicked")
    cluster.wait(lambda: "carol" not in members(b, "lan"), what="bob sees carol gone")
    c.ok("join", "lan", "--password", "pw")

    # ban: removed and refused; unban lets back in
    a.ok("admin", "ban", "lan", "carol")
    cluster.wait(lambda: c.network("lan") is None, what="carol banned")
    assert "banned" in c.fails("join", "lan", "--password", "pw")
    a.ok("admin", "unban", "lan", "carol")
    c.ok("join", "lan", "--password", "pw")
    assert "no member named" in a.fails("admin", "kick", "lan", "nobody")
    # a kicked member can still be banned (and a name nobody had is one error line)
    a.ok("admin", "kick", "lan", "carol")
    cluster.wait(lambda: c.network("lan") is None, what="carol kicked again")
    assert "carol banned (lan)" in a.ok("admin", "ban", "lan", "carol")
    assert "banned" in c.fails("join", "lan", "--password", "pw")
    assert "no member, pending request or former member named 'nobody'" in a.fails("admin", "ban", "lan", "nobody")
    a.ok("admin", "unban", "lan", "carol")
    c.ok("join", "lan", "--password", "pw")

    # ownership transfer; the old owner can then leave
    assert "transfer" in a.fails("leave", "lan")
    a.ok("admin", "transfer", "lan", "bob")
    cluster.wait(lambda: members(c, "lan").get("bob", {}).get("role") == "owner", what="bob owns lan")
    a.ok("leave", "lan")

    # delete: everyone is removed
    b.ok("admin", "delete", "lan", "--yes")
    cluster.wait(lambda: c.network("lan") is None and b.network("lan") is None, what="lan deleted")
    assert "does not exist" in c.fails("join", "lan", "--password", "pw")


def test_names_and_errors(cluster, tmp_path):
    a = cluster.start_node("alice")
    assert "invalid network name" in a.fails("create", "bad name!", "--password", "x")
    a.ok("create", "net1", "--password", "x")
    assert "already exists" in a.fails("create", "net1", "--password", "y")
    # a second node called alice cannot join a network where the name is taken
    dup = cluster.start_node("alice2")
    dup.kill()
    dup.name = "alice"
    dup.start()
    cluster.wait(dup.connected, what="second alice connected")
    assert "already taken" in dup.fails("join", "net1", "--password", "x")

    # commands without a daemon say so in one line
    ghost = tmp_path / "ghost"
    r = subprocess.run([*OVERLAY, "status", "--home", str(ghost)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "not running" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*OVERLAY, "status", "--json", "--home", str(ghost)], capture_output=True, text=True,
                       timeout=30)
    assert json.loads(r.stdout)["error"]["code"] == "not_running"
    # a server that cannot use its data directory says so
    r = subprocess.run([*OVERLAY, "server", "--listen", "127.0.0.1:9", "--data", "/proc/overlay-cannot"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "data directory" in r.stderr and "Traceback" not in r.stderr
    # bad arguments to up
    r = subprocess.run([*OVERLAY, "up", "--server", "nohostport", "--name", "x", "--home", str(ghost)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "HOST:PORT" in r.stderr and "Traceback" not in r.stderr
    # a second daemon on the same home is refused
    r = subprocess.run([*OVERLAY, "up", "--server", cluster.server_addr, "--name", "alice",
                        "--home", str(a.home)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "already running" in r.stderr


def test_key_and_socket_permissions(cluster):
    a = cluster.start_node("alice")
    assert (a.home / "node.key").stat().st_mode & 0o777 == 0o600
    assert (a.home / "overlay.sock").stat().st_mode & 0o777 == 0o600
    assert (a.home / "known_servers").read_text().startswith(cluster.server_addr + " ")


@both_backends
def test_server_restart_persists_everything(cluster):
    a = cluster.start_node("alice")
    b = cluster.start_node("bob")
    c = cluster.start_node("carol")
    a.ok("create", "keep", "--password", "pw")
    b.ok("join", "keep", "--password", "pw")
    c.ok("join", "keep", "--password", "pw")
    a.ok("admin", "ban", "keep", "carol")
    b.ok("chat", "keep", "before the restart")
    before = members(a, "keep")

    cluster.stop_server()
    cluster.wait(lambda: not a.connected(), what="alice notices the server is gone")
    cluster.start_server()
    # nodes reconnect by themselves
    cluster.wait(lambda: a.connected() and b.connected() and c.connected(), timeout=40, what="nodes reconnected")
    cluster.wait(lambda: members(a, "keep").get("bob", {}).get("online"), timeout=15, what="bob back")
    after = members(a, "keep")
    assert {k: v["ip"] for k, v in after.items()} == {k: v["ip"] for k, v in before.items()}
    assert "banned" in c.fails("join", "keep", "--password", "pw")
    assert "before the restart" in a.ok("chat", "keep", "--history")


def test_server_key_change_is_refused(tmp_path):
    with Cluster(tmp_path) as c:
        c.start_server(data="server1")
        a = c.start_node("alice")
        c.stop_server()
        c.start_server(data="server2")  # same address, new key
        c.wait(lambda: a.status()["server"]["state"] == "error", timeout=20, what="key mismatch reported")
        st = a.status()["server"]
        assert "forget-server" in st["error"] and not st["connected"]
        assert "forget-server" in a.proc.output()
        # forgetting the key is enough: the running node reconnects at once (not after 30 s)
        assert "reconnects now" in a.ok("forget-server", c.server_addr)
        c.wait(a.connected, timeout=8, what="reconnected after forgetting the key")


@pytest.mark.parametrize("kind", ["socks5", "http"])
def test_node_reaches_server_through_proxy(tmp_path, kind):
    tool = {"socks5": "microsocks", "http": "tinyproxy"}[kind]
    if shutil.which(tool) is None:
        pytest.skip(f"needs `{tool}` (apt-get install {tool}; .ci/run does)")
    with Cluster(tmp_path) as c:
        c.start_server()
        port = free_port()
        if kind == "socks5":
            proxy = subprocess.Popen([tool, "-i", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"socks5://127.0.0.1:{port}"
        else:
            conf = tmp_path / "tinyproxy.conf"
            conf.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 600\nAllow 127.0.0.1\n"
                            f"ConnectPort {c.port}\nMaxClients 20\n")
            proxy = subprocess.Popen([tool, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
        try:
            a = c.start_node("alice", "--via-proxy", url)
            a.ok("create", "proxied", "--password", "pw")
            # the connection really goes through the proxy: kill it and the node loses the server
            proxy.kill()
            proxy.wait(5)
            c.wait(lambda: not a.connected(), timeout=60, what="connection dropped with the proxy")
        finally:
            proxy.kill()


def _fake_tools(tmp_path, systemctl_ok: bool, linger: str = "no", booted: bool = True) -> dict:
    """A PATH with only python and fake systemctl / loginctl that log their arguments; booted=False:
    a machine (a container) where systemd is not PID 1."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    body = "exit 0" if systemctl_ok else 'echo "Failed to connect to bus: No medium found" >&2; exit 1'
    running = "echo running; exit 0" if booted else "echo offline; exit 1"
    (bin_ / "systemctl").write_text(f'#!/bin/sh\necho "systemctl $*" >> {log}\ncase "$*" in *daemon-reload*) exit 0;; '
                                    f'is-system-running) {running};; esac\n{body}\n')
    (bin_ / "loginctl").write_text(f"#!/bin/sh\necho {linger}\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
            "PATH": f"{bin_}:{os.path.dirname(sys.executable)}:/usr/bin:/bin"}


def test_service_install_one_unit_per_home_without_baked_settings(tmp_path):
    env = _fake_tools(tmp_path, systemctl_ok=True)
    homes = [tmp_path / "h1", tmp_path / "h2"]
    units = []
    for i, home in enumerate(homes):
        r = subprocess.run([*OVERLAY, "service", "install", "--server", "127.0.0.1:9", "--name", f"svc{i}",
                            "--home", str(home)], capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode == 0, r.stderr
        assert "loginctl enable-linger" in r.stderr  # the service must run without a login
        unit = next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("wrote "))
        units.append(Path(unit))
        text = Path(unit).read_text()
        assert f"up --home {home.resolve()}\n" in text and "--server" not in text and "--name" not in text
        assert "WantedBy=default.target" in text
        assert json.loads((home / "prefs.json").read_text())["server"] == "127.0.0.1:9"
    assert units[0] != units[1] and units[0].parent == tmp_path / "cfg" / "systemd" / "user"
    assert f"systemctl --user enable --now {units[0].name}" in (tmp_path / "calls.log").read_text()
    r = subprocess.run([*OVERLAY, "service", "uninstall", "--home", str(homes[0])], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 0 and not units[0].exists() and units[1].exists(), r.stderr
    assert f"systemctl --user disable --now {units[0].name}" in (tmp_path / "calls.log").read_text()


def test_service_install_fails_when_systemctl_fails(tmp_path):
    env = _fake_tools(tmp_path, systemctl_ok=False)
    home = tmp_path / "h"
    r = subprocess.run([*OVERLAY, "service", "install", "--server", "127.0.0.1:9", "--home", str(home)],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: systemctl --user enable --now overlay-") and "Failed to connect to bus" \
        in r.stderr and "loginctl enable-linger" in r.stderr, r.stderr
    assert not list((tmp_path / "cfg").rglob("*.service")), "a unit systemd could not enable was left behind"
    # uninstall removes the unit file whatever systemctl answers
    unit = tmp_path / "cfg" / "systemd" / "user" / r.stderr.split("enable --now ")[1].split()[0]
    unit.write_text("[Unit]\n")
    r = subprocess.run([*OVERLAY, "service", "uninstall", "--home", str(home)], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 1 and "disable --now" in r.stderr and "removed" in r.stderr, r.stderr
    assert not unit.exists()
    # no systemctl at all: an error naming what to run instead
    env["PATH"] = os.path.dirname(sys.executable)
    r = subprocess.run([*OVERLAY, "service", "install", "--server", "127.0.0.1:9", "--home", str(home)],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 1 and "systemctl not found" in r.stderr and "overlay up --home" in r.stderr, r.stderr


def test_service_install_without_systemd_running_writes_nothing(tmp_path):
    """In a container systemd is installed but not PID 1: install says so plainly and writes no
    unit; uninstall removes a unit file it wrote earlier without asking systemd."""
    env = _fake_tools(tmp_path, systemctl_ok=False, booted=False)
    home = tmp_path / "h"
    r = subprocess.run([*OVERLAY, "service", "install", "--server", "127.0.0.1:9", "--home", str(home)],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 1 and r.stderr.startswith("error: systemd is not running on this machine"), r.stderr
    assert "nothing was written" in r.stderr and "overlay up --home" in r.stderr, r.stderr
    assert not (tmp_path / "cfg").exists() and not home.exists()
    assert "enable" not in (tmp_path / "calls.log").read_text()
    # a unit written while systemd ran (say, before the machine became a container image)
    unit = tmp_path / "cfg" / "systemd" / "user" / (
        "overlay-" + __import__("hashlib").sha256(str(home.resolve()).encode()).hexdigest()[:8] + ".service")
    unit.parent.mkdir(parents=True)
    unit.write_text("[Unit]\n")
    r = subprocess.run([*OVERLAY, "service", "uninstall", "--home", str(home)], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 0 and not unit.exists() and "systemd is not running" in r.stdout, r.stdout + r.stderr


def test_config_file_example_and_shares(cluster, tmp_path):
    """config.example.toml parses, and a config.toml is honoured: server, name, socks, shares, forwards."""
    import tomllib
    example = tomllib.loads((REPO / "config.example.toml").read_text())
    assert {"server", "name", "port", "keepalive", "socks"} <= set(example)
    from cluster import Node
    home = tmp_path / "home-cfg"
    home.mkdir()
    (home / "config.toml").write_text(
        f'server = "{cluster.server_addr}"\nname = "fromcfg"\nsocks = "127.0.0.1:0"\nkeepalive = 20\n'
        '[[share]]\nport = 8123\n[[share]]\nport = 27015\nproto = "udp"\n'
        '[[forward]]\nlisten = 0\npeer = "nobody"\npeer_port = 80\n')
    n = Node(cluster, "fromcfg", home)
    n.proc = __import__("cluster").Proc([*OVERLAY, "up", "--home", str(home)], tmp_path / "cfg.log")
    cluster.nodes.append(n)
    cluster.wait(n.connected, what="node from config connected")
    st = n.status()
    assert st["node"]["name"] == "fromcfg"
    assert {(s["port"], s["proto"]) for s in st["shares"]} == {(8123, "tcp"), (27015, "udp")}
    assert st["forwards"][0]["peer"] == "nobody" and st["forwards"][0]["peer_port"] == 80
    bad = tmp_path / "home-bad"
    bad.mkdir()
    (bad / "config.toml").write_text("server = [broken")
    r = subprocess.run([*OVERLAY, "up", "--home", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "config.toml" in r.stderr and "Traceback" not in r.stderr


def test_up_alone_brings_the_node_back_with_its_shares_and_forwards(cluster, tmp_path):
    """prefs.json: the last --server / --name, runtime shares and forwards survive down / up."""
    from cluster import Node, Proc
    from overlay.node.prefs import hostname_label
    a = cluster.start_node("alice")
    b = cluster.start_node("bob")
    a.ok("create", "lan", "--password", "pw")
    b.ok("join", "lan", "--password", "pw")
    cluster.wait(lambda: (a.peer("bob") or {}).get("online"), what="alice sees bob")
    web = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port := free_port())],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        b.ok("share", str(port))
        b.ok("share", "27016/udp")
        b.ok("share", "27017")
        b.ok("unshare", "27017")
        local, gone = free_port(), free_port()
        a.ok("forward", str(local), f"bob:{port}")
        a.ok("forward", str(gone), "bob:22")
        a.ok("unforward", str(gone))
        for n in (a, b):
            n.ok("down")
            cluster.wait(lambda n=n: not n.proc.alive(), what=f"{n.name} stopped")
            # `overlay up` alone: no --server, no --name
            n.proc = Proc([*OVERLAY, "up", "--socks", "127.0.0.1:0", "--home", str(n.home)],
                          tmp_path / f"again-{n.name}.log")
        for n in (a, b):
            cluster.wait(n.connected, what=f"{n.name} back")
            assert n.status()["node"]["name"] == n.name
            assert n.status()["server"]["address"] == cluster.server_addr
        assert {(s["port"], s["proto"]) for s in b.status()["shares"]} == {(port, "tcp"), (27016, "udp")}
        assert [(f["listen"], f["peer"], f["peer_port"]) for f in a.status()["forwards"]] == [
            (f"127.0.0.1:{local}", "bob", port)]
        cluster.wait(lambda: (a.peer("bob") or {}).get("online"), what="alice sees bob again")
        r = subprocess.run(["curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{local}/"], capture_output=True,
                           timeout=30)
        assert r.returncode == 0 and b"Directory listing" in r.stdout, r.stderr
    finally:
        web.kill()
        web.wait()
    # a fresh home with only --server: the host name is the node's name
    fresh = Node(cluster, "fresh", tmp_path / "home-fresh")
    fresh.proc = Proc([*OVERLAY, "up", "--server", cluster.server_addr, "--socks", "127.0.0.1:0",
                       "--home", str(fresh.home)], tmp_path / "fresh.log")
    cluster.nodes.append(fresh)
    cluster.wait(fresh.connected, what="node named after the host")
    assert fresh.status()["node"]["name"] == hostname_label()
    # flags still override, and are remembered in turn
    fresh.ok("down")
    cluster.wait(lambda: not fresh.proc.alive(), what="fresh stopped")
    fresh.proc = Proc([*OVERLAY, "up", "--name", "renamed", "--socks", "127.0.0.1:0", "--home", str(fresh.home)],
                      tmp_path / "renamed.log")
    cluster.wait(fresh.connected, what="renamed node")
    assert fresh.status()["node"]["name"] == "renamed"
    assert json.loads((fresh.home / "prefs.json").read_text())["name"] == "renamed"
    # an unreadable prefs.json is a one-line error naming it
    broken = tmp_path / "home-broken"
    broken.mkdir()
    (broken / "prefs.json").write_text("{not json")
    r = subprocess.run([*OVERLAY, "up", "--home", str(broken)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "prefs.json" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_up_alone_reuses_every_option_of_the_last_up(cluster, tmp_path):
    """Plain `overlay up` runs with the proxies, routes, port and keepalive the last `overlay up` was
    given and says so in one line; an option given replaces its remembered value, 'off' / "" drops
    a proxy or the routes, and --reset forgets them all."""
    from cluster import Proc
    a = cluster.start_node("gw", "--socks", f"127.0.0.1:{(socks := free_port())}", "--http-proxy",
                           f"127.0.0.1:{(http := free_port())}", "--advertise-routes", "10.77.0.0/24",
                           "--port", str(udp := free_port()), "--keepalive", "20", "--port-mapping", "off")
    proxies = lambda: {p["kind"]: p["address"] for p in a.status().get("proxies", [])}  # noqa: E731

    def restart(*args: str, label: str) -> str:
        a.ok("down")
        cluster.wait(lambda: not a.proc.alive(), what="node stopped")
        a.proc = Proc([*OVERLAY, "up", *args, "--home", str(a.home)], tmp_path / f"{label}.log")
        cluster.wait(a.connected, what=f"node back ({label})")
        return a.proc.output()

    assert proxies() == {"socks5": f"127.0.0.1:{socks}", "http": f"127.0.0.1:{http}"}
    text = restart(label="plain")
    assert proxies() == {"socks5": f"127.0.0.1:{socks}", "http": f"127.0.0.1:{http}"}, text
    st = a.status()
    assert st["gateway"]["advertised"] == ["10.77.0.0/24"] and st["udp"]["port"] == udp
    note = next(line for line in text.splitlines() if line.startswith("note:"))
    for flag in (f"--socks 127.0.0.1:{socks}", f"--http-proxy 127.0.0.1:{http}", "--advertise-routes 10.77.0.0/24",
                 f"--port {udp}", "--keepalive 20", "--port-mapping off"):
        assert flag in note, note
    assert "as last time" in note and "--reset" in note
    # an option given replaces the remembered one and is remembered in turn; "" and 'off' drop one
    text = restart("--advertise-routes", "", "--http-proxy", "off", "--socks", f"127.0.0.1:{(socks2 := free_port())}",
                   label="replaced")
    assert proxies() == {"socks5": f"127.0.0.1:{socks2}"} and a.status()["gateway"] is None, text
    text = restart(label="plain-again")
    assert proxies() == {"socks5": f"127.0.0.1:{socks2}"} and a.status()["gateway"] is None, text
    assert a.status()["udp"]["port"] == udp and "--advertise-routes" not in text and "--http-proxy" not in text
    # --reset: the defaults again (but the given options)
    restart("--reset", "--socks", "127.0.0.1:0", label="reset")
    assert json.loads((a.home / "prefs.json").read_text())["options"] == {"socks": "127.0.0.1:0"}
    assert a.status()["udp"]["port"] != udp
    # config.toml wins over the remembered value
    (a.home / "config.toml").write_text(f'socks = "127.0.0.1:{socks}"\n')
    restart(label="config")
    assert proxies() == {"socks5": f"127.0.0.1:{socks}"}


def test_forward_to_unknown_peer_fails_and_to_offline_member_warns(cluster):
    a = cluster.start_node("alice")
    c = cluster.start_node("carol")
    a.ok("create", "lan", "--password", "pw")
    c.ok("join", "lan", "--password", "pw")
    cluster.wait(lambda: (a.peer("carol") or {}).get("online"), what="alice sees carol")
    r = a.run("forward", "9000", "nobody")
    assert r.returncode == 1 and r.stderr.strip().startswith("error: no peer named 'nobody'"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert json.loads(a.run("forward", "9000", "nobody", "--json").stdout)["error"]["code"] == "unknown_peer"
    assert a.status()["forwards"] == []
    r = a.run("forward", str(free_port()), "carol:22")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    c.ok("down")
    cluster.wait(lambda: not (a.peer("carol") or {"online": True})["online"], what="carol offline")
    local = free_port()
    r = a.run("forward", str(local), "carol")
    assert r.returncode == 0 and "warning: carol is offline" in r.stderr, r.stderr
    assert json.loads(a.run("forward", str(free_port()), "carol.lan", "--json").stdout)["warning"].startswith(
        "carol is offline")


def test_messages_name_the_fix(cluster, tmp_path):
    import socket
    a = cluster.start_node("alice")
    c = cluster.start_node("carol")
    a.ok("create", "lan", "--password", "pw")
    c.ok("join", "lan", "--password", "pw")
    cluster.wait(lambda: (a.peer("carol") or {}).get("online"), what="alice sees carol")
    # pinging oneself, and an offline peer
    assert a.fails("ping", "alice") == "error: alice is this node (`overlay status` lists your peers)"
    c.ok("down")
    cluster.wait(lambda: not (a.peer("carol") or {"online": True})["online"], what="carol offline")
    assert a.fails("ping", "carol", "-c", "1") == "error: carol is offline"
    # a busy forward port names another port to use
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        msg = a.fails("forward", str(port), "carol:22")
        assert msg == f"error: 127.0.0.1:{port} is already in use (forward another local port: " \
                      "overlay forward OTHER_PORT carol:22)", msg
    finally:
        busy.close()
    # a busy UDP port names --port
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 0))
    try:
        r = subprocess.run([*OVERLAY, "up", "--server", cluster.server_addr, "--name", "x", "--socks", "off",
                            "--port", str(udp.getsockname()[1]), "--home", str(tmp_path / "hx")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "--port N" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        udp.close()
    # the server going away: status says what to check, no raw exception
    cluster.stop_server()
    cluster.wait(lambda: "connection refused" in (a.status()["server"].get("error") or ""), timeout=30,
                 what="server error in status")
    err = a.status()["server"]["error"]
    assert err == f"cannot reach the server at {cluster.server_addr}: connection refused (is `overlay server` " \
                  "running there?)", err
    assert "Errno" not in a.ok("status")
    # a node that ran before is started again with `overlay up` alone
    a.ok("down")
    cluster.wait(lambda: not a.proc.alive(), what="alice stopped")
    assert f"(start it with `overlay up --home {a.home}`)" in a.fails("status")


@pytest.mark.parametrize("args, message", [
    (["bogus"], "error: No such command 'bogus' (see `overlay --help`)"),
    (["share"], "error: Missing argument 'port' (see `overlay share --help`)"),
    (["admin", "ban", "lan"], "error: Missing argument 'name' (see `overlay admin ban --help`)"),
    (["status", "--nope"], "error: No such option: --nope"),
    (["ping", "x", "-c", "many"], "error: Invalid value for '-c' / '--count'"),
    (["up", "--server", "127.0.0.1:1", "--name", "x", "--advertise-routes", "192.168.1.5/24"],
     "error: --advertise-routes: '192.168.1.5/24' has host bits set: use 192.168.1.0/24"),
    (["up", "--server", "127.0.0.1:1", "--name", "x", "--advertise-routes", "10.0.0.0/8,127.0.0.0/8"],
     "error: --advertise-routes: '127.0.0.0/8' cannot be a route"),
    (["admin", "routes", "lan", "approve", "gw"], "error: usage: overlay admin routes NET [approve|remove NAME PREFIX]"),
    (["admin", "type", "lan", "ring"], "error: network type must be mesh, hub-and-spoke or gateway"),
    (["admin", "encryption", "lan", "maybe"], "error: encryption mode must be 'on' or 'off'"),
])
def test_usage_errors_are_one_line_and_exit_1(args, message):
    r = subprocess.run([*OVERLAY, *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
    assert "╭" not in r.stderr and "Traceback" not in r.stderr


def test_help_version_and_completion():
    from overlay import __version__
    for args in (["-h"], ["--help"], ["admin", "transfer", "-h"], []):
        r = subprocess.run([*OVERLAY, *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "Usage: overlay" in r.stdout, (args, r.stderr)
    r = subprocess.run([*OVERLAY, "admin", "transfer", "-h"], capture_output=True, text=True, timeout=30)
    assert "Hand the network's ownership to another member" in r.stdout
    r = subprocess.run([*OVERLAY, "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == f"overlay {__version__}\n"
    r = subprocess.run([*OVERLAY, "--show-completion", "bash"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "_OVERLAY_COMPLETE" in r.stdout, r.stderr
    env = {**os.environ, "_OVERLAY_COMPLETE": "complete_bash", "COMP_WORDS": "overlay admin tr", "COMP_CWORD": "2"}
    r = subprocess.run(OVERLAY, capture_output=True, text=True, timeout=30, env=env)
    assert r.stdout.split() == ["transfer"]


def test_every_command_and_option_has_help_text():
    import typer
    from overlay.cli import app
    missing = []

    def walk(cmd, path):
        if not (cmd.help or "").strip() and path:
            missing.append(" ".join(path))
        for p in cmd.params:
            if not (getattr(p, "help", None) or "").strip():
                missing.append(f"{' '.join(path)} {p.opts[0] if p.opts else p.name}")
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    assert missing == []


def test_ip_prints_virtual_addresses_and_chat_confirms(cluster):
    a = cluster.start_node("alice")
    b = cluster.start_node("bob")
    a.ok("create", "lan", "--password", "pw")
    b.ok("join", "lan", "--password", "pw")
    cluster.wait(lambda: a.peer("bob"), what="alice sees bob")
    mine, bobs = a.status()["node"]["virtual_ip"], a.peer("bob")["ip"]
    assert a.ok("ip") == f"{mine}\n"
    assert a.ok("ip", "alice") == f"{mine}\n"
    assert a.ok("ip", "bob") == a.ok("ip", "bob.lan") == a.ok("ip", bobs) == f"{bobs}\n"
    assert a.fails("ip", "carol").startswith("error: no peer named 'carol'")
    assert a.ok("chat", "lan", "hi bob").strip() == "sent to lan"


@both_backends
def test_down_is_clean_and_followers_are_told(cluster):
    """`overlay down` with a chat follower, a UDP share in use and forwards: no traceback in the log,
    and the follower says why it ends (exit 1)."""
    import socket
    import time
    a = cluster.start_node("alice")
    b = cluster.start_node("bob")
    a.ok("create", "lan", "--password", "pw")
    b.ok("join", "lan", "--password", "pw")
    cluster.wait(lambda: (a.peer("bob") or {}).get("online"), what="alice sees bob")
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    b.ok("share", f"{echo.getsockname()[1]}/udp")
    local = free_port()
    a.ok("forward", f"{local}/udp", f"bob:{echo.getsockname()[1]}")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    follower = subprocess.Popen([*OVERLAY, "chat", "lan", "--follow", "--home", str(b.home)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "following chat of lan" in follower.stderr.readline()
        for _ in range(50):  # until bob's share has a flow toward the echo socket
            s.sendto(b"x" * 3000, ("127.0.0.1", local))
            echo.settimeout(0.1)
            try:
                echo.recvfrom(65536)
                break
            except socket.timeout:
                continue
        b.ok("down")
        a.ok("down")
        out, err = follower.communicate(timeout=10)
        assert follower.returncode == 1
        assert err.strip() == (f"error: overlay stopped for {b.home}: no more chat to follow "
                               f"(start it with `overlay up --home {b.home}`)"), err
        cluster.wait(lambda: not a.proc.alive() and not b.proc.alive(), what="daemons stopped")
        time.sleep(0.2)
        for n in (a, b):
            log = n.proc.output()
            assert "daemon stopped" in log
            assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    finally:
        s.close()
        echo.close()
        if follower.poll() is None:
            follower.kill()


@both_backends
def test_rename_password_and_pending_requests_in_status(cluster):
    a = cluster.start_node("alice")
    b = cluster.start_node("bob")
    c = cluster.start_node("carol")
    a.ok("create", "lan", "--password", "pw", "--approval")
    # a pending request shows in the owner's status, with the command that answers it
    assert "waiting for the owner's approval" in b.ok("join", "lan", "--password", "pw")
    cluster.wait(lambda: (a.network("lan") or {}).get("pending"), what="pending request in status")
    assert [p["name"] for p in a.network("lan")["pending"]] == ["bob"]
    assert "bob asks to join lan: overlay admin approve lan bob" in a.ok("status")
    a.ok("admin", "approve", "lan", "bob")
    cluster.wait(lambda: a.network("lan")["pending"] == [], what="request answered")
    # the owner changes the password: members stay, joins need the new one
    a.ok("admin", "approval", "lan", "off")
    assert "password changed" in a.ok("admin", "password", "lan", "--password", "n3w")
    assert "wrong password" in c.fails("join", "lan", "--password", "pw")
    c.ok("join", "lan", "--password", "n3w")
    assert "only the owner" in b.fails("admin", "password", "lan", "--password", "x")
    # rename: everyone sees the new name, and it is remembered for the next `overlay up`
    assert b.ok("rename", "robert").strip() == "this node is now robert"
    cluster.wait(lambda: "robert" in members(a, "lan") and "bob" not in members(a, "lan"), what="alice sees robert")
    assert b.status()["node"]["name"] == "robert"
    assert json.loads((b.home / "prefs.json").read_text())["name"] == "robert"
    assert "already taken" in b.fails("rename", "carol")
    a.ok("ping", "robert", "-c", "3")


def test_forward_follows_its_peer_through_a_rename_and_a_restart(cluster, tmp_path):
    """A forward follows the peer's key, not the name it had: after `overlay rename` on the peer a
    new connection through it still reaches the service, status shows the new name, and so it
    stays across a restart of the forwarding daemon."""
    from cluster import Proc
    a = cluster.start_node("alice")
    b = cluster.start_node("bob")
    a.ok("create", "lan", "--password", "pw")
    b.ok("join", "lan", "--password", "pw")
    cluster.wait(lambda: (a.peer("bob") or {}).get("online"), what="alice sees bob")
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hi.txt").write_text("hi from bob\n")
    web = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port := free_port())],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path / "www")

    def fetch() -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{local}/hi.txt"],
                              capture_output=True, text=True, timeout=30)
    try:
        b.ok("share", str(port))
        local = free_port()
        a.ok("forward", str(local), f"bob:{port}")
        cluster.wait(lambda: fetch().stdout == "hi from bob\n", what="the forward reaches bob")
        b.ok("rename", "robert")
        cluster.wait(lambda: a.peer("robert") and not a.peer("bob"), what="alice sees robert")
        r = fetch()
        assert r.returncode == 0 and r.stdout == "hi from bob\n", r.stderr
        assert [(f["peer"], f["peer_port"]) for f in a.status()["forwards"]] == [("robert", port)]
        assert f"-> robert:{port}" in a.ok("status")
        assert [f["peer"] for f in a.cli_status()["forwards"]] == ["robert"]
        # the peer renames again while this daemon is down: the restored forward follows the key
        a.ok("down")
        cluster.wait(lambda: not a.proc.alive(), what="alice stopped")
        b.ok("rename", "rob")
        a.proc = Proc([*OVERLAY, "up", "--socks", "127.0.0.1:0", "--home", str(a.home)], tmp_path / "again.log")
        cluster.wait(lambda: (a.peer("rob") or {}).get("online"), what="alice back and sees rob")
        assert [f["peer"] for f in a.status()["forwards"]] == ["rob"]
        r = fetch()
        assert r.returncode == 0 and r.stdout == "hi from bob\n", r.stderr
    finally:
        web.kill()
        web.wait()


def test_offline_and_online_in_a_network_without_leaving(cluster, tmp_path):
    from cluster import Proc
    a = cluster.start_node("alice")
    b = cluster.start_node("bob")
    a.ok("create", "lan", "--password", "pw")
    b.ok("join", "lan", "--password", "pw")
    cluster.wait(lambda: (a.peer("bob") or {}).get("online"), what="alice sees bob")
    assert "offline in lan" in b.ok("offline", "lan")
    cluster.wait(lambda: not a.peer("bob")["online"], what="alice sees bob offline")
    assert members(a, "lan")["bob"]["online"] is False and "bob" in members(a, "lan")
    assert a.fails("ping", "bob", "-c", "1") == "error: bob is offline"
    assert b.network("lan")["away"] is True and b.peer("alice") is None
    assert "you are offline in lan: overlay online lan" in b.ok("status")
    # remembered across a restart
    b.ok("down")
    cluster.wait(lambda: not b.proc.alive(), what="bob stopped")
    b.proc = Proc([*OVERLAY, "up", "--socks", "127.0.0.1:0", "--home", str(b.home)], tmp_path / "bob-again.log")
    cluster.wait(b.connected, what="bob back")
    cluster.wait(lambda: b.network("lan") and b.network("lan")["away"], what="bob still offline in lan")
    cluster.wait(lambda: a.peer("bob") and not a.peer("bob")["online"], what="alice sees bob offline again")
    assert "online in lan" in b.ok("online", "lan")
    cluster.wait(lambda: a.peer("bob")["online"], what="alice sees bob online")
    a.ok("ping", "bob", "-c", "3")


def test_daemon_sheds_the_cli_libraries_and_status_takes_the_short_path(cluster):
    """`overlay up` becomes overlay.node.run (same PID) without typer / pydantic in memory, and
    `overlay status` parsed without typer prints what the typer path prints."""
    a = cluster.start_node("alice")
    pid = a.proc.p.pid
    cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    assert b"overlay.node.run" in cmdline
    maps = open(f"/proc/{pid}/maps").read()
    assert "pydantic_core" not in maps and "cryptography" in maps
    code = ("import sys; from overlay.cli import app; "
            "app(['status', '--json', '--home', sys.argv[1]], prog_name='overlay', standalone_mode=False)")
    via_typer = subprocess.run([sys.executable, "-c", code, str(a.home)], capture_output=True, text=True, timeout=30)
    short = a.run("status", "--json")
    assert short.returncode == 0 and via_typer.returncode == 0, via_typer.stderr
    strip = lambda text: {k: v for k, v in json.loads(text).items() if k not in ("udp", "peers")}  # noqa: E731
    assert strip(short.stdout) == strip(via_typer.stdout)
    from overlay.cli_base import fast_status
    assert not fast_status(["status", "--nope"]) and not fast_status(["status", "-h"])
    assert not fast_status(["ping", "x"])
    # and the short path never imports typer
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "overlay", "status", "--json", "--home", str(a.home)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "typer" not in r.stderr and "overlay.cli\n" not in r.stderr, r.stderr[-2000:]


def _handshake_answered(sender_home: Path, target: Path, port: int, wait: float = 1.5) -> bool:
    """Send a hand-built WireGuard handshake initiation with the key in ``sender_home`` to the node
    with home ``target`` listening on UDP ``port``; True if it answers with a handshake response."""
    import socket
    import time as _time
    from overlay import crypto
    from overlay.node.home import Home
    from overlay.wire.cookie import CookieGenerator
    from overlay.wire.handshake import Handshake, create_initiation, tai64n
    priv = Home(sender_home).private_key()
    remote = crypto.public_key(Home(target).private_key())
    hs = Handshake(priv, remote, bytes(32))
    msg = create_initiation(hs, crypto.public_key(priv), 4242, tai64n(_time.time()))
    CookieGenerator(remote).add_macs(msg, _time.monotonic())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(wait)
        s.sendto(bytes(msg), ("127.0.0.1", port))
        try:
            data = s.recv(2048)
        except socket.timeout:
            return False
    return data[0] == 2


@both_backends
def test_hub_and_spoke_spokes_cannot_see_or_reach_each_other(cluster):
    o = cluster.start_node("owner")
    hub = cluster.start_node("hub")
    s1 = cluster.start_node("s1")
    s2 = cluster.start_node("s2")
    o.ok("create", "star", "--password", "pw")
    for n in (hub, s1, s2):
        n.ok("join", "star", "--password", "pw")
    cluster.wait(lambda: {p["name"] for p in s1.status()["peers"]} == {"owner", "hub", "s2"}, what="mesh first")
    # a spoke may still reach the other one by hand while the network is a mesh (the probe works)
    assert _handshake_answered(s1.home, s2.home, s2.status()["udp"]["port"])

    assert "only the owner" in hub.fails("admin", "type", "star", "hub-and-spoke")
    assert "network type must be" in o.fails("admin", "type", "star", "ring")
    assert "takes effect once it is hub-and-spoke" in o.ok("admin", "hub", "star", "hub", "on")
    assert "star is a hub-and-spoke network" in o.ok("admin", "type", "star", "hub-and-spoke")
    cluster.wait(lambda: {p["name"] for p in s1.status()["peers"]} == {"hub"}, what="s1 sees only the hub")
    cluster.wait(lambda: {p["name"] for p in s2.status()["peers"]} == {"hub"}, what="s2 sees only the hub")
    cluster.wait(lambda: {p["name"] for p in hub.status()["peers"]} == {"owner", "s1", "s2"}, what="hub sees all")
    assert set(members(s1, "star")) == {"s1", "hub"}

    st = s1.cli_status()
    net = st["networks"][0]
    assert net["type"] == "hub-and-spoke"
    assert {m["name"]: m["kind"] for m in net["members"]} == {"s1": "spoke", "hub": "hub"}
    human = hub.ok("status")
    assert "hub-and-spoke" in human and "member, spoke" in human and "member, hub" in human

    # reach: the hub yes, the other spoke is not even a peer
    assert "pong from hub" in s1.ok("ping", "hub", "-c", "3")
    # the refusal says why: they share the network, but spokes do not reach each other in it
    msg = s1.fails("ping", "s2", "-c", "1")
    assert "no peer named 's2' is reachable from this node: spokes do not reach each other in the " \
           "hub-and-spoke network star, only its hubs (hub)" in msg, msg
    assert "shares a network" not in msg
    msg = s1.fails("forward", str(free_port()), "s2:22")
    assert "spokes do not reach each other in the hub-and-spoke network star" in msg, msg
    msg = s1.fails("ip", "s2")
    assert "spokes do not reach each other in the hub-and-spoke network star" in msg, msg
    # and a hand-built handshake from one spoke's key to the other is not answered: cryptokey
    # routing refuses it (the hub, which has s1 as a peer, does answer the same probe)
    assert not _handshake_answered(s1.home, s2.home, s2.status()["udp"]["port"])
    assert not _handshake_answered(s2.home, s1.home, s1.status()["udp"]["port"])
    assert _handshake_answered(s1.home, hub.home, hub.status()["udp"]["port"])

    # hub off: the spokes lose it too; gateway type: members reach only the gateway
    o.ok("admin", "hub", "star", "hub", "off")
    cluster.wait(lambda: s1.status()["peers"] == [], what="no hubs: s1 alone")
    assert "takes effect once it is a gateway network" not in o.ok("admin", "type", "star", "gateway")
    assert "hub is the gateway of star" in o.ok("admin", "gateway", "star", "hub")
    cluster.wait(lambda: {p["name"] for p in s2.status()["peers"]} == {"hub"}, what="s2 sees the gateway")
    assert "members do not reach each other in the gateway network star, only its gateway (hub)" in \
        s2.fails("ping", "s1", "-c", "1")
    assert {m["name"]: m["kind"] for m in s2.cli_status()["networks"][0]["members"]} == \
        {"s2": "member", "hub": "gateway"}
    o.ok("admin", "type", "star", "mesh")
    cluster.wait(lambda: {p["name"] for p in s1.status()["peers"]} == {"owner", "hub", "s2"}, what="mesh again")


def test_piped_output_keeps_whole_lines_and_ping_streams(cluster):
    """`overlay status | cat` and `overlay ping X | cat`: no line broken at 80 columns, no table
    row cut, and ping's lines arrive as they happen (not when the command exits)."""
    long1, long2 = "bob-has-a-rather-long-node-name1", "carol-has-a-long-node-name-too-2"
    from cluster import Node
    a = cluster.start_node("alice")
    b, c = Node(cluster, long1, cluster.tmp / "b").start(), Node(cluster, long2, cluster.tmp / "c").start()
    cluster.nodes += [b, c]   # (short homes: the API socket's path has a length limit)
    cluster.wait(lambda: b.connected() and c.connected(), what="long-named nodes connected")
    a.ok("create", "a-network-with-a-long-name", "--password", "pw")
    b.ok("join", "a-network-with-a-long-name", "--password", "pw")
    a.ok("admin", "approval", "a-network-with-a-long-name", "on")
    c.ok("join", "a-network-with-a-long-name", "--password", "pw")
    cluster.wait(lambda: (a.peer(long1) or {}).get("online") and (a.network("a-network-with-a-long-name") or {})
                 .get("pending"), what="bob online, carol pending")
    r = subprocess.run([*OVERLAY, "status", "--home", str(a.home)], stdout=subprocess.PIPE, text=True, timeout=30)
    lines = r.stdout.splitlines()
    asks = [line for line in lines if "asks to join" in line]
    assert len(asks) == 1 and asks[0].rstrip().endswith("(or reject)") and long2 in asks[0], r.stdout
    row = [line for line in lines if long1 in line]
    assert len(row) == 1 and row[0].startswith("│") and row[0].rstrip().endswith("│"), r.stdout
    assert "direct" in row[0] and " ms" in row[0], r.stdout   # the path column, whole
    p = subprocess.Popen([*OVERLAY, "ping", long1, "-c", "30", "--no-until-direct", "--home", str(a.home)],
                         stdout=subprocess.PIPE, text=True)
    try:
        first = p.stdout.readline()
        assert p.poll() is None, "ping's first line came only when it exited"
        assert first.startswith(f"pong from {long1} (") and first.rstrip().endswith(" ms"), first
    finally:
        p.kill()
        p.wait()


@both_backends
def test_status_roles_routes_to_approve_and_prompts_without_a_terminal(cluster):
    """A gateway network's plain member reads `member`, not `member, member`; the owner's status
    names the routes waiting for approval; a route in the overlay's pool is called unapprovable
    at once (log and status); `admin delete` without a terminal says to add --yes; a password
    piped in is read without Python's GetPassWarning."""
    a = cluster.start_node("alice")
    b = cluster.start_node("bob", "--advertise-routes", "10.55.0.0/24,100.64.5.0/24")
    c = cluster.start_node("carol")
    r = a.run("create", "lan", input="pw\n")
    assert r.returncode == 0 and "Warning" not in r.stderr and "created network lan" in r.stdout, r.stderr
    for n in (b, c):
        r = n.run("join", "lan", input="pw\n")
        assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr
    a.ok("admin", "type", "lan", "gateway")
    a.ok("admin", "gateway", "lan", "bob")
    cluster.wait(lambda: (members(b, "lan").get("carol") or {}).get("kind") == "member", what="carol a plain member")
    for n in (b, c):   # the gateway sees every member, carol sees herself and the gateway
        st = n.ok("status")
        row = next(line for line in st.splitlines() if line.startswith("│ carol "))
        assert "member, member" not in row and "│ member " in row, st
    st = a.ok("status")
    assert "bob offers 10.55.0.0/24, waiting for your approval: overlay admin routes lan approve bob 10.55.0.0/24" \
        in st and "100.64.5.0/24" not in st, st
    cluster.wait(lambda: "100.64.5.0/24 overlaps the overlay's address pool" in b.proc.output(),
                 what="the gateway's warning")
    st = b.ok("status")
    assert "100.64.5.0/24 can never be approved: it overlaps the overlay's address pool 100.64.0.0/10" in st, st
    assert "waiting for approval: 10.55.0.0/24)" in st, st
    a.ok("admin", "routes", "lan", "approve", "bob", "10.55.0.0/24")
    cluster.wait(lambda: "offers" not in a.ok("status"), what="nothing left to approve")
    r = a.run("admin", "delete", "lan")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "--yes" in r.stderr, r.stderr
    assert a.network("lan") is not None
