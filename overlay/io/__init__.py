"""Socket glue for the sans-I/O cores: batched, non-blocking UDP (udp.py)."""
