#!/usr/bin/env bash
# End-to-end comparison, one command: the same K synthetic torrents served by
#   floor      benches/floor/floor.c: one epoll thread, precomputed bytes, no parsing
#   uring      magnetar serve --driver io-uring --threads 1
#   epoll      magnetar serve --driver epoll --threads 1
#   libtorrent python3-libtorrent serving them (benches/lt_seed.py, limits raised;
#              metadata-only, not seed mode: LT_SEED_MODE=seed measures the old way)
#   uring-utp       magnetar io_uring again, loaded over uTP (magnetar-loadgen --transport utp)
#   epoll-utp       magnetar epoll again, loaded over uTP
#   libtorrent-utp  the libtorrent seed again, loaded over uTP
#   floor-utp       benches/floor/floor_utp.c: the UDP floor (recvmmsg, GSO sendmmsg,
#                   precomputed answers, no congestion control), loaded over uTP
#   floor-cc-utp    the UDP floor with a congestion window (FLOOR_CWND=10: slow start from
#                   10 packets, as magnetar's default), to price congestion control alone
#   gso-utp         magnetar io_uring over uTP with --utp-gso on (UDP GSO reply bursts; the
#                   default since 2026-12-07, so the same as uring-utp unless changed)
#   nogso-utp       magnetar io_uring over uTP with --utp-gso off
#   base-utp        another magnetar binary over uTP, io_uring (BASE_M=path: the build
#                   before a change, for before/after in one run; BASE_ARGS=flags adds
#                   server flags, e.g. BASE_M=target/release/magnetar
#                   BASE_ARGS="--utp-initial-window-packets 2" for an A/B of one setting)
# each pinned to CPU 0, loaded by magnetar-loadgen pinned to CPU 1, at every concurrency of
# the sweep (-c, default "1 8 64 256": one client fetching alone up to saturation; a value
# the fd limit cannot hold is skipped), in churn mode (full fetches/s: connect, handshakes,
# all pieces, close; closed loop, so -c 1 is one client's fetch latency) and keepalive mode
# (blocks/s on open connections). A server is started once per run and swept over every
# concurrency (ascending in odd runs, descending in even ones); runs are interleaved (run 1
# of every server at every concurrency, then run 2, ...) so that noise from other users of
# the machine lands on all of them alike; before each measured run the script waits until
# the machine is quiet. Results: OUT/results.jsonl (one line per run and concurrency,
# field "connections"), OUT/summary.md (medians per concurrency, the io_uring goals with
# PASS/FAIL), OUT/compare.svg (p50 latency and fetches/s against concurrency).
#
# Usage: benches/compare.sh [-k K] [-d SECONDS] [-r RUNS] [-c "1 8 64 256"] [-o OUT]
#                           [-s "floor uring epoll libtorrent uring-utp epoll-utp libtorrent-utp"] [-q]
#   (also: -s floor-utp floor-cc-utp gso-utp base-utp, see above; base-utp needs BASE_M)
#   -c  the concurrencies (connections), a space-separated list; "64" is the old single point
#   -q  quick check: K=50, 2 s runs, 1 run, -c "1 8", no waiting for a quiet machine
#       (an explicit -k, -d, -r or -c still wins)
# Full sweep, defaults: K=1000, 10 s runs, 3 runs, -c "1 8 64 256", all seven rows
# (~40 min on a quiet 2-core machine: 3 runs x 7 rows x 4 concurrencies x 2 modes x
# (10 s + 2 s quiet check), plus warm-ups and start-ups; up to WAIT_MAX_S more when busy).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# bench_setup, busy, wait_quiet
source "$ROOT/benches/lib.sh"

K=1000 DURATION=10 RUNS=3 CONNS="1 8 64 256" OUT=target/compare QUICK=0
SERVERS="floor uring epoll libtorrent uring-utp epoll-utp libtorrent-utp"
SET=""
while getopts "k:d:r:c:o:s:q" opt; do
  case $opt in
    k) K=$OPTARG ;; d) DURATION=$OPTARG ;; r) RUNS=$OPTARG ;; c) CONNS=$OPTARG ;;
    o) OUT=$OPTARG ;; s) SERVERS=$OPTARG ;; q) QUICK=1 ;;
    *) sed -n '2,30p' "$0"; exit 2 ;;
  esac
  SET="$SET $opt"
