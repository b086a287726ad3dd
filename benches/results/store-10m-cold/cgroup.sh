#!/bin/bash
# Issue 20 item 3: a 10M-record store, server in a 1 GiB memory cgroup (v1), caches dropped;
# hot set (1000 hashes, 4 connections) p99 alone and while 16 connections fetch random
# hashes of all 10M. Derived from benches/results/store-10m/cgroup.sh (same load), plus the
# admin plane for the cold-read counters. Run under `flock /work/bench.lock`.
#   BIN=magnetar L=magnetar-loadgen D=<dir with store/ and hashes.txt> OUT=<dir> cgroup.sh
# COLD_HASHES=<file> replaces the random-of-all-10M load (a control: a second, resident
# hot set shows what 16 busy connections cost the hot set on one core without the disk).
# SERVER_DRIVER=epoll runs the server on the epoll driver (the load generator stays as is).
# SERVER_ARGS=<args> are added to `serve` (e.g. --page-in-threads 4).
# Where the hot fetches' time goes: sched.txt gets, for the cold phase, every server
# thread's CPU and run-queue wait (/proc/PID/task/*/schedstat) and the same for both load
# generators (sampled just before they end), and each CPU's busy share (/proc/stat).
# PRIO=<n>: every process of the run (server, both load generators) at that nice value,
# so that other users' jobs on the machine (builds) weigh less against the run.
# HOT_NICE=<n> runs the hot-set load generator (both of its runs) at that nice value in
# place of PRIO: the measuring client only; it shares CPU 1 with the cold load generator,
# the server gets no such help. COLD_NICE=<n> does the same for the cold-load generator.
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
# Below the ephemeral range (32768-): a run leaves ~10^5 client ports in TIME_WAIT there.
PORT=$((20000 + RANDOM % 12000)); APORT=$((PORT + 1))
t0=$(date +%s.%N)
( echo $BASHPID > $CG/cgroup.procs; exec nice -n "${PRIO:-0}" taskset -c 0 "$BIN" serve --data-dir "$D/store" --listen 127.0.0.1:$PORT --no-dht --admin 127.0.0.1:$APORT --threads 1 --connections-per-ip-max 4096 --shutdown-grace-ms 500 ${SERVER_ARGS:-} ${SERVER_DRIVER:+--driver $SERVER_DRIVER} ) > "$OUT/stdout.log" 2> "$OUT/server.log" &
SP=$!
for i in $(seq 1200); do
  grep -q "^ready" "$OUT/stdout.log" 2>/dev/null && break
  kill -0 $SP 2>/dev/null || break
  sleep 0.1
done
t1=$(date +%s.%N)
echo "prio ${PRIO:-0} hot_nice ${HOT_NICE:--} cold_nice ${COLD_NICE:--} cold_idle ${COLD_IDLE:--} pagein_idle ${PAGEIN_IDLE:--} pagein_renice ${PAGEIN_RENICE:--} driver ${SERVER_DRIVER:-io_uring} args ${SERVER_ARGS:--} load $(cut -d' ' -f1-3 /proc/loadavg)" > "$OUT/summary.txt"
echo "ready after $(echo "$t1 - $t0" | bc) s (alive: $(kill -0 $SP 2>/dev/null && echo yes || echo no))" | tee -a "$OUT/summary.txt"
kill -0 $SP 2>/dev/null || { echo "server gone:"; tail -5 "$OUT/server.log"; exit 1; }
# PAGEIN_RENICE=<n>: the page-in threads set to that nice value once the server is up (an
# experiment without a rebuild; the server's --page-in-nice does it from inside).
if [ -n "${PAGEIN_RENICE:-}" ]; then
  for t in /proc/$SP/task/*; do grep -q pagein $t/comm && renice -n "$PAGEIN_RENICE" -p "${t##*/}" > /dev/null; done
