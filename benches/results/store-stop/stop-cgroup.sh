#!/bin/bash
# Issue 20: does a clean stop (SIGTERM: the store writes index.ckpt) survive a memory cgroup
# smaller than twice the index? Before this branch the checkpoint was written from a copy
# of every table (2x the index's memory at the stop); at 30M records in 1 GiB that was an
# OOM kill at every stop. Here: 10M records, a cgroup (v1) of CGROUP_MB, start, serve a
# few fetches, SIGTERM, then report the exit status, OOM kills and whether index.ckpt was
# rewritten. Run under `flock /work/bench.lock`.
#   BIN=magnetar L=magnetar-loadgen D=<dir with store/ and hashes.txt> OUT=<dir> CGROUP_MB=384 stop-cgroup.sh
set -u
: "${BIN:?}" "${L:?}" "${D:?}" "${OUT:?}" "${CGROUP_MB:?}"
mkdir -p "$OUT"
CG=/sys/fs/cgroup/memory/magnetar-issue20-stop
mkdir -p $CG
echo 0 > $CG/memory.force_empty 2>/dev/null
echo $((CGROUP_MB * 1024 * 1024)) > $CG/memory.limit_in_bytes
echo 0 > $CG/memory.max_usage_in_bytes
oom0=$(awk '/oom_kill /{print $2}' $CG/memory.oom_control)
ck="$D/store/index.ckpt"
before=$(stat -c %Y.%y "$ck" 2>/dev/null)
PORT=$((20000 + RANDOM % 12000))
( echo $BASHPID > $CG/cgroup.procs; exec taskset -c 0 "$BIN" serve --data-dir "$D/store" --listen 127.0.0.1:$PORT --no-dht --admin off --threads 1 --shutdown-grace-ms 200 ) > "$OUT/stdout.log" 2> "$OUT/server.log" &
SP=$!
for i in $(seq 600); do grep -q "^ready" "$OUT/stdout.log" 2>/dev/null && break; kill -0 $SP 2>/dev/null || break; sleep 0.1; done
echo "cgroup ${CGROUP_MB} MiB, bin $BIN" | tee "$OUT/summary.txt"
echo "ready: $(grep -c '^ready' "$OUT/stdout.log") (alive: $(kill -0 $SP 2>/dev/null && echo yes || echo no))" | tee -a "$OUT/summary.txt"
taskset -c 1 "$L" --target 127.0.0.1:$PORT --hashes "$D/hashes.txt" --mode churn --connections 4 --duration 3s --threads 1 --timeout 10 --json 2>/dev/null | tail -1 | grep -o '"fetches":[0-9]*\|"errors":[0-9]*' | paste -sd' ' | tee -a "$OUT/summary.txt"
grep -E "RssAnon" /proc/$SP/status | tee -a "$OUT/summary.txt"
kill -TERM $SP; wait $SP; rc=$?
after=$(stat -c %Y.%y "$ck" 2>/dev/null)
echo "exit $rc; oom kills $(( $(awk '/oom_kill /{print $2}' $CG/memory.oom_control) - oom0 )); max_usage $(( $(cat $CG/memory.max_usage_in_bytes) / 1048576 )) MiB; index.ckpt rewritten: $([ "$before" != "$after" ] && echo yes || echo no)" | tee -a "$OUT/summary.txt"
rm -f "$D/store/index.ckpt.tmp"