done
if [ "$QUICK" = 1 ]; then
  case $SET in *k*) ;; *) K=50 ;; esac
  case $SET in *d*) ;; *) DURATION=2 ;; esac
  case $SET in *r*) ;; *) RUNS=1 ;; esac
  case $SET in *c*) ;; *) CONNS="1 8" ;; esac
fi
for c in $CONNS; do
  case $c in ''|*[!0-9]*|0) echo "-c: expected a list of positive integers, got \"$CONNS\""; exit 2 ;; esac
done
[ -n "${CONNS// }" ] || { echo "-c: empty list"; exit 2; }
# A machine busier than this (share of all CPUs, sampled over 2 s) is waited for, 60 s at a
# time, up to WAIT_MAX_S in total over the whole comparison; after that runs are measured
# anyway and flagged (busy_flagged in results.jsonl, counted in summary.md).
BUSY_MAX=${BUSY_MAX:-0.25}
WAIT_MAX_S=${WAIT_MAX_S:-1800}
WAITED_S=0
# Warm-up after a server starts, at the sweep's largest concurrency (not recorded), and a
# shorter one at each further concurrency before it is measured.
WARMUP_S=${WARMUP_S:-3}
STEP_WARMUP_S=${STEP_WARMUP_S:-1}
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
PY=/usr/bin/python3

bench_setup
cc -O2 -o "$OUT/floor" benches/floor/floor.c
cc -O2 -o "$OUT/floor_utp" benches/floor/floor_utp.c
$PY -c 'import libtorrent' 2>/dev/null || { echo "python3-libtorrent missing (bash scripts/test.sh installs it)"; exit 1; }

# The sweep: the concurrencies the fd limit (raised by bench_setup) can hold, sorted and
# deduplicated. The loadgen holds one fd per connection (TCP socket or uTP's UDP socket) and
# a server one per TCP connection; keep twice that plus some spare under the limit.
FD_LIMIT=$(ulimit -n)
SWEEP=""
for c in $(printf '%s\n' $CONNS | sort -n -u); do
  if [ "$FD_LIMIT" = unlimited ] || [ $((2 * c + 128)) -le "$FD_LIMIT" ]; then
    SWEEP="$SWEEP $c"
  else
    echo "== -c $c skipped: the fd limit ($FD_LIMIT) cannot hold it"
  fi
