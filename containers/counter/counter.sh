#!/bin/sh
# Counter workload: its only state is $i in the shell's memory, so an unbroken
# sequence in the log after a migration shows memory state was carried over
# (a restart from scratch would print 0 again, a lost interval leaves a gap in
# time but not in numbers).

# As PID 1 the shell would otherwise ignore SIGTERM and `podman stop` would
# wait for its timeout.
trap 'exit 0' TERM INT

i=0
while :; do
    echo "$i"
    i=$((i + 1))
    usleep 100000
done
