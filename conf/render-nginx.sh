#!/bin/sh
# Render conf/nginx.conf for one stack: render-nginx.sh LISTEN SOCKET VARDIR > out.conf
# Used by the Makefile and by the end-to-end tests, so both run the shipped file.
set -eu
listen=$1 socket=$2 var=$3
user=""
[ "$(id -u)" = 0 ] && user="user root root;"
mkdir -p "$var/run" "$var/log" "$var/tmp"
sed -e "/^[[:space:]]*#/!{s|@LISTEN@|$listen|g; s|@SOCKET@|$socket|g; s|@VAR@|$var|g; s|@USER@|$user|g}" \
    "$(dirname "$0")/nginx.conf"
