# The two commands of the README. Each installs what it needs into ./.venv first.
PY := .venv/bin/python

.PHONY: install demo test test-fast test-lower-bounds bench clean

install:
	@bash scripts/install.sh

demo: install
	$(PY) -m flowrl.cli quickstart

test: install
	bash scripts/test_all.sh

test-lower-bounds:
	bash scripts/test_lower_bounds.sh

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf .venv .venv-lower-bounds