done
SWEEP=${SWEEP# }
[ -n "$SWEEP" ] || { echo "no concurrency of \"$CONNS\" fits the fd limit ($FD_LIMIT)"; exit 1; }
SWEEP_MAX=${SWEEP##* }
SWEEP_DOWN=$(printf '%s\n' $SWEEP | sort -n -r | xargs)

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
# start_server NAME: starts it and sets SERVER_PID and PORT; returns 1 (after showing its
# log) when it exits or prints no ready line within 60 s.
start_server() {
  local which=$1 log=$OUT/server-$1.log
  case $which in
    floor) taskset -c "$SERVER_CPU" "$OUT/floor" "$DATA/floor.bin" 127.0.0.1 0 >"$log" 2>&1 & ;;
    floor-utp) taskset -c "$SERVER_CPU" "$OUT/floor_utp" "$DATA/floor.bin" 127.0.0.1 0 >"$log" 2>&1 & ;;
    floor-cc-utp) FLOOR_CWND=10 taskset -c "$SERVER_CPU" "$OUT/floor_utp" "$DATA/floor.bin" 127.0.0.1 0 \
      >"$log" 2>&1 & ;;
    uring|epoll|uring-utp|epoll-utp|gso-utp|nogso-utp|base-utp)
      local driver=io-uring; case $which in epoll*) driver=epoll ;; esac
      local bin=$M extra=""
      [ "$which" = gso-utp ] && extra="--utp-gso on"
      [ "$which" = nogso-utp ] && extra="--utp-gso off"
      if [ "$which" = base-utp ]; then
        [ -x "${BASE_M:-}" ] || { echo "base-utp: set BASE_M to a magnetar binary"; return 1; }
        bin=$BASE_M extra=${BASE_ARGS:-}
      fi
      # shellcheck disable=SC2086 # $extra is empty or one flag and its value
      taskset -c "$SERVER_CPU" "$bin" serve $extra --data-dir "$DATA/store" --listen 127.0.0.1:0 \
        --threads 1 --driver "$driver" --connections-max 1000000 \
        --connections-per-ip-max 1000000 >"$log" 2>&1 & ;;
    libtorrent|libtorrent-utp)
      local port=$((20000 + RANDOM % 20000))
      # Seed mode without the content keeps libtorrent busy for minutes before it answers
      # (BENCHMARKS.md "Scale"); metadata-only serves the same metadata at once.
      LT_SEED_MODE=${LT_SEED_MODE:-metadata-only} taskset -c "$SERVER_CPU" $PY benches/lt_seed.py \
        "$DATA/torrents" 127.0.0.1 "$port" >"$log" 2>&1 & ;;
    *) echo "unknown server $which (-s takes: floor uring epoll libtorrent uring-utp epoll-utp libtorrent-utp floor-utp floor-cc-utp gso-utp nogso-utp base-utp)"
       return 1 ;;
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
  echo "server $which did not start:"; cat "$log"
  return 1
}

# A server is "ready" when it answers: libtorrent prints its port long before it has
# added a thousand torrents, so fetch the last-added hashes until they all succeed
# (bounded: READY_MAX_S, default 300 s), before the warm-up and the measured runs.
wait_serving() {
  local which=$1 deadline=$(( $(date +%s) + ${READY_MAX_S:-300} ))
  tail -n 8 "$DATA/hashes.txt" > "$DATA/probe.txt"
  while [ "$(date +%s)" -lt "$deadline" ]; do
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "   $which exited before it answered"; return 1; }
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
  [ -n "$SERVER_PID" ] || return 0
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}
trap stop_server EXIT

