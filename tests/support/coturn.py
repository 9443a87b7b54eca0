"""Debian's coturn (``turnserver``) in a NAT lab host, for the TURN tests and benchmarks.

    host = nl.add_site("turn", "none").hosts[0]         # a public host of its own
    proc = coturn.start(nl, host, workdir)               # REST credentials (use-auth-secret), UDP only
    overlay server ... --turn turn:{host.ip}:3478 --turn-secret coturn.SECRET

No TLS, no TCP relaying, 200 relay ports, its SQLite database and pid file in ``workdir``; the log
(``--verbose``: every request with its REST username) is the process's stdout. Extra arguments go
last, as ``--option=value`` (coturn ignores some options given as ``--option value``).
"""

from __future__ import annotations

import os

import natlab
from polling import wait

PORT = 3478
SECRET = "lab-turn-secret"
REALM = "overlay.lab"


def start(nl: natlab.NatLab, host: natlab.Host, workdir: str, *extra: str) -> natlab.Proc:
    argv = ["turnserver", "-n", f"--listening-ip={host.ip}", f"--relay-ip={host.ip}", f"--external-ip={host.ip}",
            f"--listening-port={PORT}", "--min-port=49152", "--max-port=49351",
            "--use-auth-secret", f"--static-auth-secret={SECRET}", f"--realm={REALM}",
            "--no-tls", "--no-dtls", "--no-tcp-relay", "--no-cli", "--no-multicast-peers",
            "--fingerprint", "--log-file=stdout", "--simple-log", "--verbose",
            f"--pidfile={os.path.join(workdir, 'turnserver.pid')}", f"--userdb={os.path.join(workdir, 'turndb')}",
            *extra]
    proc = nl.popen(host.name, argv, label="coturn", cwd=workdir)

    def listening() -> bool:
        r = nl.run(host.name, ["ss", "-uln", f"( sport = :{PORT} )"], check=False, timeout=5)
        return f"{host.ip}:{PORT}" in r.stdout
    wait(listening, 15, "coturn listening", 0.1, on_fail=proc.describe)
    return proc
