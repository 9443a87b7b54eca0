"""Short TCP connections, as a browser through a proxy makes them: a server that reads 1 byte,
answers 100 bytes and closes, and a client that runs rounds of such connections from several
threads. Shared by tests/process/test_forward_short_connections.py and benchmarks/bench_shortconn.py.

    python tests/support/shortconn_tools.py server HOST PORT            # prints "ready" once listening
    python tests/support/shortconn_tools.py client HOST PORT ROUNDS ROUND_SIZE CLIENTS

The client prints one JSON line per round of ROUND_SIZE connections: ``n``, ``rate``
(connections/s over the round's wall time), ``p50_ms`` / ``p99_ms`` of the whole connection time,
``max_connect_ms`` (connect() returning), ``slow`` (connections that took 1 s or more: a SYN
waiting out a retransmission timeout somewhere) and ``failed`` (refused, reset, timed out after
30 s, or not exactly 100 bytes back).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

ANSWER = b"x" * 100
SLOW = 1.0  # seconds: the initial RTO, what a lost or unanswered SYN costs


def serve(host: str, port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(512)
    print("ready", flush=True)

    def one(c: socket.socket) -> None:
        with c:
            try:
                if c.recv(1):
                    c.sendall(ANSWER)
            except OSError:
                pass

    while True:
        c, _ = srv.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()


def connect_once(host: str, port: int) -> tuple[float, float, bool]:
    """(seconds in all, seconds to connect, answered correctly)."""
    clock = time.perf_counter
    t0 = clock()
    try:
        s = socket.create_connection((host, port), timeout=30)
    except OSError:
        return clock() - t0, clock() - t0, False
    t1 = clock()
    try:
        with s:
            s.sendall(b"q")
            got = b""
            while d := s.recv(4096):
                got += d
        return clock() - t0, t1 - t0, got == ANSWER
    except OSError:
        return clock() - t0, t1 - t0, False


def run_client(host: str, port: int, rounds: int, size: int, clients: int, out=sys.stdout) -> None:
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "start": time.perf_counter()}
    results: list[tuple[float, float, bool]] = []

    def report() -> None:
        total = sorted(r[0] for r in results)
        dt = time.perf_counter() - state["start"]
        print(json.dumps({
            "n": len(results), "rate": len(results) / dt, "p50_ms": 1e3 * total[len(total) // 2],
            "p99_ms": 1e3 * total[min(len(total) - 1, len(total) * 99 // 100)],
            "max_connect_ms": 1e3 * max(r[1] for r in results),
            "slow": sum(1 for t in total if t >= SLOW), "failed": sum(1 for r in results if not r[2]),
        }), file=out, flush=True)
        results.clear()
        state["start"] = time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                if state["next"] >= rounds * size:
                    return
                state["next"] += 1
            res = connect_once(host, port)
            with lock:
                results.append(res)
                state["done"] += 1
                if state["done"] % size == 0:
                    report()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    if sys.argv[1:2] == ["server"]:
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["client"] and len(sys.argv) == 7:
        run_client(sys.argv[2], int(sys.argv[3]), *map(int, sys.argv[4:7]))
    else:
        sys.exit(__doc__)
