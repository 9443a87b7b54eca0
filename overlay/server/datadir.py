"""The server's data directory holds its private key, Argon2id hashes and chat: owner-only.

The directory is created 0700 and every file in it 0600 whatever the umask; a directory or file
found readable by others (an older server, a copy, a restore) is fixed at start with one warning
each, so the operator learns that it was exposed.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("overlay.server")

DIR_MODE = 0o700
FILE_MODE = 0o600


def secure(data_dir: Path) -> list[str]:
    """Create or tighten ``data_dir`` and the files directly in it; return one line per fix."""
    data_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    fixes = []
    for path, want in [(data_dir, DIR_MODE)] + [(p, FILE_MODE) for p in sorted(data_dir.iterdir())]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or (path != data_dir and not stat.S_ISREG(st.st_mode)):
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            new = (mode & 0o700) or want        # the owner keeps its rights; group and others lose theirs
            os.chmod(path, new)
            fixes.append(f"{path} was open to other users (mode {mode:04o}); now {new:04o}")
    for line in fixes:
        log.warning("%s", line)
    return fixes


def create_private(path: Path) -> None:
    """Create ``path`` empty and 0600 if it does not exist (SQLite would create it 0666 & ~umask,
    and gives its -wal and -shm files the database file's mode)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        pass
