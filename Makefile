# fcgi-finish: `make run` starts the whole stack, `make test` checks it.
# Every target that needs the virtualenv depends on `install`, so both work
# on a fresh clone.

# PYTHON=python3.13 builds its own virtualenv (.venv-python3.13), so switching back
# and forth reuses both; a pyenv-installed version works without `pyenv global`.
PYTHON ?= python3
PYTHON_EXE := $(shell $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null || \
	PYENV_VERSION=$$(pyenv whence $(PYTHON) 2>/dev/null | tail -1) \
	$(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null)
PYTHON_VERSION := $(or $(if $(PYTHON_EXE),$(shell $(PYTHON_EXE) -c 'import platform; print(platform.python_version())')),missing)
VENV := $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
PY := $(VENV)/bin/python
NUMPROCS ?= 2
NGINX_LISTEN ?= 127.0.0.1:8080
NGINX_BIN ?= $(shell command -v nginx || ls /usr/sbin/nginx 2>/dev/null || echo nginx)
SUPERVISOR_CONF := conf/supervisord.conf
CTL := $(VENV)/bin/supervisorctl -c $(SUPERVISOR_CONF)
ROOT := $(CURDIR)

export NUMPROCS NGINX_BIN
export FCGI_PYTHON := $(ROOT)/$(PY)

.PHONY: install system-packages run start stop restart reload status logs demo test lint format bench clean render

install: $(VENV)/.installed system-packages

# The stamp names the interpreter's version: a new python3 rebuilds the virtualenv.
$(VENV)/.installed: $(VENV)/.python-$(PYTHON_VERSION) setup.cfg pyproject.toml
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.python-%:
	@test -n "$(PYTHON_EXE)" || { echo "$(PYTHON) does not run: install it, or make PYTHON=/path/to/python3.X"; exit 1; }
	$(PYTHON_EXE) -m venv --clear $(VENV)
	touch $@

# Debian packages the stack and the tests run: nginx, and the other web servers
# the end-to-end tests put in front of the worker (wrk comes with `make bench`).
system-packages:
	@./conf/install-packages.sh nginx:nginx-light apache2:apache2 lighttpd:lighttpd caddy:caddy

render: install
	@mkdir -p var/run var/log var/tmp
	@./conf/render.sh conf/nginx.conf $(NGINX_LISTEN) $(ROOT)/var/run/app.sock $(ROOT)/var > var/run/nginx.conf.new
	@mv var/run/nginx.conf.new var/run/nginx.conf

run: render
	@echo "fcgi-finish on http://$(NGINX_LISTEN)/ with $(NUMPROCS) worker(s); Ctrl-C stops it all"
	$(VENV)/bin/supervisord -n -c $(SUPERVISOR_CONF)

start: render
	@if [ -S var/run/supervisor.sock ] && $(CTL) pid >/dev/null 2>&1; then \
		echo "already running: make status, or make restart"; exit 1; fi
	$(VENV)/bin/supervisord -c $(SUPERVISOR_CONF)
	@./conf/wait-running.sh "$(CTL)"
	@echo "fcgi-finish on http://$(NGINX_LISTEN)/ with $(NUMPROCS) worker(s)"

stop:
	@if [ -S var/run/supervisor.sock ] && $(CTL) pid >/dev/null 2>&1; then \
		$(CTL) shutdown; \
		while [ -e var/run/supervisord.pid ]; do sleep 0.2; done; \
	else echo "not running"; fi

restart: stop start

# New code with no dropped request: restart the workers one at a time, so the
# pool's socket always has a worker (supervisord closes it when none runs).
reload: install
	@for p in $$($(CTL) status 'app:*' | awk '{print $$1}'); do \
		$(CTL) restart $$p || exit 1; done

status: install
	@if [ -S var/run/supervisor.sock ] && $(CTL) pid >/dev/null 2>&1; then \
		$(CTL) status; echo; \
		curl -sS --max-time 5 http://$(NGINX_LISTEN)/fcgi-status || true; \
	else echo "not running: make start"; fi

logs:
	tail -F var/log/app_*.log var/log/access.log var/log/nginx-error.log var/log/demo.log

demo: install
	$(PY) -m wsgi_app.demo_client http://$(NGINX_LISTEN)/demo var/log/demo.log

test: install
	$(PY) -m pytest

# Speed and memory goals, as ratios against baselines measured in the same run.
# BENCH_SECONDS, BENCH_ROUNDS, BASELINES=uwsgi; `make bench ARGS=hello` runs one scenario.
bench: install
	@./conf/install-packages.sh wrk:wrk
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	$(PY) -m tests.benchmarks.run $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: stop
	rm -rf var build *.egg-info .pytest_cache .ruff_cache
