# make certify: set up .venv and certify every backend usable on this machine.
# make test:    set up .venv and run the whole test suite (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dshal-installed

.PHONY: venv test certify lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -e .
	touch $(STAMP)

lint: venv
	$(PY) -m ruff check .

test: venv lint
	$(PY) -m pytest -q -n 2 --dist loadgroup

certify: venv
	$(VENV)/bin/dshal info
	$(VENV)/bin/dshal certify

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache certificates
