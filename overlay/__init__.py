"""overlay: a zero-configuration peer-to-peer VPN."""

__version__ = "0.1.0"

# a compiled hot path (`make compiled`) when one is built and current; pure Python otherwise
from overlay import compiled_hotpath as _compiled_hotpath  # noqa: E402

_compiled_hotpath.install()
