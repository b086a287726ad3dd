#!/usr/bin/env bash
# End-to-end comparison, one command: the same K synthetic torrents served by
#   floor      benches/floor/floor.c: one epoll thread, precomputed bytes, no parsing
#   uring      magnetar serve --driver io-uring --threads 1
#   epoll      magnetar serve --driver epoll --threads 1
#   libtorrent python3-libtorrent serving them (benches/lt_seed.py, limits raised;
#              metadata-only, not seed mode: LT_SEED_MODE=seed measures the old way)
#   uring-utp       magnetar io_uring again, loaded over uTP (magnetar-loadgen --transport utp)
#   libtorrent-utp  the libtorrent seed again, loaded over uTP
# each pinned to CPU 0, loaded by magnetar-loadgen pinned to CPU 1, in churn mode (full
# fetches/s: connect, handshakes, all pieces, close) and keepalive mode (blocks/s on open
# connections). Runs are interleaved (run 1 of every server, then run 2, ...) so that
# noise from other users of the machine lands on all of them alike; before each measured
# run the script waits until the machine is quiet. Results: OUT/results.jsonl (one line per
# run), OUT/summary.md (medians and ratios), OUT/compare.svg (chart).
#
# Usage: benches/compare.sh [-k K] [-d SECONDS] [-r RUNS] [-c CONNECTIONS] [-o OUT]
#                           [-s "floor uring epoll libtorrent uring-utp libtorrent-utp"] [-q]
#   -q  quick check: K=50, 2 s runs, 1 run, no waiting for a quiet machine
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# bench_setup, busy, wait_quiet
source "$ROOT/benches/lib.sh"

K=1000 DURATION=10 RUNS=3 CONNS=64 OUT=target/compare QUICK=0
SERVERS="floor uring epoll libtorrent uring-utp libtorrent-utp"
while getopts "k:d:r:c:o:s:q" opt; do
  case $opt in
    k) K=$OPTARG ;; d) DURATION=$OPTARG ;; r) RUNS=$OPTARG ;; c) CONNS=$OPTARG ;;
    o) OUT=$OPTARG ;; s) SERVERS=$OPTARG ;; q) QUICK=1 ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then K=50 DURATION=2 RUNS=1; fi
# A machine busier than this (share of all CPUs, sampled over 2 s) is waited for, 60 s at a
# time, up to WAIT_MAX_S in total over the whole comparison; after that runs are measured
# anyway and flagged (busy_flagged in results.jsonl, counted in summary.md).
BUSY_MAX=${BUSY_MAX:-0.25}
WAIT_MAX_S=${WAIT_MAX_S:-1800}
WAITED_S=0
WARMUP_S=${WARMUP_S:-3}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
PY=/usr/bin/python3

bench_setup
cc -O2 -o "$OUT/floor" benches/floor/floor.c
$PY -c 'import libtorrent' 2>/dev/null || { echo "python3-libtorrent missing (bash scripts/test.sh installs it)"; exit 1; }

DATA=$OUT/data-k$K
if [ ! -f "$DATA/done" ]; then
  echo "== generating $K synthetic torrents (1-8 metadata pieces) in $DATA"
  rm -rf "$DATA"; mkdir -p "$DATA"
  $L gen-store --count "$K" --data-dir "$DATA/store" --hashes "$DATA/hashes.txt" \
     --torrents "$DATA/torrents" --floor "$DATA/floor.bin"
  touch "$DATA/done"
fi


# The loadgen's transport for a row: the -utp rows dial uTP, the others TCP.
transport() { case $1 in *-utp) echo utp ;; *) echo tcp ;; esac; }

SERVER_PID=""
PORT=""
start_server() {
  local which=$1 log=$OUT/server-$1.log
  case $which in
    floor) taskset -c "$SERVER_CPU" "$OUT/floor" "$DATA/floor.bin" 127.0.0.1 0 >"$log" 2>&1 & ;;
    uring|epoll|uring-utp)
      local driver=io-uring; [ "$which" = epoll ] && driver=epoll
      taskset -c "$SERVER_CPU" "$M" serve --data-dir "$DATA/store" --listen 127.0.0.1:0 \
        --threads 1 --driver "$driver" --connections-max 1000000 \
        --connections-per-ip-max 1000000 >"$log" 2>&1 & ;;
    libtorrent|libtorrent-utp)
      local port=$((20000 + RANDOM % 20000))
      # Seed mode without the content keeps libtorrent busy for minutes before it answers
      # (BENCHMARKS.md "Scale"); metadata-only serves the same metadata at once.
      LT_SEED_MODE=${LT_SEED_MODE:-metadata-only} taskset -c "$SERVER_CPU" $PY benches/lt_seed.py \
        "$DATA/torrents" 127.0.0.1 "$port" >"$log" 2>&1 & ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 600); do
    if grep -q '^ready ' "$log"; then
      PORT=$(grep '^ready ' "$log" | sed -E 's/.*listen=[^ ]*:([0-9]+).*/\1/')
      return 0
    fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "server $which did not start:"; cat "$log"; exit 1
}

