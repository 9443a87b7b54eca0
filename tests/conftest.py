import sys
from pathlib import Path

# the helper modules in tests/support are imported as top-level modules (`import natlab`)
sys.path.insert(0, str(Path(__file__).parent / "support"))


# ---------------------------------------------------------------------------- PostgreSQL
# One throw-away cluster per session (tests/support/postgres.py), a fresh database per test.
import os  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pg_cluster():
    import postgres
    bindir = postgres.find_bin()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL's server binaries are missing (.ci/run installs postgresql)")
        pytest.skip("PostgreSQL's server binaries are not installed (apt-get install postgresql)")
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        pytest.skip("asyncpg is not installed (pip install overlay[postgres])")
    cluster = postgres.Cluster(bindir).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """The URL of a fresh PostgreSQL database."""
    return pg_cluster.create_database()
