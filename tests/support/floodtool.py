"""A connection flood against a mediation server, as the adversarial test of issue 9.1 ran it.

    python tests/support/floodtool.py HOST PORT --slots 1000 --sources 40 [--silent 0.2] [--heavy 200]

Each slot keeps one connection open from one of ``--sources`` loopback addresses (127.0.1.x):
most do the Noise handshake and a hello with a fresh key and then ping every 20 s, like cheap
nodes; a ``--silent`` share connects and sends nothing. A closed connection is reopened 0.2 s
later with a new key. ``--heavy N`` adds N slots from the single address 127.0.2.1. Prints one
JSON line per second: connections with an answered hello now, overall and from the heavy address
(and the most seen at once from it), and how many were closed by the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from overlay import crypto  # noqa: E402
from overlay.control.channel import Channel, Message  # noqa: E402


class Stats:
    def __init__(self):
        self.up = 0
        self.heavy_up = 0
        self.heavy_max = 0
        self.closed = 0


async def slot(host: str, port: int, src: str, silent: bool, heavy: bool, st: Stats, n: int) -> None:
    while True:
        up = False
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=(src, 0)), 10)
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.5)
            continue
        try:
            if silent:
                await reader.read(1)
                continue
            ch = Channel(initiator=True, static_private=crypto.generate_private_key())
            writer.write(ch.data_to_send())
            rid = 1
            sent_hello = False
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536), 20)
                except asyncio.TimeoutError:
                    data = None
                if data == b"":
                    break
                if data:
                    ch.receive_data(data)
                    while (ev := ch.next_event()) is not None:
                        if isinstance(ev, Message) and ev.body.get("t") == "ok" and ev.body.get("id") == 1:
                            up = True
                            st.up += 1
                            if heavy:
                                st.heavy_up += 1
                                st.heavy_max = max(st.heavy_max, st.heavy_up)
                if ch.established and not sent_hello:
                    ch.send({"t": "hello", "id": rid, "name": f"f{n}", "version": 1})
                    sent_hello = True
                elif up and data is None:
                    rid += 1
                    ch.send({"t": "ping", "id": rid})
                writer.write(ch.data_to_send())
        except Exception:
            pass
        finally:
            st.closed += 1
            if up:
                st.up -= 1
                if heavy:
                    st.heavy_up -= 1
            writer.close()
        await asyncio.sleep(0.2)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--slots", type=int, default=1000)
    ap.add_argument("--sources", type=int, default=40)
    ap.add_argument("--silent", type=float, default=0.2)
    ap.add_argument("--heavy", type=int, default=0)
    a = ap.parse_args()
    st = Stats()
    tasks = []
    for i in range(a.slots):
        src = f"127.0.1.{1 + i % a.sources}"
        tasks.append(asyncio.ensure_future(slot(a.host, a.port, src, (i % 100) < a.silent * 100, False, st, i)))
        if i % 50 == 0:
            await asyncio.sleep(0.01)
    for i in range(a.heavy):
        tasks.append(asyncio.ensure_future(slot(a.host, a.port, "127.0.2.1", False, True, st, a.slots + i)))
    while True:
        print(json.dumps({"up": st.up, "heavy_up": st.heavy_up, "heavy_max": st.heavy_max, "closed": st.closed}),
              flush=True)
        await asyncio.sleep(1)


if __name__ == "__main__":
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main())
