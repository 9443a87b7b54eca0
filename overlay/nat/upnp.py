"""UPnP IGD mapping of the node's UDP port: a sans-I/O core (``UpnpCore``) deciding when to
discover, map, renew and delete, and ``Igd``, which performs those steps with miniupnpc.

Why miniupnpc: it is the reference UPnP IGD client, by the author of miniupnpd, maintained, with
wheels on PyPI; it does SSDP discovery, the device description and the SOAP calls. Its calls
block (discovery waits ``DISCOVER_MS`` for answers; SOAP is HTTP), so ``Igd.run`` is meant for a
worker thread; the core hands out jobs and takes their results with ``now``, so that it is
tested with scripted router answers.

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

import random

IDLE, DISCOVERING, FOUND, MAPPING, MAPPED, FAILED = "idle", "discovering", "found", "mapping", "mapped", "failed"
DISCOVER_MS = 2000
LEASE = 3600
DESCRIPTION = "overlay"
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
    """miniupnpc's blocking calls for ``UpnpCore``'s jobs; use from one worker thread only."""

    def __init__(self, discover_ms: int = DISCOVER_MS):
        self.discover_ms = discover_ms
        self._u = None

    def run(self, job: tuple) -> dict:
        try:
            return self._run(job)
        except ImportError:
            return {"error": "miniupnpc is not installed (pip install miniupnpc)"}
        except Exception as e:   # miniupnpc raises plain Exception with its error text
            return {"error": str(e) or type(e).__name__}

    def _run(self, job: tuple) -> dict:
        kind = job[0]
        if kind == "discover":
            import miniupnpc
            u = miniupnpc.UPnP()
            u.discoverdelay = self.discover_ms
            try:
                found = u.discover()
            except Exception:
                found = 0
            if not found:
                return {"error": "no UPnP IGD answered"}
            u.selectigd()
            self._u = u
            return {"external_ip": u.externalipaddress(), "lan_addr": u.lanaddr}
        u = self._u
        if u is None:
            return {"error": "no UPnP IGD selected"}
        if kind == "map":
            _, external, internal, lease = job
            u.addportmapping(external, "UDP", u.lanaddr, internal, DESCRIPTION, "", lease)
            return {"external_ip": u.externalipaddress()}
        if kind == "delete":
            u.deleteportmapping(job[1], "UDP")
            return {}
        return {"error": f"unknown job {kind!r}"}
