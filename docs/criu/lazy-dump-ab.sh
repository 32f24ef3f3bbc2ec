#!/bin/bash
# A/B of CRIU's lazy dump with and without lazy-pages-from-task.patch (beside this
# script): how long the dumped process stays stopped before CRIU's page server starts,
# at each memory size, and whether the memory arrives intact after a lazy restore.
#
# Usage (root): docs/criu/lazy-dump-ab.sh CRIU [ROUNDS] [SIZES_MIB...]
#   CRIU    a criu binary built with the patch (CRIU_LAZY_FROM_TASK=1 turns it on,
#           so one binary runs both sides of the A/B)
#   ROUNDS  interleaved rounds (default 5); SIZES_MIB default "16 2048"
# Needs target/release/memhog (`cargo build --release -p workloads`), iproute2, util-linux.
#
# Everything runs in a network namespace made here (the page server on its loopback),
# memhog in a PID namespace of its own so that its restore gets its PID back while the
# dumped copy still exists; all of it is removed on exit.
set -uo pipefail
[ "$(id -u)" = 0 ] || { echo "lazy-dump-ab: needs root" >&2; exit 2; }
CRIU=$(realpath "${1:?usage: $0 CRIU [ROUNDS] [SIZES_MIB...]}")
ROUNDS=${2:-5}
shift $(($# < 2 ? $# : 2))
SIZES=${*:-16 2048}
MEMHOG=$(realpath "$(dirname "$0")/../../target/release/memhog")
[ -x "$MEMHOG" ] || { echo "lazy-dump-ab: build memhog first: $MEMHOG" >&2; exit 2; }

NS=lzab$$
WORK=$(mktemp -d /tmp/lazy-dump-ab.XXXXXX)
cleanup() {
    for pid in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
ip netns add "$NS"
ip -n "$NS" link set lo up
in_ns() { nsenter --net="/run/netns/$NS" "$@"; }

wait_for() { # FILE PATTERN TENTHS
    for _ in $(seq "$3"); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "lazy-dump-ab: no '$2' in $1" >&2
    return 1
}

# The memhog processes in the namespace: the dumped copy, and after the restore its successor.
memhogs() {
    for p in $(ip netns pids "$NS"); do [ "$(cat "/proc/$p/comm")" = memhog ] && echo "$p"; done
}

# CRIU's own log clock, in seconds: the line's "(SS.UUUUUU)" prefix.
log_time() { grep -m1 "$2" "$1" | sed -E 's/^\(([0-9.]+)\).*/\1/'; }

# A move that went wrong: says which step, with the end of CRIU's log, and stops the run.
fail() { # STEP LOG
    echo "lazy-dump-ab: $1 failed; the end of $2:" >&2
    tail -5 "$2" >&2
    exit 1
}

# One move: prints "MIB FROM_TASK STOPPED_MS VERIFY".
one_move() {
    local mib=$1 from_task=$2 dir="$WORK/m" port=$((27000 + RANDOM % 1000))
    rm -rf "$dir" && mkdir -p "$dir/img"
    # A subshell, so that this shell does not report the dumped copy's death as a job's.
    (setsid nsenter --net="/run/netns/$NS" env MEMHOG_MIB="$mib" \
        unshare --pid --fork setsid "$MEMHOG" >"$dir/out.log" 2>&1 </dev/null &)
    wait_for "$dir/out.log" "memhog: ready" 600 || exit 1
    local pid
    pid=$(memhogs | head -1)
    in_ns env CRIU_LAZY_FROM_TASK="$from_task" "$CRIU" dump -t "$pid" -D "$dir/img" \
        -o dump.log -v4 --lazy-pages --address 127.0.0.1 --port "$port" --shell-job &
    local dump=$!
    wait_for "$dir/img/dump.log" "Starting lazy pages server" 300 || fail dump "$dir/img/dump.log"
    in_ns "$CRIU" lazy-pages --page-server --address 127.0.0.1 --port "$port" \
        -D "$dir/img" -o lazy.log -v4 &
    local lazy=$!
    # The daemon's socket must exist before the restore connects to it.
    wait_for "$dir/img/lazy.log" "Waiting for incoming connections" 100 || fail lazy-pages "$dir/img/lazy.log"
    in_ns "$CRIU" restore -D "$dir/img" --lazy-pages -d --shell-job -o restore.log -v4 ||
        fail restore "$dir/img/restore.log"
    wait "$dump" || fail "dump (serving the pages)" "$dir/img/dump.log"
    wait "$lazy" || fail lazy-pages "$dir/img/lazy.log"
    local restored
    restored=$(memhogs | grep -vx "$pid" | head -1)
    [ -n "$restored" ] || fail "finding the restored memhog" "$dir/out.log"
    kill -USR1 "$restored"
    wait_for "$dir/out.log" "memhog: verify" 1200 || exit 1
    local t0 t1
    t0=$(log_time "$dir/img/dump.log" "Seized task")
    t1=$(log_time "$dir/img/dump.log" "Starting lazy pages server")
    kill -9 "$restored"
    # Gone before the next move looks for its memhog in the namespace.
    for _ in $(seq 100); do [ -e "/proc/$restored" ] || break; sleep 0.1; done
    echo "$mib $from_task $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) * 1000 }') \
$(grep -o 'verify [a-zA-Z]*' "$dir/out.log" | tail -1 | cut -d' ' -f2)"
}

echo "mib from_task stopped_ms verify" | tee "$WORK/results"
for _ in $(seq "$ROUNDS"); do
    for mib in $SIZES; do
        for from_task in 0 1; do
            line=$(one_move "$mib" "$from_task") || exit 1
            echo "$line" | tee -a "$WORK/results"
        done
    done
done
echo
echo "medians (ms stopped, seize to page server):"
for mib in $SIZES; do
    for from_task in 0 1; do
        awk -v m="$mib" -v f="$from_task" '$1 == m && $2 == f { print $3 }' "$WORK/results" |
            sort -n | awk -v m="$mib" -v f="$from_task" \
            '{ v[NR] = $1 } END { printf "  %5s MiB  from_task=%s  p50 %.1f  max %.1f  (%d runs)\n",
                m, f, (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2), v[NR], NR }'
    done
done
awk 'NR > 1 && $4 != "ok" { bad++ } END { printf "memory intact: %s\n", bad ? "NO, " bad " failed" : "every move" }' \
    "$WORK/results"
