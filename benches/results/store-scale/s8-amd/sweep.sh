#!/bin/bash
# Store-size sweep: the same server on a 1 000-record and a 10M-record store (300 B dicts,
# page cache warm), churn over all of the store's hashes at c = 1, 8, 64; alternating
# stores, ROUNDS rounds. Server on CPU 0, loadgen on CPU 1.
#   M=magnetar L=magnetar-loadgen D=<dir with k1k/ and k10m/> bash sweep.sh
set -u
for r in $(seq ${ROUNDS:-2}); do
  for k in k1k k10m; do
    taskset -c 0 "$M" serve --data-dir "$D/$k/store" --listen 127.0.0.1:7010 --no-dht --admin off \
      --threads 1 --connections-per-ip-max 4096 > "$D/srv.log" 2>&1 &
    SP=$!
    for i in $(seq 100); do grep -q '^ready' "$D/srv.log" && break; sleep 0.1; done
    # Warm: every hash once would take too long at 10M; 3 s of churn over all of them.
    taskset -c 1 "$L" --target 127.0.0.1:7010 --hashes "$D/$k/hashes.txt" --mode churn --connections 64 --duration 3s --threads 1 > /dev/null 2>&1
    for c in 1 8 64; do
      c0=$(awk '{print $14+$15}' /proc/$SP/stat)
      out=$(taskset -c 1 "$L" --target 127.0.0.1:7010 --hashes "$D/$k/hashes.txt" --mode churn --connections $c --duration 5s --threads 1 --json 2>/dev/null | tail -1)
      c1=$(awk '{print $14+$15}' /proc/$SP/stat)
      echo "$out" | python3 -c "
import json, sys
r = json.load(sys.stdin); cpu = ($c1 - $c0) / 100
print('round $r $k c=$c fetches/s %6d per_cpu_s %6d p50 %5d p99 %5d errors %d' % (r['fetches_per_sec'], r['fetches'] / cpu if cpu else 0, r['p50_us'], r['p99_us'], r['errors']))"
    done
    kill $SP; wait $SP 2>/dev/null
  done
done
