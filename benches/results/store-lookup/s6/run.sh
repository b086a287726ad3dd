#!/bin/sh
# Session 6 (issue 20): the interleaved harness of NEW (this branch's bench binary) beside
# BASE (532245a, keys-in-RAM HashMap index, with the same harness's lookup variants added:
# base-harness.rs), fenced (STORE_BENCH_FENCE=1: one lookup at a time, as a server does them)
# and not, alternating binaries, ROUNDS times.
# Usage: flock /work/bench.lock sh run.sh > raw.txt
NEW=${NEW:-/tmp/s6bin/bench-new}; BASE=${BASE:-/tmp/s6bin/bench-base-fence}
for r in $(seq ${ROUNDS:-3}); do
  for fence in 1 ""; do
    if [ -n "$fence" ]; then export STORE_BENCH_FENCE=1; else unset STORE_BENCH_FENCE; fi
    for bin in "$NEW" "$BASE"; do
      echo "== round $r fence=${fence:-0} $(basename "$bin") $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
      STORE_BENCH_INTERLEAVED=${N:-40} nice -n -20 "$bin" --bench 'store/' 2>/dev/null | grep -v '^interleaved'
    done
  done
done
