"""The optional compiled hot path: mypyc builds of the per-packet modules, used when present and current.

``make compiled`` (``benchmarks/build_compiled.py``) compiles the per-packet modules (the
userspace stack's ``wire``/``tcp``/``stack``..., WireGuard's ``device``/``replay``/``keypair``...)
unchanged with mypyc into ``overlay/_compiled/`` (or the directory ``OVERLAY_COMPILED`` names),
with a manifest of the sources' SHA-256. ``overlay/__init__.py`` calls :func:`install` first
thing: if the manifest is there, was built for this interpreter and every source still hashes
the same, an import hook loads those modules from the extension files; otherwise nothing changes
and the pure-Python modules load as always. It is all or nothing: mypyc's modules call each other
natively, so one changed source (a stale build) means pure Python for all of them.

``OVERLAY_PURE=1`` forces pure Python. :data:`active` names the modules loaded compiled and
:data:`reason` says why none are (``python benchmarks/build_compiled.py --status`` prints which).
Nothing here needs a compiler: the default install is pure Python.
"""

from __future__ import annotations

# only os and sys here: every `overlay` command imports this first, and without a build the whole
# cost is one stat (importlib.abc alone would add tens of milliseconds to start-up)
import os
import sys

PURE_ENV = "OVERLAY_PURE"
DIR_ENV = "OVERLAY_COMPILED"
MANIFEST = "manifest.json"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.join(PACKAGE_DIR, "_compiled")

active: tuple[str, ...] = ()
reason = "not installed"


def build_dir() -> str:
    return os.environ.get(DIR_ENV) or DEFAULT_DIR


def sha256_file(path: str | os.PathLike[str]) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class _Finder:
    """A ``sys.meta_path`` finder: loads exactly the modules of one build (and mypyc's shared
    runtime) from their extension files."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def find_spec(self, name, path=None, target=None):
        f = self.files.get(name)
        if f is None:
            return None
        import importlib.machinery
        import importlib.util

        return importlib.util.spec_from_file_location(
            name, f, loader=importlib.machinery.ExtensionFileLoader(name, f))


def check(base: str | os.PathLike[str]) -> tuple[dict[str, str], str]:
    """The files to load from the build in ``base`` and "", or {} and why not."""
    import importlib.machinery
    import json

    base = os.fspath(base)
    try:
        with open(os.path.join(base, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return {}, f"not built ({os.path.join(base, MANIFEST)} absent)"
    except (OSError, ValueError) as e:
        return {}, f"unreadable manifest: {e}"
    if not isinstance(manifest, dict):
        return {}, "unreadable manifest: not an object"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    if manifest.get("ext_suffix") != suffix:
        return {}, f"built for {manifest.get('ext_suffix')!r}, this interpreter loads {suffix!r}"
    files: dict[str, str] = {}
    try:
        # every source of the compiled packages, compiled or not (mypyc may have relied on them)
        for rel, digest in manifest["sources"].items():
            src = os.path.join(PACKAGE_DIR, *rel.split("/"))
            if not os.path.isfile(src) or sha256_file(src) != digest:
                return {}, f"stale: overlay/{rel} changed since the build"
        for name, rel in manifest["modules"].items():
            files[name] = os.path.join(base, *rel.split("/"))
    except (KeyError, TypeError, AttributeError) as e:
        return {}, f"unreadable manifest: {e!r}"
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        return {}, f"missing: {', '.join(missing)}"
    if not files:
        return {}, "the build lists no modules"
    return files, ""


def install() -> None:
    """Put the compiled modules in front of the pure ones if a current build is there (once)."""
    global active, reason
    if active or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        reason = f"{PURE_ENV} is set"
        return
    base = build_dir()
    if not os.path.exists(os.path.join(base, MANIFEST)):
        reason = f"not built ({os.path.join(base, MANIFEST)} absent)"
        return
    files, why = check(base)
    if not files:
        reason = why
        return
    modules = [n for n in files if n.startswith("overlay.")]
    already = [n for n in modules if n in sys.modules]
    if already:
        reason = f"imported before the hook: {', '.join(already)}"
        return
    sys.meta_path.insert(0, _Finder(files))
    active = tuple(sorted(modules))
    reason = ""


def describe() -> str:
    return f"compiled: {', '.join(active)}" if active else f"pure Python: {reason}"
