"""Port mapping coordinator (sans-I/O): asks the router for a mapping of the node's UDP port with
PCP, NAT-PMP and UPnP IGD, keeps one, and tells the data plane which one it has.

All three are asked at once, but only one maps: PCP's MAP request goes out at once (it is its own
probe); NAT-PMP asks only for the external address (``may_map`` False) and UPnP only discovers
the IGD, each held back until every protocol it ranks below has failed. Preference: PCP (a
nonce binds the answer to the request; the IETF successor of NAT-PMP), then NAT-PMP, then UPnP
IGD (discovery by multicast, SOAP over HTTP, on a worker thread). A router that speaks all three
(miniupnpd) thus holds one mapping for the node, not three; if the one in use fails later (a
renewal refused), the next protocol that answered takes over.

``mapping`` is the first mapped protocol's external address; the caller advertises it only when
it equals the address the server's STUN sees (``usable``): a router behind another NAT maps an
address nobody can reach. ``summary`` says what each protocol answered, for ``netcheck``.

Datagrams (PCP, NAT-PMP: from the node's socket to gateway:5351) come from
``datagrams_to_send``; UPnP's blocking jobs from ``jobs_to_run``, their results go back through
``job_done``; ``receive`` takes datagrams from the gateway's port 5351 only.
"""

from __future__ import annotations

from typing import Any

from . import mapclient, natpmp, pcp, upnp

PCP, NAT_PMP, UPNP = "pcp", "nat-pmp", "upnp"
PROTOCOLS = (PCP, NAT_PMP, UPNP)        # in order of preference
LABEL = {PCP: "PCP", NAT_PMP: "NAT-PMP", UPNP: "UPnP IGD"}
KEY = {PCP: "pcp", NAT_PMP: "nat_pmp", UPNP: "upnp"}


def parse_protocols(value) -> tuple[str, ...]:
    """``"off"``/False -> (); ``"all"``/True/None -> every protocol; else a comma-separated string
    or a list of protocol names. ValueError on an unknown name."""
    if value is None or value is True or value == "all":
        return PROTOCOLS
    if value is False or value == "off":
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError("expected true, false, \"off\" or a list of pcp, nat-pmp, upnp")
    names = {str(x).strip().lower().replace("_", "-") for x in items} - {""}
    unknown = names - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown port mapping protocol {sorted(unknown)[0]!r} (known: {', '.join(PROTOCOLS)})")
    return tuple(p for p in PROTOCOLS if p in names)


