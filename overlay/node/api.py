"""The local API between the CLI and the running daemon: JSON lines over a 0600 Unix socket.

Request: one line ``{"cmd": NAME, ...args}``. Reply: one line ``{"ok": true, ...}`` or
``{"ok": false, "code": ..., "error": "one-line message"}``. Streaming commands (``follow``)
send one line per event until the client hangs up.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Iterator

MAX_LINE = 256 * 1024


class DaemonNotRunning(Exception):
    pass


class ApiError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


SUN_PATH_MAX = 107   # bytes of a Unix socket's path on Linux (sun_path holds 108 with the NUL)


def socket_path_problem(sock_path: Path) -> str | None:
    """Why the API socket cannot live at ``sock_path`` (its path is too long), or None."""
    n = len(os.fsencode(sock_path))
    if n <= SUN_PATH_MAX:
        return None
    return (f"the node's home {sock_path.parent} is too deep for its API socket ({n} bytes in "
            f"{sock_path.name}'s path; Linux allows {SUN_PATH_MAX}): use a shorter --home")


def _connect(sock_path: Path, timeout: float | None) -> socket.socket:
    if (problem := socket_path_problem(sock_path)) is not None:
        raise ApiError("home", problem)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock_path))
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        raise DaemonNotRunning(str(sock_path)) from None
    except PermissionError:
        s.close()
        raise ApiError("permission", f"no permission to use {sock_path} (it belongs to another user)") from None
    return s


def _lines(s: socket.socket) -> Iterator[dict]:
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            if buf.strip():
                yield json.loads(buf)
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
        if len(buf) > MAX_LINE:
            raise ApiError("protocol", "daemon sent an oversized reply")


def call(sock_path: Path, cmd: str, timeout: float = 30.0, **args) -> dict:
    s = _connect(sock_path, timeout)
    with s:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        try:
            for reply in _lines(s):
                if not reply.get("ok"):
                    raise ApiError(reply.get("code", "error"), reply.get("error", "request failed"))
                return reply
        except socket.timeout:
            raise ApiError("timeout", f"the daemon did not answer within {timeout:.0f} s") from None
    raise ApiError("protocol", "the daemon closed the connection without answering")


def stream(sock_path: Path, cmd: str, **args) -> Iterator[dict]:
    s = _connect(sock_path, None)
    with s:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        for reply in _lines(s):
            if reply.get("ok") is False:
                raise ApiError(reply.get("code", "error"), reply.get("error", "request failed"))
            yield reply