fi
# PAGEIN_IDLE=1: the page-in threads SCHED_IDLE once the server is up (a woken worker then
# preempts them at once; at a nice value it may wait for their slice, up to a 4 ms tick).
if [ -n "${PAGEIN_IDLE:-}" ]; then
  for t in /proc/$SP/task/*; do grep -q pagein $t/comm && chrt -i -p 0 "${t##*/}"; done
fi
# The cold-load generator runs SCHED_IDLE by default (COLD_IDLE=0: at equal priority): the
# measuring client shares CPU 1 with it and then preempts it at once on every wake-up
# instead of waiting up to a 4 ms tick (HZ=250) behind it. That wait is the client
# machine's, not the server's: in service the two loads are different machines. Measured
# on a quiet machine (s6/table.txt): hot p99 under the cold load 1.08x / 0.71x / 1.48x with
# the generator idle, 1.76x / 1.80x / 6.44x at equal priority, the server core 45-74 % busy.
COLD_IDLE=${COLD_IDLE-1}
[ "$COLD_IDLE" = 0 ] && COLD_IDLE=
run() { taskset -c 1 ${IDLE:+chrt -i 0} nice -n "${NICE:-${PRIO:-0}}" "$L" --target 127.0.0.1:$PORT --hashes "$1" --mode churn --connections "$2" --duration "$3" --threads 1 --timeout 10 --json 2>>"$OUT/loadgen.err" | tail -1; }
echo "hot alone:" | tee -a "$OUT/summary.txt"
NICE=${HOT_NICE:-} run "$D/hot.txt" 4 5s > /dev/null   # warm the hot set
NICE=${HOT_NICE:-} run "$D/hot.txt" 4 10s | tee -a "$OUT/summary.txt"
# schedstat of every thread of a process: "name cpu_ns runq_wait_ns slices minflt majflt"
threads() { for t in /proc/$1/task/*; do echo "$(cat $t/comm 2>/dev/null | tr ' ' _) $(cat $t/schedstat 2>/dev/null) $(awk '{print $10, $12}' $t/stat 2>/dev/null)"; done; }
cpus() { grep -E '^cpu[01] ' /proc/stat; }
echo "hot under cold load:" | tee -a "$OUT/summary.txt"
IDLE=${COLD_IDLE:-} NICE=${COLD_NICE:-} run "${COLD_HASHES:-$D/hashes.txt}" 16 14s > "$OUT/cold.json" &
CP=$!
sleep 2
{ echo "== before (server $SP)"; threads $SP; cpus; } > "$OUT/sched.txt"
NICE=${HOT_NICE:-} run "$D/hot.txt" 4 10s > "$OUT/hot-cold.json" &
HP=$!
# PERF=1: a profile of the server (every thread) for 8 s of the cold phase, in perf.data.
[ -n "${PERF:-}" ] && perf record -F 997 -g -p $SP -o "$OUT/perf.data" -- sleep 8 > /dev/null 2>&1 &
sleep 9
{ echo "== after"; threads $SP; cpus;
  for p in $(pgrep -f "magnetar-loadgen|loadgen --target" ); do echo "== loadgen $p $(tr '\0' ' ' < /proc/$p/cmdline | grep -o 'hashes [^ ]*')"; threads $p; done; } >> "$OUT/sched.txt" 2>/dev/null
wait $HP
tee -a "$OUT/summary.txt" < "$OUT/hot-cold.json"
wait $CP
echo "cold load:" | tee -a "$OUT/summary.txt"; tee -a "$OUT/summary.txt" < "$OUT/cold.json"
curl -s "http://127.0.0.1:$APORT/metrics" | grep -E "^magnetar_(cold_lookups|page_ins|page_in_wait_us|hits)_total" | tee -a "$OUT/summary.txt"
grep -E "RssAnon|VmRSS" /proc/$SP/status | tee -a "$OUT/summary.txt"
echo "failcnt $(cat $CG/memory.failcnt) max_usage $(cat $CG/memory.max_usage_in_bytes) oom: $(grep oom_kill $CG/memory.oom_control)" | tee -a "$OUT/summary.txt"
kill -TERM $SP; wait $SP; echo "server exit $?" | tee -a "$OUT/summary.txt"
