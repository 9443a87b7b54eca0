# The two commands the README opens with: `make demo` and `make test`.
# They install the project into a virtual environment of its own (.venv, made here with
# `$(PYTHON) -m venv`), never into whatever `python3` is. `make PY=python3 test` uses that
# interpreter instead (installing into it, as before); PYTEST_ARGS picks tests:
# `make test PYTEST_ARGS='tests/unit/cli/test_cli_literal.py -x'`.
# `make test` runs every test once (tests/unit, tests/process, tests/lab); `make test-fast` the
# unit tests not marked slow (under a minute); `make lint` ruff and mypy (set up in pyproject.toml).
# `make compiled` builds the optional compiled hot path (mypyc; needs gcc and the Python headers) into
# overlay/_compiled/, which nodes then load (OVERLAY_PURE=1: pure Python; rm -r overlay/_compiled undoes it).
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
PYTEST_ARGS ?=
STAMP := $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.stamp-install,.stamp-install)

.PHONY: demo test test-fast lint install bench compiled

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "make: '$(PYTHON) -m venv' failed: install the venv module" \
	    "(Debian/Ubuntu: apt-get install python3-venv), or use another interpreter: make PY=python3 ..." >&2; exit 1; }

$(STAMP): pyproject.toml $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/bin/python)
	$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m overlay demo

test: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m 'not slow' tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

compiled: $(STAMP)
	$(PY) benchmarks/build_compiled.py
