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
# On a new machine the fixtures take about a quarter of an hour, most of it one core's work
# once Bookworm's is done, so the tiers that boot nothing run meanwhile; the boot tier
# waits for them. Every tier runs whatever another's result, and any failure fails make test.
TIERS := tests/unit tests/system tests/image tests/boot
FIXTURES_LOG := output/fixtures.log

test: venv lint
	@$(VENV)/bin/python tests/boot_fixture.py bookworm trixie >$(FIXTURES_LOG) 2>&1 & fixtures=$$!; \
	$(PYTEST) -ra --durations=20 tests/unit tests/system tests/image; tiers=$$?; \
	wait $$fixtures; built=$$?; \
	if [ $$built -ne 0 ]; then tail -n 60 $(FIXTURES_LOG); echo "make test: the boot fixtures failed ($(FIXTURES_LOG))"; \
	else echo "make test: boot fixtures ready ($(FIXTURES_LOG))"; fi; \
	booted=1; [ $$built -ne 0 ] || { $(PYTEST) -ra --durations=20 tests/boot; booted=$$?; }; \
	[ $$tiers -eq 0 ] && [ $$built -eq 0 ] && [ $$booted -eq 0 ]

# Prints a table and writes output/bench/*.json; curl is the floor's downloader.
bench: venv
	$(VENV)/bin/python tests/bench.py

# The unit and system tiers: no appliance, no guest.
test-fast: venv lint
	$(PYTEST) -ra -m 'not image and not boot' tests/unit tests/system

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
