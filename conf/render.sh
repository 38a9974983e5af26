#!/bin/sh
# Render a web server template from conf/ for one stack:
#   render.sh TEMPLATE LISTEN SOCKET VARDIR > out.conf
# e.g. render.sh conf/nginx.conf 127.0.0.1:8080 $PWD/var/run/app.sock $PWD/var
# Replaces @LISTEN@ (host:port), @HOST@, @PORT@, @SOCKET@, @VAR@ and @USER@
# ("user root root;" when run as root, so nginx's workers can reach the socket)
# outside comments. The Makefile and the end-to-end tests both use it, so the
# tests run the shipped files.
set -eu
template=$1 listen=$2 socket=$3 var=$4
host=${listen%:*} port=${listen##*:}
user=""
[ "$(id -u)" = 0 ] && user="user root root;"
mkdir -p "$var/run" "$var/log" "$var/tmp"
sed -e "/^[[:space:]]*#/!{s|@LISTEN@|$listen|g; s|@HOST@|$host|g; s|@PORT@|$port|g; s|@SOCKET@|$socket|g; s|@VAR@|$var|g; s|@USER@|$user|g}" \
    "$template"
