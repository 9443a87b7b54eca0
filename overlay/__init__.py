"""overlay: a zero-configuration peer-to-peer VPN."""

__version__ = "0.1.0"
