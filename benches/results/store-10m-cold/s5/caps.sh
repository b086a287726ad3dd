#!/bin/bash
# Issue 20 item 3, session 5: the per-core page-in cap (`--page-in-per-core`), same binary,
# interleaved: cap 16 (= the pool's 16 threads on the one worker core: no cap in effect)
# against the default, under one hold of the bench lock.
#   BIN=... L=... D=<10M data> OUT=<dir> [RUNS="16 4 4 16"] [DRIVER=epoll] flock /work/bench.lock bash caps.sh
set -u
: "${BIN:?}" "${L:?}" "${D:?}" "${OUT:?}"
here=$(dirname "$0")
n=0
for cap in ${RUNS:-16 4 4 16}; do
  n=$((n + 1))
  env L="$L" BIN="$BIN" D="$D" PRIO=-20 SERVER_ARGS="--page-in-per-core $cap" \
    ${DRIVER:+SERVER_DRIVER=$DRIVER} OUT="$OUT/${DRIVER:-uring}-$n-cap$cap" \
    bash "$here/../cgroup.sh" > /dev/null 2>&1
  echo "== run $n cap $cap ($OUT/${DRIVER:-uring}-$n-cap$cap)"
  grep -E "ready|p99|errors|fetches" "$OUT/${DRIVER:-uring}-$n-cap$cap/summary.txt" | head -8
done
