#!/bin/bash
# Issue 20 item 3: a 10M-record store, server in a 1 GiB memory cgroup (v1), caches dropped;
# hot set (1000 hashes, 4 connections) p99 alone and while 16 connections fetch random
# hashes of all 10M. Derived from benches/results/store-10m/cgroup.sh (same load), plus the
# admin plane for the cold-read counters. Run under `flock /work/bench.lock`.
#   BIN=magnetar L=magnetar-loadgen D=<dir with store/ and hashes.txt> OUT=<dir> cgroup.sh
# COLD_HASHES=<file> replaces the random-of-all-10M load (a control: a second, resident
# hot set shows what 16 busy connections cost the hot set on one core without the disk).
# SERVER_DRIVER=epoll runs the server on the epoll driver (the load generator stays as is).
set -u
: "${BIN:?}" "${L:?}" "${D:?}" "${OUT:?}"
mkdir -p "$OUT"
CG=/sys/fs/cgroup/memory/magnetar-issue20-cold
mkdir -p $CG
echo $((1024*1024*1024)) > $CG/memory.limit_in_bytes
echo 0 > $CG/memory.failcnt 2>/dev/null
# The hot set: 1000 hashes spread over the whole store.
[ -f "$D/hot.txt" ] || awk 'NR % 10000 == 1' "$D/hashes.txt" | head -1000 > "$D/hot.txt"
sync; echo 3 > /proc/sys/vm/drop_caches
PORT=$((20000 + RANDOM % 20000)); APORT=$((PORT + 1))
t0=$(date +%s.%N)
( echo $BASHPID > $CG/cgroup.procs; exec taskset -c 0 "$BIN" serve --data-dir "$D/store" --listen 127.0.0.1:$PORT --no-dht --admin 127.0.0.1:$APORT --threads 1 --connections-per-ip-max 4096 --shutdown-grace-ms 500 ${SERVER_DRIVER:+--driver $SERVER_DRIVER} ) > "$OUT/stdout.log" 2> "$OUT/server.log" &
SP=$!
for i in $(seq 1200); do
  grep -q "^ready" "$OUT/stdout.log" 2>/dev/null && break
  kill -0 $SP 2>/dev/null || break
  sleep 0.1
done
t1=$(date +%s.%N)
echo "ready after $(echo "$t1 - $t0" | bc) s (alive: $(kill -0 $SP 2>/dev/null && echo yes || echo no))" | tee "$OUT/summary.txt"
run() { taskset -c 1 "$L" --target 127.0.0.1:$PORT --hashes "$1" --mode churn --connections "$2" --duration "$3" --threads 1 --timeout 10 --json 2>>"$OUT/loadgen.err" | tail -1; }
echo "hot alone:" | tee -a "$OUT/summary.txt"
run "$D/hot.txt" 4 5s > /dev/null   # warm the hot set
run "$D/hot.txt" 4 10s | tee -a "$OUT/summary.txt"
echo "hot under cold load:" | tee -a "$OUT/summary.txt"
run "${COLD_HASHES:-$D/hashes.txt}" 16 14s > "$OUT/cold.json" &
CP=$!
sleep 2
run "$D/hot.txt" 4 10s | tee -a "$OUT/summary.txt"
wait $CP
echo "cold load:" | tee -a "$OUT/summary.txt"; tee -a "$OUT/summary.txt" < "$OUT/cold.json"
curl -s "http://127.0.0.1:$APORT/metrics" | grep -E "^magnetar_(cold_lookups|page_ins|page_in_wait_us|hits)_total" | tee -a "$OUT/summary.txt"
grep -E "RssAnon|VmRSS" /proc/$SP/status | tee -a "$OUT/summary.txt"
echo "failcnt $(cat $CG/memory.failcnt) max_usage $(cat $CG/memory.max_usage_in_bytes) oom: $(grep oom_kill $CG/memory.oom_control)" | tee -a "$OUT/summary.txt"
kill -TERM $SP; wait $SP; echo "server exit $?" | tee -a "$OUT/summary.txt"