# A server is "ready" when it answers: libtorrent prints its port long before it has
# added a thousand torrents, so fetch the last-added hashes until they all succeed
# (bounded: READY_MAX_S, default 300 s), before the warm-up and the measured runs.
wait_serving() {
  local which=$1 deadline=$(( $(date +%s) + ${READY_MAX_S:-300} ))
  tail -n 8 "$DATA/hashes.txt" > "$DATA/probe.txt"
  while [ "$(date +%s)" -lt "$deadline" ]; do
    local errors
    errors=$(taskset -c "$LOADGEN_CPU" "$L" --target "127.0.0.1:$PORT" --hashes "$DATA/probe.txt" \
      --transport "$(transport "$which")" --connections 8 --fetches 16 --timeout 10 --threads 1 --json 2>/dev/null | tail -1 |
      $PY -c 'import json,sys; print(json.load(sys.stdin)["errors"])' 2>/dev/null || echo 1)
    [ "$errors" = 0 ] && return 0
    sleep 2
  done
  echo "   $which never answered the probe within ${READY_MAX_S:-300} s; measuring anyway"
}

stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}
trap stop_server EXIT

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/ { print $2 }' "/proc/$1/status"; }
TCK=$(getconf CLK_TCK)
# Datagrams the kernel dropped on the server's UDP sockets at $PORT (receive buffer full):
# the drops column of /proc/net/udp{,6}. uTP rows only; 0 for TCP.
udp_drops() {
  awk -v p="$(printf '%04X' "$PORT")" 'FNR > 1 { split($2, a, ":"); if (a[2] == p) s += $NF }
       END { print s + 0 }' /proc/net/udp /proc/net/udp6 2>/dev/null
}

# measure SERVER MODE RUN: one loadgen run; appends a JSON line to results.jsonl.
measure() {
  local which=$1 mode=$2 run=$3 flagged=0
  wait_quiet || flagged=1
  local load busy_at; load=$(cut -d' ' -f1 /proc/loadavg); busy_at=$(busy)
  local t0 c0 out
  local d0; d0=$(udp_drops)
  t0=$(date +%s.%N); c0=$(cpu_ticks "$SERVER_PID")
  out=$(taskset -c "$LOADGEN_CPU" "$L" --target "127.0.0.1:$PORT" --hashes "$DATA/hashes.txt" \
        --mode "$mode" --transport "$(transport "$which")" --connections "$CONNS" --duration "$DURATION" --threads 1 --json \
        --plot "$OUT/plot-$which-$mode-$run.svg" | tail -1)
  local c1 t1; c1=$(cpu_ticks "$SERVER_PID"); t1=$(date +%s.%N)
  local cpu; cpu=$(awk -v a="$c0" -v b="$c1" -v s="$t0" -v e="$t1" -v t="$TCK" \
                   'BEGIN { printf "%.3f", (b - a) / t / (e - s) }')
  local rss hwm; rss=$(rss_kb "$SERVER_PID"); hwm=$(hwm_kb "$SERVER_PID")
  local drops; drops=$(( $(udp_drops) - d0 ))
  echo "$out" | $PY -c "
import json, sys
r = json.load(sys.stdin)
r.update(server='$which', run=$run, server_cpu=$cpu, server_udp_drops=$drops, server_rss_kb=$rss, server_hwm_kb=$hwm,
         loadavg1=$load, busy=$busy_at, busy_flagged=bool($flagged), k=$K, duration_s=$DURATION)
print(json.dumps(r, sort_keys=True))" | tee -a "$OUT/results.jsonl" | $PY -c "
import json, sys
r = json.load(sys.stdin)
print('   %-14s %-9s run %d: %9.0f fetches/s %9.0f blocks/s  p50 %6d us  p99 %6d us  cpu %.2f  rss %d MB  errors %d' % (
    r['server'], r['mode'], r['run'], r['fetches_per_sec'], r['blocks_per_sec'], r['p50_us'],
    r['p99_us'], r['server_cpu'], r['server_rss_kb'] // 1024, r['errors'])
    + ('  udp drops %d' % r['server_udp_drops'] if r['server_udp_drops'] else ''))"
}

: >"$OUT/results.jsonl"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs"
  echo "libtorrent: $($PY -c 'import libtorrent; print(libtorrent.__version__)')"
  echo "k=$K duration=${DURATION}s runs=$RUNS connections=$CONNS server_cpu=$SERVER_CPU loadgen_cpu=$LOADGEN_CPU"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt"

for run in $(seq "$RUNS"); do
  for which in $SERVERS; do
    echo "== run $run: $which"
    start_server "$which"
    wait_serving "$which"
    # Warm-up (not recorded): first connections, page cache, and libtorrent's lazy set-up
    # (its first answers after start-up take seconds, longer with more torrents).
    taskset -c "$LOADGEN_CPU" "$L" --target "127.0.0.1:$PORT" --hashes "$DATA/hashes.txt" \
      --transport "$(transport "$which")" --connections "$CONNS" --duration "$WARMUP_S" --timeout 30 --threads 1 >/dev/null
    measure "$which" churn "$run"
    measure "$which" keepalive "$run"
    # magnetar's uTP counters after the run (admin address from its ready line).
    admin=$(grep -o 'admin=[^ ]*' "$OUT/server-$which.log" | head -1 | cut -d= -f2 || true)
    if [ -n "$admin" ] && [ "$admin" != off ]; then
      curl -s "http://$admin/metrics" | grep -E '^magnetar_utp_[a-z_]+_total ' \
        >"$OUT/metrics-$which-run$run.txt" || true
    fi
    stop_server
  done
done

$PY benches/summarize.py "$OUT"
