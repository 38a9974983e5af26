#!/bin/sh
# Install the Debian packages whose commands are missing: install-packages.sh CMD:PACKAGE ...
# As root it runs apt-get; otherwise it prints the command to run and fails.
set -eu
missing=""
for pair in "$@"; do
    cmd=${pair%%:*} package=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing="$missing $package"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages:$missing"
    # Keep the packages' services from starting on ports 80/443: we run our own.
    guard=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        guard=/usr/sbin/policy-rc.d
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    if [ -n "$guard" ]; then rm -f "$guard"; fi
else
    echo "error: missing Debian packages:$missing. Install them with: sudo apt-get install -y$missing" >&2
    exit 1
fi
