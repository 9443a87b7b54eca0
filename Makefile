# The two commands the README opens with: `make demo` and `make test`.
PY ?= python3

.PHONY: demo test install bench

.stamp-install: pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: .stamp-install

demo: .stamp-install
	$(PY) -m overlay demo

test: .stamp-install
	$(PY) -m pytest -q -ra

bench: .stamp-install
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done
