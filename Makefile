# pibake: `make build IMAGE=...` bakes the cluster, `make test` runs every test.
# Both install what they need first (system packages through apt, Python ones in .venv).

PYTHON  ?= /usr/bin/python3
VENV    ?= .venv
PIBAKE  := $(VENV)/bin/pibake
PYTEST  := $(VENV)/bin/python -m pytest
IMAGE   ?=

.PHONY: all deps venv build plan test test-fast bench clean

all: build

deps:
	scripts/install-deps

# The venv sees the system's guestfs bindings, which are not on PyPI.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

build: venv
	$(PIBAKE) build cluster $(if $(IMAGE),--image $(IMAGE))

plan: venv
	$(PIBAKE) plan cluster $(if $(IMAGE),--image $(IMAGE))

test: venv
	$(PYTEST) -ra

test-fast: venv
	$(PYTEST) -ra -m 'not image'

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
