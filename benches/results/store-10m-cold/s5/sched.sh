#!/bin/bash
# Issue 20 item 3, session 5: where the hot set's p99 under the cold load goes. Same binary
# and load as caps.sh (default --page-in-per-core), with the page-in threads and/or the
# cold-load generator SCHED_IDLE (cgroup.sh PAGEIN_IDLE / COLD_IDLE), so that a woken
# worker / hot-set client never waits behind them for a scheduler slice (HZ=250 here: a
# tick is 4 ms). One hold of the bench lock:
#   BIN=... L=... D=<10M data> OUT=<dir> flock /work/bench.lock bash sched.sh
set -u
: "${BIN:?}" "${L:?}" "${D:?}" "${OUT:?}"
here=$(dirname "$0")
n=0
for mode in ${MODES:-none both pagein cold}; do
  n=$((n + 1))
  case $mode in
    none) extra=(COLD_IDLE=0) ;;
    both) extra=(PAGEIN_IDLE=1 COLD_IDLE=1) ;;
    pagein) extra=(PAGEIN_IDLE=1 COLD_IDLE=0) ;;
    cold) extra=(COLD_IDLE=1) ;;
  esac
  env L="$L" BIN="$BIN" D="$D" PRIO=-20 "${extra[@]}" OUT="$OUT/c$n-idle-$mode" \
    bash "$here/../cgroup.sh" > /dev/null 2>&1
  echo "== run $n idle $mode"
done
