#!/bin/bash
# Interleaved base/new restart runs over the same 10M store (benches/scale_run.py per run).
set -u
cd /work/wt-store
D=${D:-/work/wt-store/target/s20/data-k10m}
K=${K:-10000000}
OUT=${OUT:-/work/wt-store/target/s20}
RUNS=${RUNS:-3}
for run in $(seq $RUNS); do
  for v in base new; do
    line=$(flock /work/bench.lock taskset -c 1 python3 benches/scale_run.py --server magnetar --k $K --run $run \
      --data $D --bound 300 --server-cpu 0 --churn-s 5 --magnetar /tmp/mg-store-$v \
      --loadgen /tmp/mgl-store-new --rss-max-mb 6144 --log $OUT/server-$v-run$run.log)
    echo "{\"v\": \"$v\", \"r\": $line}" | tee -a $OUT/results.jsonl
  done
done
