# The README's two commands live here: `make run` and `make test`.
# Both set up everything from a fresh machine (virtualenv, Python packages,
# the Debian packages the tests need) and are safe to run again.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
MLAAS  := $(VENV)/bin/mlaas
RUNDIR ?= build/run

.PHONY: setup system-deps run test bench clean

$(VENV)/.installed: pyproject.toml
	# a fresh Debian has python3 without venv/ensurepip: install it, then retry
	$(PYTHON) -m venv $(VENV) || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  rm -rf $(VENV); $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-venv >/dev/null && \
	  $(PYTHON) -m venv $(VENV); }
	# torch first and pinned: its CPU wheel is on this machine's disk; a later
	# unpinned requirement (torch>=2.2) is then already satisfied.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# XRootD server for the remote-read tests (runs as `nobody`), gcc for its
# loopback-only bind shim. apt only when something is missing.
system-deps:
	@if ! command -v xrootd >/dev/null || ! command -v gcc >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq xrootd-server xrootd-client gcc >/dev/null; \
	fi

run: setup
	$(MLAAS) demo --workdir $(RUNDIR)

test: setup system-deps
	$(PY) -m pytest

bench: setup
	$(PY) bench/loader.py
	$(PY) bench/train.py
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) build .pytest_cache
