#!/usr/bin/env bash
# Store recovery time (open with full SHA re-verification of every record) at 100k and 1M
# synthetic records of ~300 B, as `Store::open` (magnetar-loadgen recover, median of 3) and
# as `magnetar serve` start-up to its ready line (median of 3). Page cache warm.
#
# Usage: benches/recovery.sh [COUNT ...]   (default: 100000 1000000; OUT=target/recovery)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/recovery}
COUNTS=${*:-100000 1000000}
mkdir -p "$OUT"
cargo build --release -q -p magnetar -p magnetar-loadgen
M=$PWD/target/release/magnetar L=$PWD/target/release/magnetar-loadgen
for n in $COUNTS; do
  d=$OUT/store-$n
  [ -f "$d.done" ] || { rm -rf "$d"; $L gen-store --count "$n" --size 300 --data-dir "$d"; touch "$d.done"; }
  echo "== $n records ($(du -sh "$d/segments" | cut -f1) of segments)"
  $L recover --data-dir "$d" --runs 3 | tail -1 | sed "s/^/Store::open: /"
  times=()
  for _ in 1 2 3; do
    log=$OUT/serve.log
    t0=$(date +%s%N)
    "$M" serve --data-dir "$d" --listen 127.0.0.1:0 --threads 2 >"$log" 2>&1 &
    pid=$!
    until grep -q '^ready ' "$log"; do sleep 0.005; done
    t1=$(date +%s%N)
    kill $pid; wait $pid 2>/dev/null || true
    times+=($(( (t1 - t0) / 1000000 )))
  done
  sorted=($(printf '%s\n' "${times[@]}" | sort -n))
  echo "magnetar serve to ready: ${times[*]} ms (median ${sorted[1]} ms)"
done | tee "$OUT/results.txt"
