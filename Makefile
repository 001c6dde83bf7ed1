# pibake: `make build` bakes the cluster (IMAGE=bookworm, a date, URL or file to pin), `make test` runs every test.
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

# Prints a table and writes output/bench/*.json; curl is the floor's downloader.
bench: venv
	command -v curl >/dev/null || $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq curl
	$(VENV)/bin/python tests/bench.py

test-fast: venv
	$(PYTEST) -ra -m 'not image'

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
