"""Where things are, for tests that run a support script as a program or read a repository file
(the test files themselves sit at different depths under tests/)."""

from pathlib import Path

SUPPORT = Path(__file__).resolve().parent   # tests/support: the helper modules and scripts
REPO = SUPPORT.parent.parent                # the repository root (overlay/, config.example.toml)
