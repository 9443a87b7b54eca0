"""The encrypted relay: opaque WireGuard packets forwarded by the mediation server, addressed by
node key. The server never holds session keys; it only sees ciphertext and the two node keys."""
