#!/bin/sh
# Can the unprivileged user run this checkout?  check-reach.sh USER PYTHON ROOT
# The workers run as USER (RUN_USER) and must traverse every folder above the
# code, the virtualenv and the python it links to (a pyenv under /root, a checkout
# in /root: /root is 0700). Fails naming the folders and the fix; changes nothing.
set -eu
user=$1 python=$2 root=$3
closed=""
groups=" $(id -Gn "$user") "
reachable() {  # from the mode bits, as the folders above may hide it from the user
    set -- "$1" $(stat -c '%a %U %G' "$1")
    mode=$((0$2))
    [ $((mode & 1)) = 1 ] && return 0
    [ "$3" = "$user" ] && [ $((mode & 64)) = 64 ] && return 0
    case "$groups" in *" $4 "*) [ $((mode & 8)) = 8 ] && return 0 ;; esac
    return 1
}
for path in "$root" "$(readlink -f "$python")"; do
    dir=$(dirname "$path")
    while [ "$dir" != / ]; do
        if ! reachable "$dir"; then
            case " $closed " in *" $dir "*) ;; *) closed="$closed $dir" ;; esac
        fi
        dir=$(dirname "$dir")
    done
done
if [ -n "$closed" ]; then
    echo "error: RUN_USER $user cannot reach the code or its python: closed to other users:$closed" >&2
    echo "  fix one of: chmod o+x$closed   (traverse only: nobody can list them)" >&2
    echo "          or: move the checkout (e.g. /srv/fcgi-finish) and build the venv from /usr/bin/python3" >&2
    echo "          or: run the app as root on purpose: make RUN_USER=root ..." >&2
    exit 1
fi
if ! out=$(cd "$root" && runuser -u "$user" -- "$python" -c 'import fcgi, wsgi_app' 2>&1); then
    echo "error: RUN_USER $user cannot import the code with $python:" >&2
    echo "$out" >&2
    exit 1
fi
