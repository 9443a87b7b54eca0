"""UPnP IGD mapping of the node's UDP port: a sans-I/O core (``UpnpCore``) deciding when to
discover, map, renew and delete, and ``Igd``, which performs those steps with miniupnpc.

Why miniupnpc: it is the reference UPnP IGD client, by the author of miniupnpd, maintained, with
wheels on PyPI; it does SSDP discovery, the device description and the SOAP calls. Its calls
block (discovery waits ``DISCOVER_MS`` for answers; SOAP is HTTP), so ``Igd.run`` is meant for a
worker thread; the core hands out jobs and takes their results with ``now``, so that it is
tested with scripted router answers.

Why a worker process: miniupnpc reads a description or SOAP answer whole into memory, with no
size cap and only per-read timeouts, and it fetches the description itself (a size check in
Python before the call would be a second, different fetch). Any device on the LAN can answer
discovery, so miniupnpc runs in a child process (``upnp_worker``) with its address space capped
and a wall-clock limit per job: an endless or dripping description kills the child, not the
node. One long-lived child (not one per job) keeps the selected IGD between jobs, so the
deletion on exit is one SOAP call, not a new discovery. Rewriting SSDP, the description parser
and SOAP in Python with caps would replace a maintained client with our own for one threat.

Jobs (tuples): ``("discover",)`` -> ``{"external_ip", "lan_addr"}``; ``("map", external, internal,
lease)`` -> ``{"external_ip"}``; ``("delete", external)`` -> ``{}``. A failed job's result is
``{"error": text}`` (miniupnpc's error text, e.g. "OnlyPermanentLeasesSupported").

Policy: discover once; no IGD: ``answered`` False and ask again after ``retry_after``. With an
IGD and ``may_map``: AddPortMapping UDP external = internal port (our socket's), lease
``lease`` (3600 s), renewed at half. An IGD that only supports permanent leases (error 725) is
asked again with lease 0, and that mapping is deleted on exit like the others. An external port
taken by another host (718 ConflictInMappingEntry) is retried twice on a random port.
"""

from __future__ import annotations

import json
import os
import random
import select
import subprocess
import sys
import time

IDLE, DISCOVERING, FOUND, MAPPING, MAPPED, FAILED = "idle", "discovering", "found", "mapping", "mapped", "failed"
DISCOVER_MS = 2000
LEASE = 3600
JOB_TIMEOUT = 10.0      # seconds for a SOAP call (discovery: plus DISCOVER_ROUNDS * DISCOVER_MS)
DISCOVER_ROUNDS = 5     # miniupnpc waits DISCOVER_MS per search it sends (4 when nothing answers)
MAX_ANSWER = 4096       # bytes of the worker's answer line
PERMANENT_ONLY = "OnlyPermanentLeasesSupported"
CONFLICT = "ConflictInMappingEntry"


