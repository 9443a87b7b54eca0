"""Two `overlay server` processes on one PostgreSQL database (LISTEN/NOTIFY between them), and
`overlay server --migrate-from` through the CLI.

Nodes on different instances join one network, see each other online, chat, and go direct (the
punch introduction crosses instances); a node leaving or an instance dying shows as offline on
the other instance. The database is a fresh one in the session's throw-away cluster.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

from cluster import OVERLAY, Cluster, free_port


def members(node, net):
    n = node.network(net)
    return {m["name"]: m for m in n["members"]} if n else {}


def test_two_instances_share_networks_presence_chat_and_introductions(tmp_path, pg_url):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with Cluster(tmp_path / "a", pg_url) as ca, Cluster(tmp_path / "b", pg_url) as cb:
        ca.start_server()
        alice = ca.start_node("alice")
        alice.ok("create", "lan", "--password", "pw")
        cb.start_server()              # started later: loads lan, and A announces alice to it again
        bob = cb.start_node("bob")
        carol = cb.start_node("carol")
        bob.ok("join", "lan", "--password", "pw")            # on the other instance
        carol.ok("join", "lan", "--password", "pw")
        ca.wait(lambda: {n for n, m in members(alice, "lan").items() if m["online"]} == {"alice", "bob", "carol"},
                timeout=10, what="alice (instance A) sees bob and carol (instance B) online")
        cb.wait(lambda: members(bob, "lan").get("alice", {}).get("online"), timeout=10,
                what="bob (instance B) sees alice (instance A) online")
        ips = {n: m["ip"] for n, m in members(alice, "lan").items()}
        assert len(set(ips.values())) == 3
        assert {n: m["ip"] for n, m in members(bob, "lan").items()} == ips

        # chat crosses instances, live and in the history of either
        follow = subprocess.Popen([*OVERLAY, "chat", "lan", "--follow", "--json", "--home", str(alice.home)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert "following chat of lan" in follow.stderr.readline()
            bob.ok("chat", "lan", "hello across instances")
            line = json.loads(follow.stdout.readline())
            assert line["text"] == "hello across instances" and line["from"] == "bob"
        finally:
            follow.terminate()
            follow.wait(5)
        assert "bob@lan: hello across instances" in alice.ok("chat", "lan", "--history")

        # the punch introduction crosses instances: alice and bob go direct
        alice.ok("ping", "bob", "-c", "2")
        ca.wait(lambda: str((alice.peer("bob") or {}).get("path", "")).startswith("direct"), timeout=20,
                what="alice direct to bob")

        # an admin change on A reaches B's nodes: carol banned
        alice.ok("admin", "ban", "lan", "carol")
        cb.wait(lambda: carol.network("lan") is None, timeout=10, what="carol told she is out (instance B)")
        assert "banned" in carol.fails("join", "lan", "--password", "pw")   # B refuses her too

        # a node going away, then a whole instance dying, show as offline on the other instance
        bob.kill(signal.SIGKILL)
        ca.wait(lambda: not members(alice, "lan")["bob"]["online"], timeout=10, what="bob offline for alice")
        bob.start()
        ca.wait(lambda: members(alice, "lan")["bob"]["online"], timeout=15, what="bob back")
        assert members(alice, "lan")["bob"]["ip"] == ips["bob"]

        # an instance dying: its nodes show offline on the other; one moving to the other instance
        # is online again there, with its virtual IP
        cb.server.kill(signal.SIGKILL)
        ca.wait(lambda: not members(alice, "lan")["bob"]["online"], timeout=15,
                what="bob offline once his instance died")
        bob.kill(signal.SIGKILL)
        bob.start(server=ca.server_addr)
        ca.wait(lambda: members(alice, "lan")["bob"]["online"], timeout=20, what="bob online on instance A")
        assert members(alice, "lan")["bob"]["ip"] == ips["bob"]
        assert members(bob, "lan")["alice"]["online"]


def test_migrate_from_cli_says_what_moved_and_refuses_a_non_empty_target(tmp_path, pg_url):
    with Cluster(tmp_path) as c:
        c.start_server()
        a = c.start_node("alice")
        b = c.start_node("bob")
        a.ok("create", "lan", "--password", "pw")
        b.ok("join", "lan", "--password", "pw")
        b.ok("chat", "lan", "kept")
        ips = {n: m["ip"] for n, m in members(a, "lan").items()}
        c.stop_server()
        data = tmp_path / "server"
        argv = [*OVERLAY, "server", "--data", str(data), "--database", pg_url, "--migrate-from", f"sqlite:{data}/overlay.db"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "moved 2 nodes, 1 networks, 2 members" in r.stdout and "1 chat messages" in r.stdout
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "already holds" in r.stderr and "Traceback" not in r.stderr
        # the same data directory (its key), now on PostgreSQL: the nodes come back as they were
        c.database = pg_url
        c.start_server()
        c.wait(lambda: a.connected() and b.connected(), timeout=40, what="nodes reconnected")
        c.wait(lambda: members(a, "lan").get("bob", {}).get("online"), timeout=15, what="bob online")
        assert {n: m["ip"] for n, m in members(a, "lan").items()} == ips
        assert "bob@lan: kept" in a.ok("chat", "lan", "--history")


def test_relay_address_must_be_an_ip_and_port(tmp_path):
    for bad in ("relay.example:7777", "198.51.100.2", "198.51.100.2:0"):
        r = subprocess.run([*OVERLAY, "server", "--data", str(tmp_path / "d"), "--listen", f"127.0.0.1:{free_port()}",
                            "--relay-address", bad], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "--relay-address takes IP:PORT" in r.stderr and "Traceback" not in r.stderr, r


def test_database_errors_are_one_line(tmp_path, pg_cluster):
    r = subprocess.run([*OVERLAY, "server", "--data", str(tmp_path / "d"), "--database", "mysql://x/y"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "postgresql://" in r.stderr
    r = subprocess.run([*OVERLAY, "server", "--data", str(tmp_path / "d"), "--listen", f"127.0.0.1:{free_port()}",
                        "--database", pg_cluster.url("no_such_db")], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "cannot open database" in r.stderr and "Traceback" not in r.stderr


def test_an_instance_dies_and_its_nodes_move_to_the_other_keeping_their_addresses(tmp_path, pg_url):
    """The servers of one deployment share one database and one key; nodes list both."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with Cluster(tmp_path / "a", pg_url) as ca, Cluster(tmp_path / "b", pg_url) as cb:
        ca.start_server()
        (tmp_path / "b" / "server").mkdir(mode=0o700)
        shutil.copy2(tmp_path / "a" / "server" / "server.key", tmp_path / "b" / "server" / "server.key")
        cb.start_server()
        both = f"{ca.server_addr},{cb.server_addr}"
        alice = ca.start_node("alice", "--server", both)
        bob = ca.start_node("bob", "--server", both)
        carol = cb.start_node("carol", "--server", f"{cb.server_addr},{ca.server_addr}")   # on B
        alice.ok("create", "lan", "--password", "pw")
        bob.ok("join", "lan", "--password", "pw")
        carol.ok("join", "lan", "--password", "pw")
        ca.wait(lambda: all(m["online"] for m in members(carol, "lan").values()) and len(members(carol, "lan")) == 3,
                timeout=10, what="carol (B) sees alice and bob (A) online")
        ips = {n: m["ip"] for n, m in members(alice, "lan").items()}
        assert "pong from bob" in alice.ok("ping", "bob", "-c", "2")

        ca.server.kill(signal.SIGKILL)
        cb.wait(lambda: alice.status()["server"].get("address") == cb.server_addr
                and bob.status()["server"].get("address") == cb.server_addr and alice.connected()
                and bob.connected(), timeout=30, what="alice and bob moved to instance B",
                interval=0.2)
        cb.wait(lambda: {n for n, m in members(carol, "lan").items() if m["online"]} == {"alice", "bob", "carol"},
                timeout=15, what="carol sees alice and bob online again")
        assert {n: m["ip"] for n, m in members(alice, "lan").items()} == ips
        assert {n: m["ip"] for n, m in members(carol, "lan").items()} == ips
        assert "pong from bob" in alice.ok("ping", "bob", "-c", "2")
        assert "pong from carol" in alice.ok("ping", "carol", "-c", "2")
