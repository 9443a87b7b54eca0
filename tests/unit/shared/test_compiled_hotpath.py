"""The optional compiled hot path: the loader's choices, and the stack and WireGuard unit tests
passing with the mypyc-compiled modules (built here; skipped with the reason without mypyc, a C
compiler or the Python headers)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from overlay import compiled_hotpath

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "benchmarks"))

import build_compiled  # noqa: E402

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]

# Tests that replace a method on an instance: the compiled classes are native (C structs, methods
# read-only), so these cannot run against them; what they test is unchanged by compiling.
NEEDS_PATCHABLE_METHODS = [
    "tests/unit/netstack/test_netstack_tcp.py::test_sequence_numbers_wrap",  # stack._isn = lambda...
]


def fake_build(base: Path, **changes) -> dict:
    """A manifest in ``base`` naming placeholder files (never imported by these tests)."""
    modules = {}
    for m in build_compiled.MODULES:
        rel = Path(*m.split(".")).with_name(m.rsplit(".", 1)[1] + SUFFIX)
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(b"not an extension")
        modules[m] = rel.as_posix()
    manifest = {"ext_suffix": SUFFIX, "modules": modules, "sources": build_compiled.sources(), **changes}
    (base / compiled_hotpath.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def run_python(code: str, **env: str) -> str:
    full = dict(os.environ, PYTHONPATH=str(REPO), **env)
    full.pop(compiled_hotpath.PURE_ENV, None)
    full.update(env)
    r = subprocess.run([sys.executable, "-c", code], env=full, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


PROBE = "import overlay.netstack.tcp as t, overlay.compiled_hotpath as c; print(t.__file__); print(c.describe())"


def test_no_build_is_pure_python(tmp_path):
    out = run_python(PROBE, OVERLAY_COMPILED=str(tmp_path / "absent"))
    path, status = out.splitlines()
    assert path.endswith("tcp.py")
    assert status.startswith("pure Python: not built")


def test_a_current_build_is_accepted(tmp_path):
    fake_build(tmp_path)
    files, why = compiled_hotpath.check(tmp_path)
    assert why == ""
    assert set(build_compiled.MODULES) <= set(files)


def test_a_changed_source_makes_the_build_stale(tmp_path):
    manifest = fake_build(tmp_path)
    manifest["sources"]["netstack/tcp.py"] = "0" * 64
    (tmp_path / compiled_hotpath.MANIFEST).write_text(json.dumps(manifest))
    files, why = compiled_hotpath.check(tmp_path)
    assert files == {}
    assert why == "stale: overlay/netstack/tcp.py changed since the build"


def test_a_build_for_another_interpreter_is_ignored(tmp_path):
    fake_build(tmp_path, ext_suffix=".cpython-39-x86_64-linux-gnu.so")
    files, why = compiled_hotpath.check(tmp_path)
    assert files == {}
    assert "this interpreter loads" in why


@pytest.mark.parametrize("text", ["{", "[]", '{"ext_suffix": "%s"}' % SUFFIX])
def test_a_damaged_manifest_is_ignored(tmp_path, text):
    (tmp_path / compiled_hotpath.MANIFEST).write_text(text)
    files, why = compiled_hotpath.check(tmp_path)
    assert files == {}
    assert why.startswith("unreadable manifest")


def test_a_missing_extension_file_is_ignored(tmp_path):
    manifest = fake_build(tmp_path)
    (tmp_path / manifest["modules"]["overlay.wire.device"]).unlink()
    files, why = compiled_hotpath.check(tmp_path)
    assert files == {}
    assert why.startswith("missing: ")


def test_overlay_pure_wins_over_a_build(tmp_path):
    # the placeholder files would fail to import: the probe passing shows they were never tried
    fake_build(tmp_path)
    out = run_python(PROBE, OVERLAY_COMPILED=str(tmp_path), OVERLAY_PURE="1")
    path, status = out.splitlines()
    assert path.endswith("tcp.py")
    assert status == "pure Python: OVERLAY_PURE is set"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_stack_and_wireguard_unit_tests_pass_compiled(tmp_path):
    why = build_compiled.missing_tools()
    if why:
        pytest.skip(f"cannot build the compiled hot path here: {why}")
    out = tmp_path / "compiled"
    build_compiled.build(out, quiet=True)
    status = run_python(PROBE, OVERLAY_COMPILED=str(out))
    path, described = status.splitlines()
    assert path.endswith("tcp" + SUFFIX), status
    assert described.startswith("compiled: "), status
    # one process: the hook is asserted active, then the existing tests run against the compiled modules
    args = ["-q", "-p", "no:cacheprovider", "-m", "not slow", "tests/unit/netstack", "tests/unit/wire",
            *(f"--deselect={t}" for t in NEEDS_PATCHABLE_METHODS)]
    code = ("import sys, pytest, overlay.compiled_hotpath as c\n"
            f"assert set(c.active) == set({build_compiled.MODULES!r}), c.describe()\n"
            f"sys.exit(pytest.main({args!r}))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OVERLAY_COMPILED=str(out))
    env.pop(compiled_hotpath.PURE_ENV, None)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout
