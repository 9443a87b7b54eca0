"""Send handshake initiations with a valid mac1 to a node as fast as one process can (issue 9.8).

    python tests/support/floodwg.py HOST PORT NODE_KEY_BASE64 SECONDS [SOURCE_IP]

Prints the number of datagrams sent and the rate.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from overlay.wire.cookie import CookieGenerator  # noqa: E402
from overlay.wire.messages import pack_initiation  # noqa: E402


def main() -> None:
    host, port, key, seconds = sys.argv[1], int(sys.argv[2]), base64.b64decode(sys.argv[3]), float(sys.argv[4])
    gen = CookieGenerator(key)
    msgs = []
    for i in range(512):
        m = pack_initiation(i, os.urandom(32), os.urandom(48), os.urandom(28))
        gen.add_macs(m, 0.0)
        msgs.append(bytes(m))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    if len(sys.argv) > 5:
        s.bind((sys.argv[5], 0))
    s.connect((host, port))
    send = s.send
    sent = 0
    t0 = time.monotonic()
    end = t0 + seconds
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        for m in msgs:
            try:
                send(m)
            except OSError:
                pass
        sent += len(msgs)
        if time.monotonic() >= end:
            break
    print(f"{sent} {sent / (time.monotonic() - t0):.0f}", flush=True)


if __name__ == "__main__":
    main()
