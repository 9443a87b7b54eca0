"""A throw-away PostgreSQL cluster for the tests: Debian's server binaries, a temporary data
directory, a Unix socket in it (no TCP port), trust authentication, fsync off.

One cluster per test session (``Cluster.start``), a fresh database per test (``create_database``),
everything removed at ``stop``. initdb refuses to run as root, so as root the cluster runs as the
``postgres`` user Debian's package creates (the temporary directory is handed to it).
Without the binaries the fixtures skip, except in CI (CI=true), where they are installed.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

BIN_GLOB = "/usr/lib/postgresql/*/bin"


def find_bin() -> Path | None:
    for d in sorted(glob.glob(BIN_GLOB), reverse=True):
        if Path(d, "initdb").exists() and Path(d, "pg_ctl").exists():
            return Path(d)
    return None


class Cluster:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.tmp = Path(tempfile.mkdtemp(prefix="overlay-pg-"))
        self.data = self.tmp / "data"
        self.port = random.randrange(20000, 60000)     # names the socket file only (no TCP)
        self.user: str | None = None
        self._ids = itertools.count(1)
        if os.geteuid() == 0:
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
        os.chmod(self.tmp, 0o755)      # the tests' processes reach the socket in it

    def _run(self, *args: str, timeout: float = 60) -> None:
        kw = {"user": self.user, "group": self.user} if self.user else {}
        r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=self.tmp,
                           **kw)  # type: ignore[call-overload]
        if r.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({r.returncode}): {r.stdout}{r.stderr}")

    def start(self) -> "Cluster":
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync")
        opts = f"-k {self.tmp} -p {self.port} -c listen_addresses='' -c fsync=off -c max_connections=200"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.tmp / "log"),
                  "-w", "-t", "60", "start", timeout=90)
        return self

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        for _ in range(50):      # the server's last files may still be going away
            shutil.rmtree(self.tmp, ignore_errors=True)
            if not self.tmp.exists():
                break
            time.sleep(0.1)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.tmp}&port={self.port}"

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"t{os.getpid()}_{next(self._ids)}"
        try:    # copying the template's files is the quicker way for a tiny database (PostgreSQL >= 15)
            self.psql(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        except RuntimeError:
            self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        psql = shutil.which("psql") or str(self.bindir / "psql")
        r = subprocess.run([psql, "-X", "-q", "-A", "-t", "-h", str(self.tmp), "-p", str(self.port), "-U", "postgres",
                            "-d", database, "-c", sql], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr}")
        return r.stdout

    def log_tail(self) -> str:
        try:
            return (self.tmp / "log").read_text()[-3000:]
        except OSError:
            return ""
