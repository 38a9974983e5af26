# fcgi-finish: `make run` starts the whole stack, `make test` checks it.
# Every target that needs the virtualenv depends on `install`, so both work
# on a fresh clone.

# Debian's python3 by default, even with pyenv's shims first on PATH: it is built with
# PGO and LTO, and a worker spends about a quarter more CPU per request on a default
# pyenv build (see docs/performance.md). PYTHON=python3.13 builds its own virtualenv
# (.venv-python3.13), so switching back and forth reuses both; a pyenv-installed
# version works without `pyenv global`.
PYTHON ?= $(if $(wildcard /usr/bin/python3),/usr/bin/python3,python3)
PYTHON_EXE := $(shell $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null || \
	PYENV_VERSION=$$(pyenv whence $(PYTHON) 2>/dev/null | tail -1) \
	$(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null)
PYTHON_VERSION := $(or $(if $(PYTHON_EXE),$(shell $(PYTHON_EXE) -c 'import platform; print(platform.python_version())')),missing)
VENV := $(if $(filter python3 /usr/bin/python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
PY := $(VENV)/bin/python
FF := $(VENV)/bin/fcgi-finish
# What `make start KEY=VALUE ...` was given goes on to fcgi-finish, which saves it in the
# stack's configuration (var/fcgi-finish.env) for every later target and the systemd
# unit: APP, FCGI_CHDIR, NUMPROCS, NGINX_LISTEN, any FCGI_* or DEFERRED_* (see
# `make help-settings`). The Makefile's own variables stay here.
SETTINGS = $(filter-out PYTHON=% ARGS=%,$(MAKEOVERRIDES))

.PHONY: install compiled pure system-packages test-packages run start stop restart reload status logs demo config service help-settings test test-quick lint format bench docs clean

install: $(VENV)/.installed system-packages

# The stamp names the interpreter's version: a new python3 rebuilds the virtualenv.
$(VENV)/.installed: $(VENV)/.python-$(PYTHON_VERSION) setup.cfg pyproject.toml
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.python-%:
	@test -n "$(PYTHON_EXE)" || { echo "$(PYTHON) does not run: install it, or make PYTHON=/path/to/python3.X"; exit 1; }
	@# Debian's python3 makes virtualenvs only with python3-venv (ensurepip) installed.
	@$(PYTHON_EXE) -c 'import ensurepip' 2>/dev/null || ./conf/install-packages.sh no-ensurepip:python3-venv
	$(PYTHON_EXE) -m venv --clear $(VENV)
	touch $@

# The optional compiled wire core (mypyc over fcgi/wire, see setup.py; needs a C
# compiler): after `make compiled` every target (run, test, bench) uses it, and the
# worker's first log line says so; `make pure` goes back to pure Python.
compiled: install
	@./conf/install-packages.sh gcc:gcc python3-config:python3-dev
	$(VENV)/bin/pip install --quiet mypy
	FCGI_FINISH_COMPILE=1 $(PY) setup.py -q build_ext --inplace
	rm -rf build

pure:
	rm -f fcgi/wire/*.so
	rm -rf build

# Debian packages the stack runs: nginx. `make test` adds the other web servers
# the end-to-end tests put in front of the worker (wrk comes with `make bench`).
system-packages:
	@./conf/install-packages.sh nginx:nginx-light

test-packages:
	@./conf/install-packages.sh apache2:apache2 lighttpd:lighttpd caddy:caddy \
		php-fpm8.2:php8.2-fpm systemd-analyze:systemd redis-server:redis-server haproxy:haproxy \
		chromium:chromium

# The stack, from its saved configuration (`make config` shows it and where each value
# came from): `make start APP=mysite.wsgi:application FCGI_CHDIR=/srv/mysite`, then a
# bare `make restart` serves the same. `start` returns once nginx and every worker run,
# or stops what it started and says why (a taken port, the app's traceback). `reload`
# ships new code with no dropped request and fails, with the traceback, if a worker
# refused it. `service` renders a systemd unit (var/fcgi-finish.service).
run start stop restart reload status logs demo config service: install
	@$(FF) $@ $(SETTINGS)

help-settings: install
	@$(FF) --help

test: install test-packages
	$(PY) -m pytest

# The quick subset while working: no end-to-end stacks and nothing that takes a second
# or more (marked e2e / slow); under a minute on 2 cores. `make test` is the whole suite.
test-quick: install test-packages
	$(PY) -m pytest -m "not e2e and not slow" $(ARGS)

# Speed and memory goals, as ratios against baselines measured in the same run.
# Granian, uWSGI, PHP-FPM and gunicorn run beside ours as baselines (Granian from PyPI
# through the bench extra); BENCH_SECONDS, BENCH_ROUNDS;
# `make bench ARGS=hello` runs one scenario.
bench: install $(VENV)/.bench
	@./conf/install-packages.sh wrk:wrk php-fpm8.2:php8.2-fpm
	$(PY) -m tests.benchmarks.run $(ARGS)

# uWSGI, a baseline, embeds the Python it is compiled against: it is built here for
# this virtualenv's interpreter, never taken from pip's cache, where a wheel built for
# another python3.11 (pyenv's) has the same name.
$(VENV)/.bench: $(VENV)/.installed
	@./conf/install-packages.sh gcc:gcc python3-config:python3-dev
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	$(VENV)/bin/pip install --quiet --no-cache-dir --force-reinstall --no-deps uwsgi
	touch $@

# docs/configuration.md is made from the tables the code reads (the worker's options, the
# middleware's settings, the stack's), never written by hand: run this after changing one.
# tests/test_docs.py fails when the file is not what this makes now.
docs: install
	$(PY) -m fcgi_finish.reference docs/configuration.md

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	@if [ -x $(FF) ]; then $(FF) stop; fi
	rm -rf var build *.egg-info .pytest_cache .ruff_cache
