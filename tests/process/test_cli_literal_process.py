"""Peer-supplied text reaches a real terminal literally through the CLI (issue 9.3). The formatting
helpers alone: tests/unit/cli/test_cli_literal.py."""

from __future__ import annotations

import subprocess
from cluster import OVERLAY, Cluster
from tests.unit.cli.test_cli_literal import NASTY
from overlay.cli import visible


def test_chat_with_markup_and_escapes_is_shown_literally(tmp_path):
    with Cluster(tmp_path) as c:
        c.start_server()
        a = c.start_node("alice")
        b = c.start_node("bob")
        a.ok("create", "games", "--password", "pw")
        b.ok("join", "games", "--password", "pw")
        follow = subprocess.Popen([*OVERLAY, "chat", "games", "--follow", "--home", str(a.home)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert "following chat of games" in follow.stderr.readline()
            for text in NASTY:
                b.ok("chat", "games", text)
            live = [follow.stdout.readline() for _ in NASTY]
        finally:
            follow.terminate()
            follow.wait(5)
        hist = a.run("chat", "games", "--history")
        assert hist.returncode == 0 and "Traceback" not in hist.stderr, hist.stderr
        lines = hist.stdout.splitlines()
        assert len(lines) == len(NASTY)        # one line per message, whatever it contains
        for text, line, live_line in zip(NASTY, lines, live):
            assert line.endswith(f" bob@games: {visible(text)}"), line
            assert live_line.rstrip("\n") == line
        assert "\x1b" not in hist.stdout and "\r" not in hist.stdout and "\u202e" not in hist.stdout
        # a user's own argument in an error message is literal too
        err = a.fails("join", "[/x]", "--password", "pw")
        assert "invalid network name '[/x]'" in err and err.startswith("error:")


def test_error_lines_are_literal(tmp_path):
    """The CLI's own error lines went through markup too: "[[share]]" came out as "[]"."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('server = "127.0.0.1:9"\nname = "n"\n[[share]]\nproto = "udp"\n')
    r = subprocess.run([*OVERLAY, "up", "--home", str(home)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "config.toml: [[share]] #1: missing port" in r.stderr, r.stderr
