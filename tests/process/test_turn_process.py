"""`overlay server --turn`: its options, and the TURN server reaching the nodes' status (no root:
the relaying itself is tested against coturn in tests/lab/test_turn_lab.py)."""

from __future__ import annotations

import subprocess

from cluster import OVERLAY, Cluster


def server_error(tmp_path, *args: str) -> str:
    # refused before anything listens (port 9 is never bound)
    r = subprocess.run([*OVERLAY, "server", "--listen", "127.0.0.1:9", "--data", str(tmp_path / "srv"), *args],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, (r.stdout, r.stderr)
    return r.stderr.strip().splitlines()[-1]


def test_turn_options_are_checked(tmp_path):
    assert "--turn and --turn-secret go together" in server_error(tmp_path, "--turn", "turn:192.0.2.1:3478")
    assert "--turn and --turn-secret go together" in server_error(tmp_path, "--turn-secret", "s")
    assert "turn:HOST:PORT" in server_error(tmp_path, "--turn", "stun:192.0.2.1:3478", "--turn-secret", "s")
    assert "lifetime" in server_error(tmp_path, "--turn", "turn:192.0.2.1", "--turn-secret", "s", "--turn-ttl", "5")


def test_nodes_learn_the_turn_server_and_allocate_only_when_needed(tmp_path):
    with Cluster(tmp_path) as c:
        c.start_server("--turn", "turn:127.0.0.1:3478", "--turn-secret", "s3cret")
        a = c.start_node("alice")
        turn = c.wait(lambda: a.status()["udp"].get("turn"), what="alice knows the TURN server")
        # no peer needed a relay: nothing allocated (and nothing sent to 127.0.0.1:3478)
        assert turn["server"] == "127.0.0.1:3478" and turn["state"] == "idle" and turn["allocations"] == 0, turn
        assert "TURN server:              127.0.0.1:3478 (idle)" in a.ok("netcheck")
        c.stop_server()
        c.start_server()                    # the same server without --turn: the nodes forget it
        c.wait(lambda: a.connected() and a.status()["udp"]["turn"] is None, timeout=30,
               what="alice connected again, without a TURN server")
