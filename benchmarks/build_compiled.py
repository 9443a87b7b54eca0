"""Build the optional compiled hot path: the per-packet modules, unchanged, through mypyc.

    python benchmarks/build_compiled.py [--out DIR] [--check | --status]      (or: make compiled)

Compiles the modules in ``MODULES`` with mypyc (``pip install mypy``; needs a C compiler and the
Python headers, e.g. Debian's gcc and python3-dev) in a scratch copy of the package, then puts
the extension files and a manifest (the interpreter's extension suffix, the SHA-256 of every
source in the compiled packages and of ``overlay/crypto.py``, which they import) into
``overlay/_compiled/`` (or ``--out``). A node loads them from there when the manifest matches this
interpreter and these sources (see ``overlay/compiled_hotpath.py``); ``OVERLAY_PURE=1`` forces
pure Python; deleting the directory undoes the build. ``--check`` only says whether a compiler is there (exit 0) or why not (exit 1);
``--status`` whether this interpreter loads the compiled modules, or why not.

What is left out, and why (mypy/mypyc 2.4, CPython 3.11):

- ``netstack/events.py``: its dataclasses name ``TcpConnection`` only under ``TYPE_CHECKING``;
  compiled, the module crashes on import (mypyc issue 1209). Not per-packet anyway.
- ``wire/cookie.py``, ``wire/handshake.py``, ``wire/ratelimit.py``: once per handshake, and
  bound by the X25519/BLAKE2s calls in C; compiling them gains nothing measurable (and tests
  that patch ``CookieChecker`` methods on an instance could no longer do so).
- ``netstack/asyncio_glue.py``, ``io/udp.py``, ``node/dataplane.py``: asyncio glue, see
  docs/performance.md.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "overlay"
sys.path.insert(0, str(REPO))

from overlay import compiled_hotpath  # noqa: E402

MODULES = [
    "overlay.netstack.wire",
    "overlay.netstack.tcp",
    "overlay.netstack.stack",
    "overlay.netstack.congestion",
    "overlay.netstack.sack",
    "overlay.netstack.reassembly",
    "overlay.netstack.fragments",
    "overlay.netstack.udp",
    "overlay.wire.device",
    "overlay.wire.replay",
    "overlay.wire.keypair",
    "overlay.wire.peer",
    "overlay.wire.messages",
    "overlay.wire.events",
    "overlay.wire.constants",
]
# every source in these packages, and the modules they import from outside them, goes into the
# manifest: a change to any of them (compiled or not) makes the build stale
PACKAGES = ["netstack", "wire"]
IMPORTED = ["crypto.py"]


def missing_tools() -> str:
    """Why this machine cannot build (empty: it can)."""
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed (pip install mypy)"
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.is_file():
        return f"the Python headers are missing ({include}; Debian: apt-get install python3-dev)"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}; Debian: apt-get install gcc)"
    return ""


def sources() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((PACKAGE / pkg).glob("*.py")):
            out[f.relative_to(PACKAGE).as_posix()] = compiled_hotpath.sha256_file(f)
    for rel in IMPORTED:
        out[rel] = compiled_hotpath.sha256_file(PACKAGE / rel)
    return out


def build(out: Path, quiet: bool = False) -> dict:
    """Compile ``MODULES`` and write them with their manifest into ``out`` (replaced)."""
    before = sources()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    with tempfile.TemporaryDirectory(prefix="overlay-mypyc-") as tmp:
        stage = Path(tmp)
        # a copy of the whole package (mypy follows its imports); no pyproject.toml beside it, so
        # setuptools sees only the extensions mypyc generates
        shutil.copytree(PACKAGE, stage / "overlay", ignore=shutil.ignore_patterns("__pycache__", "_compiled"))
        files = [str(Path(*m.split(".")).with_suffix(".py")) for m in MODULES]
        env = dict(os.environ, PYTHONPATH=str(stage), MYPYC_OPT_LEVEL=os.environ.get("MYPYC_OPT_LEVEL", "3"))
        r = subprocess.run([sys.executable, "-m", "mypyc", "--ignore-missing-imports", *files], cwd=stage,
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"mypyc failed ({r.returncode}):\n{r.stdout[-4000:]}{r.stderr[-4000:]}")
        modules: dict[str, str] = {}
        for m in MODULES:
            rel = Path(*m.split(".")).with_name(m.rsplit(".", 1)[1] + suffix)
            if not (stage / rel).is_file():
                raise SystemExit(f"mypyc produced no {rel}")
            modules[m] = rel.as_posix()
        for lib in stage.glob(f"*__mypyc{suffix}"):  # the shared library all modules' code lives in
            modules[lib.name[: -len(suffix)]] = lib.name
        if sources() != before:
            raise SystemExit("the sources changed during the build; run it again")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for rel in modules.values():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(stage / rel, out / rel)
    manifest = {
        "ext_suffix": suffix,
        "python": sys.version.split()[0],
        "mypyc": _mypy_version(),
        "modules": modules,
        "sources": before,
    }
    (out / compiled_hotpath.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if not quiet:
        print(f"compiled {len(MODULES)} modules into {out} (mypy {manifest['mypyc']}, Python {manifest['python']}); "
              f"OVERLAY_PURE=1 uses pure Python, deleting {out} undoes it")
    return manifest


def _mypy_version() -> str:
    try:
        from mypy.version import __version__
        return __version__
    except ImportError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(compiled_hotpath.DEFAULT_DIR), help="where the build goes")
    ap.add_argument("--check", action="store_true", help="only say whether this machine can build")
    ap.add_argument("--status", action="store_true", help="only say whether nodes load a compiled build")
    args = ap.parse_args()
    if args.status:
        print(compiled_hotpath.describe())
        return 0
    why = missing_tools()
    if why:
        print(f"cannot build the compiled hot path: {why}", file=sys.stderr)
        return 1
    if args.check:
        print("mypyc, the Python headers and a C compiler are there")
        return 0
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
