#!/bin/sh
# Wait until every supervisord program is RUNNING: wait-running.sh "SUPERVISORCTL COMMAND"
# Fails, showing the status, if one is still not RUNNING after 30 s.
ctl=$1
i=0
while [ $i -lt 150 ]; do
    status=$($ctl status 2>/dev/null)
    if [ -n "$status" ] && ! echo "$status" | grep -qv RUNNING; then
        exit 0
    fi
    i=$((i + 1))
    sleep 0.2
done
echo "$status" >&2
echo "error: not every program is RUNNING; see var/log/" >&2
exit 1