class PortMapper:
    def __init__(self, gateway: str, client_ip: str, internal_port: int, now: float, *,
                 protocols: tuple[str, ...] = PROTOCOLS, lifetime: int = 7200, lease: int = upnp.LEASE,
                 retry_after: float = 300.0):
        self.gateway = (gateway, mapclient.PORT)
        self.internal_port = internal_port
        self.protocols = tuple(p for p in PROTOCOLS if p in protocols)
        self.clients: dict[str, Any] = {}   # PCP: pcp.Pcp, NAT_PMP: natpmp.NatPmp, UPNP: upnp.UpnpCore
        first = True
        for p in self.protocols:
            if p == PCP:
                self.clients[p] = pcp.Pcp(gateway, client_ip, internal_port, now, lifetime=lifetime,
                                          retry_after=retry_after)
            elif p == NAT_PMP:
                self.clients[p] = natpmp.NatPmp(gateway, internal_port, now, lifetime=lifetime,
                                                retry_after=retry_after, may_map=first)
            else:
                self.clients[p] = upnp.UpnpCore(internal_port, now, lease=lease, retry_after=retry_after,
                                                may_map=first)
            first = False
        self._reported: tuple[str, tuple[str, int]] | None = None
        self.changed = False

    # ------------------------------------------------------------------ which mapping we hold
    @property
    def mapping(self) -> tuple[str, tuple[str, int]] | None:
        """(protocol, external address) of the preferred protocol holding a mapping."""
        for p, c in self.clients.items():
            if (m := c.mapped) is not None:
                return p, m
        return None

    def _status(self, p: str) -> str:
        """"failed", "pending" (not answered yet), "ready" (answered, held back) or "active"."""
        c = self.clients[p]
        if c.mapped is not None or c.state in (mapclient.MAPPING, upnp.MAPPING):
            return "active"
        if c.state in (mapclient.FAILED, upnp.FAILED):
            return "failed"
        if c.state in (mapclient.HELD, upnp.FOUND):
            return "ready"
        return "pending"

    def _decide(self, now: float) -> None:
        failed = []
        for p, c in self.clients.items():
            s = self._status(p)
            if s == "failed":
                failed.append(c)
                continue
            if s == "ready":
                c.allow_mapping(now)
            if s == "active":
                # a preferred protocol that failed stays quiet while this one holds the mapping
                # (two protocols must not map the same port); it is asked again if this one fails
                for f in failed:
                    f.hold_off(None)
            break
        else:
            for f in failed:
                f.hold_off(now)
        m = self.mapping
        if m != self._reported:
            self._reported = m
            self.changed = True

    # ------------------------------------------------------------------ sans-I/O surface
    def get_timer(self) -> float | None:
        times = [t for c in self.clients.values() if (t := c.get_timer()) is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for c in self.clients.values():
            t = c.get_timer()
            if t is not None and t <= now:
                c.handle_timer(now)
        self._decide(now)

    def receive(self, data: bytes, src: tuple, now: float) -> bool:
        """A datagram that came from ``src``; True if it was an answer for us (from gateway:5351)."""
        if (src[0], src[1]) != self.gateway or not data:
            return False
        used = False
        if data[0] == pcp.VERSION or (data[0] == 0 and PCP in self.clients):
            c = self.clients.get(PCP)
            used = c is not None and c.receive(data, now)
        if not used and data[0] == 0 and NAT_PMP in self.clients:
            used = self.clients[NAT_PMP].receive(data, now)
        if used:
            self._decide(now)
        return used

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, tuple[str, int]]]:
        out = []
        for p in (PCP, NAT_PMP):
            if p in self.clients:
                out.extend(self.clients[p].datagrams_to_send(now))
        return out

    def jobs_to_run(self) -> list[tuple]:
        c = self.clients.get(UPNP)
        return c.jobs_to_run() if c is not None else []

    def job_done(self, job: tuple, result: dict, now: float) -> None:
        c = self.clients.get(UPNP)
        if c is not None:
            c.job_done(job, result, now)
            self._decide(now)

    def delete(self) -> tuple[list[tuple[bytes, tuple[str, int]]], list[tuple]]:
        """What removes every mapping held: (datagrams, UPnP jobs); send / run them once on exit."""
        dgrams = [d for p in (PCP, NAT_PMP) if p in self.clients for d in self.clients[p].delete()]
        jobs = self.clients[UPNP].delete() if UPNP in self.clients else []
        return dgrams, jobs

    # ------------------------------------------------------------------ reporting
    def usable(self, public_ip: str | None) -> tuple[str, int] | None:
        """The mapping worth advertising: its external address is the one the server sees."""
        m = self.mapping
        if m is None or public_ip is None or m[1][0] != public_ip:
            return None
        return m[1]

    def note(self, public_ip: str | None) -> str | None:
        m = self.mapping
        if m is None or self.usable(public_ip) is not None:
            return None
        if public_ip is None:
            return f"mapping {m[1][0]}:{m[1][1]} via {LABEL[m[0]]}: not advertised until the server confirms the public address"
        return (f"mapping {m[1][0]}:{m[1][1]} via {LABEL[m[0]]} differs from the address the server sees "
                f"({public_ip}): router behind another NAT, not advertised")

    def summary(self, public_ip: str | None) -> dict:
        """{"pcp": {...} | None, "nat_pmp": ..., "upnp": ..., "protocol", "mapped", "usable", "note"}."""
        out: dict = {KEY[p]: (self.clients[p].summary() if p in self.clients else None) for p in PROTOCOLS}
        m = self.mapping
        out["protocol"] = m[0] if m else None
        out["mapped"] = f"{m[1][0]}:{m[1][1]}" if m else None
        out["usable"] = None if m is None else self.usable(public_ip) is not None
        out["note"] = self.note(public_ip)
        return out
