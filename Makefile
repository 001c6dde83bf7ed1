# pibake: `make build` bakes the cluster (IMAGE=bookworm, a date, URL or file to pin), `make test` runs every test
# (`pytest` alone: the unit tier, in seconds).
# Both install what they need first (system packages through apt, Python ones in .venv).

PYTHON  ?= /usr/bin/python3
VENV    ?= .venv
PIBAKE  := $(VENV)/bin/pibake
PYTEST  := $(VENV)/bin/python -m pytest
IMAGE   ?=

.PHONY: all deps venv build plan fixtures lint test test-fast bench clean

all: build

deps:
	scripts/install-deps

# The venv sees the system's guestfs bindings, which are not on PyPI.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# pip byte-compiles what it installs, but not an editable install's own source, and where
# PYTHONDONTWRITEBYTECODE is set Python never caches it: without this, every run of
# pibake compiles the package again first (50 ms).
venv: deps $(VENV)/.installed
	$(VENV)/bin/python -m compileall -q builder

build: venv
	$(PIBAKE) build cluster $(if $(IMAGE),--image $(IMAGE))

plan: venv
	$(PIBAKE) plan cluster $(if $(IMAGE),--image $(IMAGE))

# The boot tests' arm64 images (Bookworm and Trixie), built from Debian's packages once per recipe and
# cached in ~/.cache/pibake-fixtures; the only step of `make test` that goes online.
fixtures: venv
	$(VENV)/bin/python tests/boot_fixture.py bookworm trixie

# ruff (pyflakes, pycodestyle, bugbear) and mypy's type check; any finding fails `make test`.
lint: venv
	$(VENV)/bin/ruff check builder tests
	$(VENV)/bin/mypy

# Every tier, in its folder: unit (in-process, seconds), system (real servers, loop devices,
# network namespaces on this machine), image (libguestfs), boot (QEMU). `pytest` alone is unit.
TIERS := tests/unit tests/system tests/image tests/boot

test: venv lint fixtures
	$(PYTEST) -ra --durations=20 $(TIERS)

# Prints a table and writes output/bench/*.json; curl is the floor's downloader.
bench: venv
	$(VENV)/bin/python tests/bench.py

# The unit and system tiers: no appliance, no guest.
test-fast: venv lint
	$(PYTEST) -ra -m 'not image and not boot' tests/unit tests/system

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
