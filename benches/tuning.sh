#!/usr/bin/env bash
# What each tuning/ setting changes in the loadgen figures on this host: for each row, the
# churn load (connect, handshake, fetch every piece, close) against `magnetar serve
# --threads 1` pinned to CPU 0 with the loadgen on CPU 1, RUNS runs with the default and
# RUNS with the tuned value, interleaved. Prints a markdown table of medians.
#
#   benches/tuning.sh            # 3 runs of 8 s per variant
#   RUNS=5 DURATION=10 benches/tuning.sh
#
# Changes sysctls while it runs (root needed) and restores the values it found.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-8}
CONNS=${CONNS:-256}
OUT=${OUT:-target/tuning}
mkdir -p "$OUT"
cargo build --release -q -p magnetar -p magnetar-loadgen
M=target/release/magnetar
L=target/release/magnetar-loadgen
DATA=$OUT/data
if [ ! -f "$DATA/done" ]; then
  rm -rf "$DATA"; mkdir -p "$DATA"
  $L gen-store --count 200 --data-dir "$DATA/store" --hashes "$DATA/hashes.txt" >/dev/null
  touch "$DATA/done"
fi

KEYS="net.core.somaxconn net.ipv4.tcp_max_syn_backlog net.ipv4.tcp_tw_reuse net.core.rmem_default net.core.wmem_default net.ipv4.tcp_rmem net.ipv4.tcp_wmem"
declare -A SAVED
for k in $KEYS; do SAVED[$k]=$(sysctl -n "$k"); done
restore() { for k in $KEYS; do sysctl -qw "$k=${SAVED[$k]}" || true; done; }
trap 'restore; kill $SERVER 2>/dev/null || true' EXIT

SERVER=
start_server() { # extra flags...
  [ -n "$SERVER" ] && { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; }
  local port; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  taskset -c 0 $M serve --data-dir "$DATA/store" --listen "127.0.0.1:$port" --threads 1 --no-dht \
    --admin 127.0.0.1:0 --connections-per-ip-max 100000 --log warn "$@" > "$OUT/server.out" 2>&1 &
  SERVER=$!
  for _ in $(seq 100); do grep -q '^ready' "$OUT/server.out" 2>/dev/null && break; sleep 0.1; done
  PORT=$port
}

# one measured run -> "fetches_per_sec p99_us errors"
run() {
  taskset -c 1 $L --target "127.0.0.1:$PORT" --hashes "$DATA/hashes.txt" --mode churn \
    --connections "$CONNS" --duration "$DURATION" --threads 1 --json 2>/dev/null | tail -1 |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(int(r["fetches_per_sec"]), r["p99_us"], r["errors"])'
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# variant NAME SETUP -> medians over RUNS
declare -A RES
measure() { # label
  local f=() p=() e=()
  for _ in $(seq "$RUNS"); do
    read -r a b c < <(run); f+=("$a"); p+=("$b"); e+=("$c")
  done
  RES[$1]="$(printf '%s\n' "${f[@]}" | median) $(printf '%s\n' "${p[@]}" | median) $(printf '%s\n' "${e[@]}" | median)"
  echo "  $1: fetches/s p99_us errors = ${RES[$1]}" >&2
}

echo "== somaxconn + tcp_max_syn_backlog" >&2
sysctl -qw net.core.somaxconn=128 net.ipv4.tcp_max_syn_backlog=128; start_server; measure backlog_default
sysctl -qw net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535; start_server; measure backlog_tuned
restore
echo "== tcp_tw_reuse (loadgen side: the client reuses TIME_WAIT ports)" >&2
sysctl -qw net.ipv4.tcp_tw_reuse=0; start_server; measure twreuse_default
sysctl -qw net.ipv4.tcp_tw_reuse=1; start_server; measure twreuse_tuned
restore
echo "== socket buffer defaults" >&2
start_server; measure buffers_default
sysctl -qw net.core.rmem_default=262144 net.core.wmem_default=262144 \
  "net.ipv4.tcp_rmem=4096 87380 16777216" "net.ipv4.tcp_wmem=4096 65536 16777216"
start_server; measure buffers_tuned
restore
echo "== --pin-cores (server already on CPU 0 via taskset; here: no taskset, with and without --pin-cores)" >&2
start_pinned() { # flags
  [ -n "$SERVER" ] && { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; }
  local port; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  $M serve --data-dir "$DATA/store" --listen "127.0.0.1:$port" --threads 1 --no-dht --admin 127.0.0.1:0 \
    --connections-per-ip-max 100000 --log warn "$@" > "$OUT/server.out" 2>&1 &
  SERVER=$!
  for _ in $(seq 100); do grep -q '^ready' "$OUT/server.out" 2>/dev/null && break; sleep 0.1; done
  PORT=$port
}
start_pinned; measure pin_default
start_pinned --pin-cores; measure pin_tuned

row() { # title default tuned from to
  read -r f0 p0 e0 <<< "${RES[$2]}"; read -r f1 p1 e1 <<< "${RES[$3]}"
  printf '| %s | %s | %s → %s (%+.0f %%) | %s → %s µs | %s → %s |\n' "$1" "$4" "$f0" "$f1" \
    "$(awk -v a="$f0" -v b="$f1" 'BEGIN{print (a>0)?(b-a)*100/a:0}')" "$p0" "$p1" "$e0" "$e1"
}
echo
echo "| setting | default → tuned | full fetches/s (median of $RUNS) | p99 | errors |"
echo "|---|---|---|---|---|"
row "somaxconn + tcp_max_syn_backlog" backlog_default backlog_tuned "128 → 65535"
row "tcp_tw_reuse (loadgen side)" twreuse_default twreuse_tuned "0 → 1"
row "socket buffer defaults" buffers_default buffers_tuned "kernel defaults → 256 KiB / 16 MiB max"
row "--pin-cores (no taskset)" pin_default pin_tuned "off → on"
