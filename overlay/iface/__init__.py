"""Kernel network interfaces for ``overlay up --tun`` / ``--tap``.

- ``tuntap``: open a Linux TUN or TAP device and move packets (frames) between its file
  descriptor and the data plane in batches, from the loop's reader callback.
- ``netconfig``: the device's address, MTU, state and broadcast route, over netlink (pyroute2);
  remembers what it added so stopping the node removes it.
- ``ethernet``: the TAP edge, sans-I/O: node MACs, ARP answered for peers, IPv4 unwrapped to plain
  IP for the tunnel and wrapped back into frames, non-IP EtherTypes (IPX...) carried as frames.
"""