class UpnpCore:
    protocol = "upnp"

    def __init__(self, internal_port: int, now: float, *, lease: int = LEASE, retry_after: float = 300.0,
                 may_map: bool = True, rng: random.Random | None = None):
        self.internal_port = internal_port
        self.lease = lease
        self.retry_after = retry_after
        self.may_map = may_map
        self.state = IDLE
        self.answered: bool | None = None
        self.external_ip: str | None = None
        self.external_port: int | None = None
        self.lan_addr: str | None = None
        self.error: str | None = None
        self.permanent = False          # the IGD refused leases: lease 0, deleted on exit
        self.changed = False
        self._jobs: list[tuple] = []
        self._busy: tuple | None = None
        self._conflicts = 0
        self._next: float | None = now
        self._rng = rng or random.Random()

    @property
    def mapped(self) -> tuple[str, int] | None:
        if self.state in (MAPPED, MAPPING) and self.external_ip and self.external_port:
            return (self.external_ip, self.external_port)
        return None

    def get_timer(self) -> float | None:
        return None if self._busy else self._next

    def handle_timer(self, now: float) -> None:
        if self._busy or self._next is None or now < self._next:
            return
        self._next = None
        if self.state in (IDLE, FAILED):
            self.state = DISCOVERING
            self._job(("discover",))
        elif self.state == MAPPED:              # renewal at half the lease
            self._map(self.external_port or self.internal_port)

    def hold_off(self, now: float | None) -> None:
        """Stop asking (``now`` None: another protocol holds the mapping), or, when ``now`` is
        given and nothing is scheduled, ask again ``retry_after`` from now."""
        if now is None:
            self._next = None
        elif self._next is None:
            self._next = now + self.retry_after

    def allow_mapping(self, now: float) -> None:
        self.may_map = True
        if self.state == FOUND and not self._busy:
            self._map(self.internal_port)

    def _map(self, external: int) -> None:
        self.state = MAPPING
        self._job(("map", external, self.internal_port, 0 if self.permanent else self.lease))

    def _job(self, job: tuple) -> None:
        self._busy = job
        self._jobs.append(job)

    def jobs_to_run(self) -> list[tuple]:
        jobs, self._jobs = self._jobs, []
        return jobs

    def _fail(self, now: float, error: str) -> None:
        if self.external_port is not None:
            self.changed = True
        self.error = error
        self.state = FAILED
        self.external_port = None
        self._next = now + self.retry_after

    def job_done(self, job: tuple, result: dict, now: float) -> None:
        """The result of a job handed out by ``jobs_to_run`` (run elsewhere, maybe on a thread)."""
        if job != self._busy:
            return
        self._busy = None
        error = result.get("error") if isinstance(result, dict) else "bad result"
        if job[0] == "discover":
            if error:
                self.answered = False
                self._fail(now, error)
                return
            self.answered = True
            self.error = None
            self.external_ip = result.get("external_ip") or None
            self.lan_addr = result.get("lan_addr") or None
            self.state = FOUND
            if self.may_map:
                self._map(self.internal_port)
        elif job[0] == "map":
            if error:
                if PERMANENT_ONLY in error and not self.permanent:
                    self.permanent = True
                    self._map(job[1])
                    return
                if CONFLICT in error and self._conflicts < 2:
                    self._conflicts += 1
                    self._map(self._rng.randrange(1024, 65536))
                    return
                self._fail(now, error)
                return
            self._conflicts = 0
            ip = result.get("external_ip") or self.external_ip
            if job[1] != self.external_port or ip != self.external_ip:
                self.changed = True
            self.external_ip, self.external_port = ip, job[1]
            self.state = MAPPED
            self.error = None
            self._next = None if self.permanent else now + max(job[3], 2) / 2

    def delete(self) -> list[tuple]:
        """The job that removes our mapping (run once, on exit); empty if none is held."""
        if self.mapped is None:
            return []
        return [("delete", self.external_port)]

    def summary(self) -> dict:
        m = self.mapped
        return {"answered": self.answered, "external_ip": self.external_ip,
                "mapped": f"{m[0]}:{m[1]}" if m else None, "error": self.error,
                "lease": (0 if self.permanent else self.lease) if m else None}


class Igd:
    """``UpnpCore``'s jobs run by miniupnpc in a worker process (``upnp_worker``) whose memory is
    capped, each job within ``timeout`` (discovery: plus ``DISCOVER_ROUNDS * discover_ms``); a
    late or dead worker is killed and the job answers an error. Blocking: use from one thread."""

    def __init__(self, discover_ms: int = DISCOVER_MS, timeout: float = JOB_TIMEOUT):
        self.discover_ms = discover_ms
        self.timeout = timeout
        self._proc: subprocess.Popen | None = None

    def run(self, job: tuple) -> dict:
        limit = self.timeout + (DISCOVER_ROUNDS * self.discover_ms / 1000 if job[0] == "discover" else 0)
        try:
            proc = self._worker()
            assert proc.stdin is not None   # a pipe (for mypy)
            os.write(proc.stdin.fileno(), json.dumps(
                {"job": list(job), "discover_ms": self.discover_ms, "timeout": limit}).encode() + b"\n")
            line = self._read_line(proc, time.monotonic() + limit)
        except OSError as e:
            self.close()
            return {"error": f"UPnP worker: {e.strerror or e}"}
        if line is None:
            self.close()
            return {"error": f"UPnP device did not answer within {limit:g} s, or its answer exceeded "
                             f"the worker's limits"}
        try:
            result = json.loads(line)
        except ValueError:
            result = None
        if not isinstance(result, dict):
            self.close()
            return {"error": "UPnP worker: bad answer"}
        return result

    def _worker(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", "overlay.nat.upnp_worker"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, close_fds=True)
            assert self._proc.stdout is not None   # a pipe (for mypy)
            os.set_blocking(self._proc.stdout.fileno(), False)
        return self._proc

    @staticmethod
    def _read_line(proc: subprocess.Popen, deadline: float) -> bytes | None:
        """One answer line, at most ``MAX_ANSWER`` bytes, before ``deadline``; None otherwise."""
        assert proc.stdout is not None   # a pipe (for mypy)
        fd, buf = proc.stdout.fileno(), b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or len(buf) > MAX_ANSWER:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(fd, MAX_ANSWER + 1)
                except BlockingIOError:
                    continue
                if not chunk:           # the worker died (e.g. killed by its memory limit)
                    return None
                buf += chunk
        return buf.split(b"\n", 1)[0]

    def close(self) -> None:
        """Stop the worker (it holds the selected IGD; the next job starts a new one)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (proc.stdin, proc.stdout):
            assert f is not None   # pipes (for mypy)
            try:
                f.close()
            except OSError:
                pass
