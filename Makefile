# fcgi-finish: `make run` starts the whole stack, `make test` checks it.
# Every target that needs the virtualenv depends on `install`, so both work
# on a fresh clone.

# Debian's python3 by default, even with pyenv's shims first on PATH: it is built with
# PGO and LTO, and a worker spends about a quarter more CPU per request on a default
# pyenv build (see README, Performance). PYTHON=python3.13 builds its own virtualenv
# (.venv-python3.13), so switching back and forth reuses both; a pyenv-installed
# version works without `pyenv global`.
PYTHON ?= $(if $(wildcard /usr/bin/python3),/usr/bin/python3,python3)
PYTHON_EXE := $(shell $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null || \
	PYENV_VERSION=$$(pyenv whence $(PYTHON) 2>/dev/null | tail -1) \
	$(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null)
PYTHON_VERSION := $(or $(if $(PYTHON_EXE),$(shell $(PYTHON_EXE) -c 'import platform; print(platform.python_version())')),missing)
VENV := $(if $(filter python3 /usr/bin/python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
PY := $(VENV)/bin/python
NUMPROCS ?= 2
NGINX_LISTEN ?= 127.0.0.1:8080
NGINX_BIN ?= $(shell command -v nginx || ls /usr/sbin/nginx 2>/dev/null || echo nginx)
SUPERVISOR_CONF := conf/supervisord.conf
CTL := $(VENV)/bin/supervisorctl -c $(SUPERVISOR_CONF)
ROOT := $(CURDIR)
# Your app: make APP=mysite.wsgi:application start (FCGI_CHDIR=/srv/mysite if it
# lives elsewhere; every FCGI_<OPTION> of `python -m fcgi --help` reaches the workers).
APP ?= wsgi_app.demo:application
# Served by nginx at /static/: Django's STATIC_ROOT, a Flask app's static folder.
STATIC_DIR ?= var/static
# Started as root, the workers and nginx's workers run as this user: www-data where
# it exists, else nobody. RUN_USER=root keeps root (the workers log a warning).
RUN_USER ?= $(shell if [ "$$(id -u)" != 0 ]; then id -un; \
	elif id -u www-data >/dev/null 2>&1; then echo www-data; else echo nobody; fi)
# What the stack's commands see: supervisord, nginx's config, the systemd unit.
STACK_ENV = APP='$(APP)' FCGI_USER='$(RUN_USER)' STATIC_DIR='$(abspath $(STATIC_DIR))'

export NUMPROCS NGINX_BIN
export FCGI_PYTHON := $(ROOT)/$(PY)

.PHONY: install system-packages test-packages run start stop restart reload status logs demo test test-quick lint format bench clean render service

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

# Debian packages the stack runs: nginx. `make test` adds the other web servers
# the end-to-end tests put in front of the worker (wrk comes with `make bench`).
system-packages:
	@./conf/install-packages.sh nginx:nginx-light

test-packages:
	@./conf/install-packages.sh apache2:apache2 lighttpd:lighttpd caddy:caddy \
		php-fpm8.2:php8.2-fpm systemd-analyze:systemd redis-server:redis-server haproxy:haproxy

# var/ for this stack; started as root, the workers' user gets the files it writes
# (the access log, the demo log, the scoreboard, var/lib for the journal) and must
# reach the code.
render: install
	@mkdir -p var/run/scoreboard var/log var/tmp var/lib $(STATIC_DIR)
	@$(STACK_ENV) ./conf/render.sh conf/nginx.conf $(NGINX_LISTEN) $(ROOT)/var/run/app.sock $(ROOT)/var > var/run/nginx.conf.new
	@mv var/run/nginx.conf.new var/run/nginx.conf
	@if [ "$$(id -u)" = 0 ] && [ "$(RUN_USER)" != root ]; then \
		touch var/log/access.log var/log/demo.log && \
		chown $(RUN_USER): var/lib var/log/access.log var/log/demo.log && \
		chown -R $(RUN_USER): var/run/scoreboard && \
		./conf/check-reach.sh $(RUN_USER) $(ROOT)/$(PY) $(ROOT); fi

run: render
	@$(PY) ./conf/wait-running.py before $(NGINX_LISTEN) $(ROOT)/var
	@echo "fcgi-finish on http://$(NGINX_LISTEN)/ with $(NUMPROCS) worker(s) of $(APP) as $(RUN_USER); Ctrl-C stops it all"
	$(STACK_ENV) $(VENV)/bin/supervisord -n -c $(SUPERVISOR_CONF)

# Says "running" only once nginx and every worker answer; otherwise it stops what
# it started and fails with the cause (a taken port, the app's traceback).
start: render
	@if [ -S var/run/supervisor.sock ] && $(CTL) pid >/dev/null 2>&1; then \
		echo "already running: make status, or make restart"; exit 1; fi
	@$(PY) ./conf/wait-running.py before $(NGINX_LISTEN) $(ROOT)/var
	@$(STACK_ENV) $(VENV)/bin/supervisord -c $(SUPERVISOR_CONF)
	@if ! $(PY) ./conf/wait-running.py after $(NGINX_LISTEN) $(ROOT)/var $(NUMPROCS) $(CTL); then \
		$(CTL) shutdown >/dev/null 2>&1; \
		while [ -e var/run/supervisord.pid ]; do sleep 0.2; done; exit 1; fi
	@echo "fcgi-finish on http://$(NGINX_LISTEN)/ with $(NUMPROCS) worker(s) of $(APP) as $(RUN_USER)"

# A systemd unit for this checkout (supervisord in the foreground, as `make run`):
# make service && sudo cp var/run/fcgi-finish.service /etc/systemd/system/
service: render
	@$(STACK_ENV) NUMPROCS=$(NUMPROCS) ./conf/render.sh conf/fcgi-finish.service $(NGINX_LISTEN) $(ROOT)/var/run/app.sock $(ROOT)/var > var/run/fcgi-finish.service
	@echo "var/run/fcgi-finish.service: sudo cp var/run/fcgi-finish.service /etc/systemd/system/ && sudo systemctl enable --now fcgi-finish"

stop:
	@if [ -S var/run/supervisor.sock ] && $(CTL) pid >/dev/null 2>&1; then \
		$(CTL) shutdown; \
		while [ -e var/run/supervisord.pid ]; do sleep 0.2; done; \
	else echo "not running"; fi

restart: stop start

# New code with no dropped request: SIGHUP to every worker. Each imports the new
# code in a child process first (if that fails it logs the traceback and keeps
# the old code: see make logs), drains, and execs in place keeping its pid, the
# pool's socket and nginx's kept-alive connections.
reload: install
	$(CTL) signal HUP 'app:*'

# This stack only: the pool's page is shown if nginx's answer names this var/.
status: install
	@if [ -S var/run/supervisor.sock ] && $(CTL) pid >/dev/null 2>&1; then \
		$(CTL) status; echo; \
		$(PY) -c 'import http.client as h, sys; c = h.HTTPConnection(*sys.argv[1].rsplit(":", 1), timeout=5); c.request("GET", "/fcgi-status"); r = c.getresponse(); b = r.read(); ours = r.getheader("X-Fcgi-Finish-Var") == sys.argv[2]; sys.stdout.write(b.decode() if ours else "this stack'"'"'s nginx does not answer on %s (another server does); see var/log/nginx-error.log\n" % sys.argv[1])' \
			$(NGINX_LISTEN) $(ROOT)/var 2>/dev/null || echo "nothing answers on $(NGINX_LISTEN); see var/log/nginx-error.log"; \
	else echo "not running: make start"; fi

logs:
	tail -F var/log/app_*.log var/log/access.log var/log/nginx-error.log var/log/demo.log

demo: install
	$(PY) -m wsgi_app.demo.client http://$(NGINX_LISTEN)/demo var/log/demo.log

test: install test-packages
	$(PY) -m pytest

# The quick subset while working: no end-to-end stacks and nothing that takes a second
# or more (marked e2e / slow); under a minute on 2 cores. `make test` is the whole suite.
test-quick: install test-packages
	$(PY) -m pytest -m "not e2e and not slow" $(ARGS)

# Speed and memory goals, as ratios against baselines measured in the same run.
# uWSGI and PHP-FPM run beside gunicorn as baselines; BENCH_SECONDS, BENCH_ROUNDS;
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

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: stop
	rm -rf var build *.egg-info .pytest_cache .ruff_cache
