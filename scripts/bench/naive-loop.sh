#!/usr/bin/env bash
# The seed's approach, as issue 7 describes it: inotifywait (Debian's inotify-tools) piped into
# `supervisorctl restart`, one restart per event. inotifywait says "Watches established." on
# stderr once it is ready.
# usage: naive-loop.sh DIR SOCKET PROGRAM SUPERVISORCTL
dir=$1 sock=$2 program=$3 supervisorctl=$4
inotifywait -m -e close_write,moved_to "$dir" | while read -r _; do
    "$supervisorctl" -s "unix://$sock" restart "$program" >/dev/null
done
