"""The one ``HOST:PORT`` parser (``[v6addr]:port`` too), for flags, config, forwards and peers' text."""

from __future__ import annotations


def parse_hostport(text: str, default_port: int | None = None, allow_zero: bool = False) -> tuple[str, int]:
    """(host, port) from ``HOST:PORT`` / ``[V6]:PORT``; ``default_port`` when the port is left out
    (else that is an error); port 0 only with ``allow_zero``. Raises ValueError with the reason."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r}: expected HOST:PORT")
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"{text!r}: expected HOST:PORT")
        return text, default_port
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "[" in host or "]" in host:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"{text!r}: port must be a number") from None
    if not host or not (0 if allow_zero else 1) <= p < 65536:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    return host, p
