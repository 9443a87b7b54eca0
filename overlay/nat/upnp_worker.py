"""The UPnP worker process: runs miniupnpc's calls for ``upnp.Igd`` inside hard limits.

miniupnpc fetches the device description and the SOAP answers itself, into memory, without a size
cap, and its per-read timeouts let a device that drips one byte every few seconds hold a call
forever. Everything it fetches comes from the LAN, so it runs here, in a child process started by
``Igd`` (``python -m overlay.nat.upnp_worker``): its address space is capped (``RLIMIT_AS``,
``RLIMIT_DATA``: ``MEMORY_LIMIT``), each job arms ``alarm`` (the kernel ends a job that outlives its
time even if the parent is gone), and the parent kills it when a job's answer is late. A device
that streams an endless description thus costs the node nothing but a dead child and an error.

Protocol: one JSON line per job on stdin, ``{"job": [...], "discover_ms": n, "timeout": s}``; one
JSON line per answer on stdout (the result dict ``UpnpCore.job_done`` takes). The selected IGD
(miniupnpc's ``UPnP`` object) lives here between jobs; a killed worker loses it, and the next
job answers "no UPnP IGD selected" until the core discovers again. EOF on stdin ends the worker.
"""

from __future__ import annotations

import json
import resource
import signal
import sys

MEMORY_LIMIT = 64 << 20     # the interpreter with miniupnpc needs ~17 MB of address space
DESCRIPTION = "overlay"


def limit_memory(limit: int = MEMORY_LIMIT) -> None:
    for which in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        resource.setrlimit(which, (limit, limit))


def run_job(state: dict, job: list, discover_ms: int) -> dict:
    kind = job[0]
    if kind == "discover":
        import miniupnpc
        u = miniupnpc.UPnP()
        u.discoverdelay = discover_ms
        state.pop("u", None)
        try:
            found = u.discover()
        except Exception:
            found = 0
        if not found:
            return {"error": "no UPnP IGD answered"}
        u.selectigd()
        state["u"] = u
        return {"external_ip": u.externalipaddress(), "lan_addr": u.lanaddr}
    u = state.get("u")
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


def main() -> int:
    limit_memory()
    # a stop signal for the node's whole process group (Ctrl-C, a service manager, the lab) must
    # leave the worker to delete the mapping on the node's way out; it ends on EOF, its alarm, or
    # the node's kill
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    state: dict = {}
    for line in sys.stdin:
        try:
            req = json.loads(line)
            job, discover_ms, timeout = req["job"], int(req["discover_ms"]), float(req["timeout"])
        except (ValueError, KeyError, TypeError) as e:
            result = {"error": f"bad request: {e}"}
        else:
            signal.alarm(max(1, int(timeout) + 1))
            try:
                result = run_job(state, job, discover_ms)
            except MemoryError:
                state.clear()
                result = {"error": "UPnP device sent more than the worker's memory limit"}
            except ImportError:
                result = {"error": "miniupnpc is not installed (pip install miniupnpc)"}
            except Exception as e:   # miniupnpc raises plain Exception with its error text
                result = {"error": str(e) or type(e).__name__}
            signal.alarm(0)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
