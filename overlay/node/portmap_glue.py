"""The data plane's port mapping: ``nat.portmap.PortMapper`` (PCP, NAT-PMP, UPnP IGD) driven from
the loop. PCP and NAT-PMP are datagrams on the node's socket (the router's answers come back there,
sorted out by ``nat.classify_datagram``); UPnP's blocking calls run on one worker thread, miniupnpc
in a capped child process (``nat.upnp.Igd``), their results handed back to the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from overlay.nat import portmap

log = logging.getLogger("overlay.dataplane")


class PortMapGlue:
    """``now``: the loop's clock; ``out``: the data plane's outgoing datagrams; ``on_changed()``:
    the mapping changed (publish it); ``loop()``: the running loop (UPnP results come back there)."""

    def __init__(self, protocols: tuple[str, ...], *, now: Callable[[], float], out: list,
                 schedule_flush: Callable[[], None], on_changed: Callable[[], None],
                 loop: Callable[[], asyncio.AbstractEventLoop | None]):
        self.protocols = protocols
        self.now, self.out, self.schedule_flush, self.on_changed, self.loop = now, out, schedule_flush, on_changed, loop
        self.mapper: portmap.PortMapper | None = None
        self.gateway: str | None = None     # the router asked (its answers are port-mapping datagrams)
        self._igd = None
        self._igd_pool = None

    def start(self, gateway: str, local_ip: str, port: int) -> None:
        """Map our UDP ``port`` on the router ``gateway`` (once)."""
        if self.mapper is None:
            self.set_mapper(portmap.PortMapper(gateway, local_ip, port, self.now(), protocols=self.protocols))

    def set_mapper(self, mapper: portmap.PortMapper | None) -> None:
        self.mapper = mapper
        self.gateway = mapper.gateway[0] if mapper is not None else None

    def receive(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        if self.mapper.receive(data, addr, now):
            self.changed()
        self.schedule_flush()

    def timer(self) -> float | None:
        return self.mapper.get_timer() if self.mapper is not None else None

    def tick(self, now: float) -> None:
        pm = self.mapper
        if pm is not None and (t := pm.get_timer()) is not None and t <= now:
            pm.handle_timer(now)
            self.changed()

    def changed(self) -> None:
        pm = self.mapper
        self.out.extend(pm.datagrams_to_send(self.now()))
        for job in pm.jobs_to_run():
            self._igd_submit(job)
        if pm.changed:
            pm.changed = False
            m = pm.mapping
            log.info("port mapping: %s", f"router maps {m[1][0]}:{m[1][1]} to UDP port {pm.internal_port} "
                     f"({portmap.LABEL[m[0]]})" if m else "none (" + "; ".join(
                         f"{portmap.LABEL[p]}: {c.error or 'no answer'}" for p, c in pm.clients.items()) + ")")
            self.on_changed()

    def _igd_submit(self, job: tuple):
        """Run a UPnP job on the worker thread; its result comes back on the loop."""
        from concurrent.futures import ThreadPoolExecutor
        from overlay.nat.upnp import Igd
        if self._igd_pool is None:
            self._igd, self._igd_pool = Igd(), ThreadPoolExecutor(1, thread_name_prefix="upnp")
        fut = self._igd_pool.submit(self._igd.run, job)
        loop = self.loop()

        def back_on_the_loop(f) -> None:
            try:
                loop.call_soon_threadsafe(self._igd_done, job, f)
            except RuntimeError:     # the loop closed while the job ran (the daemon is gone)
                pass
        fut.add_done_callback(back_on_the_loop)
        return fut

    def _igd_done(self, job: tuple, fut) -> None:
        if self.mapper is None or fut.cancelled():
            return
        self.mapper.job_done(job, fut.result(), self.now())
        self.changed()
        self.schedule_flush()

    def close(self, send_batch: Callable[[list], None] | None) -> None:
        """Remove our mappings from the router: PCP / NAT-PMP datagrams (through ``send_batch``),
        and UPnP's deletion on its thread, waited for at most 3 s (the daemon is exiting)."""
        pm = self.mapper
        self.set_mapper(None)
        if pm is None:
            return
        dgrams, jobs = pm.delete()
        if dgrams and send_batch is not None:
            send_batch(dgrams)
        if self._igd_pool is not None:
            futs = [self._igd_pool.submit(self._igd.run, j) for j in jobs]
            for f in futs:
                try:
                    error = f.result(timeout=3.0).get("error")
                except Exception as e:   # timeout: the router keeps the mapping until its lease ends
                    error = str(e) or type(e).__name__
                if error:
                    log.warning("UPnP: could not remove the mapping: %s", error)
            self._igd_pool.shutdown(wait=False, cancel_futures=True)
            self._igd.close()       # the worker process (a job still running there ends with it)

    def mapped(self, public_ip: str | None) -> tuple[str, int] | None:
        """The router's mapping of our port, if it is usable: its external address must be the one
        the server sees (a router behind another NAT, e.g. carrier-grade, maps uselessly)."""
        pm = self.mapper
        return pm.usable(public_ip) if pm is not None else None

    def summary(self, public_ip: str | None) -> dict | None:
        """What each port-mapping protocol answered and which mapping is used (for ``netcheck``);
        None when none was tried."""
        pm = self.mapper
        return pm.summary(public_ip) if pm is not None else None