# warm_up SERVER CONNECTIONS SECONDS: load that is not recorded.
warm_up() {
  [ "$3" != 0 ] || return 0
  taskset -c "$LOADGEN_CPU" "$L" --target "127.0.0.1:$PORT" --hashes "$DATA/hashes.txt" \
    --transport "$(transport "$1")" --connections "$2" --duration "$3" --timeout 30 --threads 1 \
    >/dev/null 2>&1 || true
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kb() { awk '/^VmHWM/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
TCK=$(getconf CLK_TCK)
# Datagrams the kernel dropped on the server's UDP sockets at $PORT (receive buffer full):
# the drops column of /proc/net/udp{,6}. uTP rows only; 0 for TCP.
udp_drops() {
  awk -v p="$(printf '%04X' "$PORT")" 'FNR > 1 { split($2, a, ":"); if (a[2] == p) s += $NF }
       END { print s + 0 }' /proc/net/udp /proc/net/udp6 2>/dev/null
}

# measure SERVER MODE RUN CONNECTIONS: one loadgen run; appends a JSON line to
# results.jsonl. A server that is gone, or a loadgen that prints no result, leaves no line
# (summarize.py shows n/a) and the sweep goes on.
measure() {
  local which=$1 mode=$2 run=$3 conns=$4 flagged=0
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "   $which $mode c=$conns run $run: server gone, not measured"; return 0
  fi
  BUSY_LAST=""
  wait_quiet || flagged=1
  # wait_quiet's own sample, just taken (quick mode takes none: sample here).
  local load busy_at; load=$(cut -d' ' -f1 /proc/loadavg); busy_at=${BUSY_LAST:-$(busy)}
  local t0 c0 out
  local d0; d0=$(udp_drops)
  t0=$(date +%s.%N); c0=$(cpu_ticks "$SERVER_PID")
  out=$(taskset -c "$LOADGEN_CPU" "$L" --target "127.0.0.1:$PORT" --hashes "$DATA/hashes.txt" \
        --mode "$mode" --transport "$(transport "$which")" --connections "$conns" --duration "$DURATION" --threads 1 --json \
        --plot "$OUT/plot-$which-$mode-c$conns-$run.svg" 2>"$OUT/loadgen.err" | tail -1) || true
  local c1 t1; c1=$(cpu_ticks "$SERVER_PID"); t1=$(date +%s.%N)
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "   $which $mode c=$conns run $run: server exited during the run, not recorded"; return 0
  fi
  local cpu; cpu=$(awk -v a="$c0" -v b="$c1" -v s="$t0" -v e="$t1" -v t="$TCK" \
                   'BEGIN { printf "%.3f", (b - a) / t / (e - s) }')
  local rss hwm; rss=$(rss_kb "$SERVER_PID"); hwm=$(hwm_kb "$SERVER_PID")
  local drops; drops=$(( $(udp_drops) - d0 ))
  local line
  if ! line=$(echo "$out" | $PY -c "
import json, sys
r = json.load(sys.stdin)
r.update(server='$which', run=$run, connections=$conns, server_cpu=$cpu, server_udp_drops=$drops,
         server_rss_kb=${rss:-0}, server_hwm_kb=${hwm:-0}, loadavg1=$load, busy=$busy_at,
         busy_flagged=bool($flagged), k=$K, duration_s=$DURATION)
print(json.dumps(r, sort_keys=True))" 2>/dev/null); then
    echo "   $which $mode c=$conns run $run: no result from the loadgen: $(tail -c 300 "$OUT/loadgen.err" | tr '\n' ' ')"
    return 0
  fi
  echo "$line" >>"$OUT/results.jsonl"
  echo "$line" | $PY -c "
import json, sys
r = json.load(sys.stdin)
print('   %-14s %-9s c=%-4d run %d: %9.0f fetches/s %9.0f blocks/s  p50 %6d us  p99 %6d us  cpu %.2f  rss %d MB  errors %d' % (
    r['server'], r['mode'], r['connections'], r['run'], r['fetches_per_sec'], r['blocks_per_sec'],
    r['p50_us'], r['p99_us'], r['server_cpu'], r['server_rss_kb'] // 1024, r['errors'])
    + ('  udp drops %d' % r['server_udp_drops'] if r['server_udp_drops'] else ''))"
}

: >"$OUT/results.jsonl"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs"
  echo "libtorrent: $($PY -c 'import libtorrent; print(libtorrent.__version__)')"
  echo "k=$K duration=${DURATION}s runs=$RUNS connections=$SWEEP server_cpu=$SERVER_CPU loadgen_cpu=$LOADGEN_CPU fd_limit=$FD_LIMIT"
  echo "servers: $SERVERS"
  echo "sweep: $SWEEP"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt"

for run in $(seq "$RUNS"); do
  # Odd runs sweep up, even runs down: a concurrency is not always measured right after the
  # same neighbour (TIME_WAIT sockets, a server's grown tables).
  order=$SWEEP; [ $((run % 2)) = 0 ] && order=$SWEEP_DOWN
  for which in $SERVERS; do
    echo "== run $run: $which (c = $order)"
    if ! start_server "$which"; then
      echo "   $which skipped in run $run"; stop_server; continue
    fi
    if ! wait_serving "$which"; then
      echo "   $which skipped in run $run"; stop_server; continue
    fi
    # Warm-up (not recorded): first connections, page cache, libtorrent's lazy set-up (its
    # first answers after start-up take seconds, longer with more torrents), and the most
    # connections the sweep will hold, so that no measured run pays for a server's growth.
    warm_up "$which" "$SWEEP_MAX" "$WARMUP_S"
    prev=$SWEEP_MAX
    for conns in $order; do
      [ "$conns" = "$prev" ] || warm_up "$which" "$conns" "$STEP_WARMUP_S"
      prev=$conns
      measure "$which" churn "$run" "$conns"
      measure "$which" keepalive "$run" "$conns"
    done
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
