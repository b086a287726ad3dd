#!/bin/sh
# Session 5: interleaved harness (STORE_BENCH_INTERLEAVED) of NEW, then criterion base new new base.
# BASE = 532245a bench binary (/tmp/s3bin/bench-base, session 4), NEW = store4 bench binary.
# Usage: flock /work/bench.lock sh run.sh > raw.txt
for fixed in "" 1; do
echo "== interleaved $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg) fixed=$fixed"
if [ -n "$fixed" ]; then export STORE_BENCH_FIXED_NOW=1; else unset STORE_BENCH_FIXED_NOW; fi
STORE_BENCH_INTERLEAVED=400 nice -n -20 ${NEW:-/tmp/s4bin/bench-w} --bench 'store/' 2>/dev/null
done
unset STORE_BENCH_FIXED_NOW
run() { echo "== $1 $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"; nice -n -20 "$2" --bench "$3" --warm-up-time 1 --measurement-time 3 --noplot 2>/dev/null | grep -E "^store/|time:"; }
B='store/lookup_hit(_copy)?_100k$'; N='store/lookup_(resident_)?hit(_copy)?_100k$'
run base ${BASE:-/tmp/s3bin/bench-base} "$B"; run new ${NEW:-/tmp/s4bin/bench-w} "$N"; run new ${NEW:-/tmp/s4bin/bench-w} "$N"; run base ${BASE:-/tmp/s3bin/bench-base} "$B"
