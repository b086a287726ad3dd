#!/bin/bash
# 10M store, server in a 1 GiB memory cgroup (v1), caches dropped: ready? serving? hot set
# (1000 hashes, 4 connections) p99 alone and while 16 connections fetch random hashes of all 10M.
set -u
BIN=${BIN:-/tmp/mg-store-new}
L=/tmp/mgl-store-new
D=/work/wt-store/target/s20/data-k10m
OUT=/work/wt-store/target/s20/cg-$(basename $BIN)
mkdir -p $OUT
CG=/sys/fs/cgroup/memory/magnetar-issue20
mkdir -p $CG
echo $((1024*1024*1024)) > $CG/memory.limit_in_bytes
echo 0 > $CG/memory.failcnt 2>/dev/null
head -1000 $D/sample.txt > $OUT/hot.txt
sync; echo 3 > /proc/sys/vm/drop_caches
PORT=$((20000 + RANDOM % 20000))
t0=$(date +%s.%N)
( echo $BASHPID > $CG/cgroup.procs; exec taskset -c 0 $BIN serve --data-dir $D/store --listen 127.0.0.1:$PORT --no-dht --admin off --threads 1 --connections-per-ip-max 4096 --shutdown-grace-ms 500 ) > $OUT/stdout.log 2> $OUT/server.log &
SP=$!
for i in $(seq 600); do
  # The server's stdout line itself ("ready listen=..."); until 2026-12-07 this looked for
  # "[...] ready" (scale_run.py's log prefix), never matched, and the loop ran out its 600
  # rounds: the "ready after 65 s" it printed was the loop's bound, not the server.
  grep -q "^ready " $OUT/stdout.log 2>/dev/null && break
  kill -0 $SP 2>/dev/null || break
  sleep 0.1
done
t1=$(date +%s.%N)
echo "ready after $(echo "$t1 - $t0" | bc) s (alive: $(kill -0 $SP 2>/dev/null && echo yes || echo no))" | tee $OUT/summary.txt
grep -E "RssAnon|VmRSS" /proc/$SP/status | tee -a $OUT/summary.txt
run() { taskset -c 1 $L --target 127.0.0.1:$PORT --hashes $1 --mode churn --connections $2 --duration $3 --threads 1 --timeout 10 --json 2>>$OUT/loadgen.err | tail -1; }
echo "hot alone:" | tee -a $OUT/summary.txt
run $OUT/hot.txt 4 5s > /dev/null   # warm the hot set
run $OUT/hot.txt 4 10s | tee -a $OUT/summary.txt
echo "hot under cold load:" | tee -a $OUT/summary.txt
run $D/hashes.txt 16 14s > $OUT/cold.json &
CP=$!
sleep 2
run $OUT/hot.txt 4 10s | tee -a $OUT/summary.txt
wait $CP
echo "cold load:" | tee -a $OUT/summary.txt; cat $OUT/cold.json | tee -a $OUT/summary.txt
grep -E "RssAnon|VmRSS" /proc/$SP/status | tee -a $OUT/summary.txt
echo "failcnt $(cat $CG/memory.failcnt) max_usage $(cat $CG/memory.max_usage_in_bytes) oom: $(grep oom_kill $CG/memory.oom_control)" | tee -a $OUT/summary.txt
kill -TERM $SP; wait $SP; echo "server exit $?" | tee -a $OUT/summary.txt
