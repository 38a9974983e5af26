#!/bin/sh
# Render a template from conf/ for one stack:
#   render.sh TEMPLATE LISTEN SOCKET VARDIR > out.conf
# e.g. render.sh conf/nginx.conf 127.0.0.1:8080 $PWD/var/run/app.sock $PWD/var
# Replaces, outside comments:
#   @LISTEN@ (host:port), @HOST@, @PORT@, @SOCKET@, @VAR@, @ROOT@ (VARDIR's parent:
#   the checkout)
#   @USER@       nginx's "user" line: when run as root, "user $FCGI_USER GROUP;" (the
#                unprivileged user the stack runs as), or "user root root;" without
#                FCGI_USER; empty when not root (nginx then runs as the invoking user)
#   @STATIC@     the static folder served at /static/ ($STATIC_DIR, default VARDIR/static)
#   @MIME_TYPES@ the installed nginx's mime.types (/etc/nginx/mime.types on Debian)
#   @APP@ @NUMPROCS@ @NGINX_BIN@ @PYTHON@ @FCGI_USER@ for the systemd unit ($APP,
#                $NUMPROCS, $NGINX_BIN, $FCGI_PYTHON, $FCGI_USER; defaults: the demo
#                app, 2, /usr/sbin/nginx, .venv's python, root)
# The Makefile and the end-to-end tests both use it, so the tests run the shipped files.
set -eu
template=$1 listen=$2 socket=$3 var=$4
host=${listen%:*} port=${listen##*:}
root=$(dirname "$var")
user=""
if [ "$(id -u)" = 0 ]; then
    run_user=${FCGI_USER:-root}
    user="user $run_user $(id -gn "$run_user");"
fi
static=${STATIC_DIR:-$var/static}
mime=/etc/nginx/mime.types
if [ ! -e "$mime" ]; then  # another build: mime.types beside its nginx.conf
    nginx=${NGINX_BIN:-nginx}
    conf=$("$nginx" -V 2>&1 | sed -n 's/.*--conf-path=\([^ ]*\).*/\1/p')
    mime=$(dirname "${conf:-/etc/nginx/nginx.conf}")/mime.types
fi
mkdir -p "$var/run" "$var/log" "$var/tmp"
sed -e "/^[[:space:]]*#/!{s|@LISTEN@|$listen|g; s|@HOST@|$host|g; s|@PORT@|$port|g; s|@SOCKET@|$socket|g; s|@VAR@|$var|g; s|@ROOT@|$root|g; s|@USER@|$user|g; s|@STATIC@|$static|g; s|@MIME_TYPES@|$mime|g; s|@APP@|${APP:-wsgi_app.demo:application}|g; s|@NUMPROCS@|${NUMPROCS:-2}|g; s|@NGINX_BIN@|${NGINX_BIN:-/usr/sbin/nginx}|g; s|@PYTHON@|${FCGI_PYTHON:-$root/.venv/bin/python}|g; s|@FCGI_USER@|${FCGI_USER:-root}|g}" \
    "$template"
