# fcgi-finish: `make run` starts the whole stack, `make test` checks it.
# Every target that needs the virtualenv depends on `install`, so both work
# on a fresh clone.

PYTHON ?= python3
VENV := .venv
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

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# Debian packages the stack and the tests run: nginx, and the other web servers
# the end-to-end tests put in front of the worker (wrk comes with `make bench`).
system-packages:
	@./conf/install-packages.sh nginx:nginx-light apache2:apache2 lighttpd:lighttpd caddy:caddy haproxy:haproxy

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

# New code with no dropped request: SIGHUP to every worker. Each imports the new
# code in a child process first (if that fails it logs the traceback and keeps
# the old code: see make logs), drains, and execs in place keeping its pid, the
# pool's socket and nginx's kept-alive connections.
reload: install
	$(CTL) signal HUP 'app:*'

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
# uWSGI and PHP-FPM run beside gunicorn as baselines; BENCH_SECONDS, BENCH_ROUNDS;
# `make bench ARGS=hello` runs one scenario.
bench: install
	@./conf/install-packages.sh wrk:wrk php-fpm8.2:php8.2-fpm
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
