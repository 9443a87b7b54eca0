"""Local SOCKS5 / HTTP proxy and port forwards that reach overlay peers through a Dialer.

- ``dialer``: the Dialer protocol the node implements, its errors, and OsDialer (real sockets).
- ``socks5`` / ``http``: sans-I/O protocol cores (parsers and builders, no sockets).
- ``server``: asyncio SocksServer and HttpProxyServer; ``forward``: TCP/UDP port forwards.
- ``relay``, ``udpflows``, ``listen``: stream relay, UDP flow table, listening sockets.
"""
