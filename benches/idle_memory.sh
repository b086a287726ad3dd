#!/usr/bin/env bash
# Memory per idle connection: RSS of `magnetar serve` (one worker, pinned to CPU 0) before
# and while N loadgen connections (pinned to CPU 1) sit idle after their handshakes.
# Reports (RSS delta) / N. RSS is user-space memory only; the kernel's socket memory is
# shown separately (sockstat "mem", pages, for all TCP sockets of both ends).
#
# Usage: benches/idle_memory.sh [N ...]   (default: 10000 50000; OUT=target/idle)
# Needs N + ~100 file descriptors in each process: sizes over `ulimit -Hn` are skipped.
# MAGNETAR_BIN=path measures another build (e.g. the one before a change) with the same
# loadgen; the default is this tree's release build. DRIVER=epoll measures the epoll path
# (default: auto, i.e. the io_uring path where the kernel has it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/idle}
SIZES=${*:-10000 50000}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p magnetar -p magnetar-loadgen
M=${MAGNETAR_BIN:-$PWD/target/release/magnetar} L=$PWD/target/release/magnetar-loadgen
[ -f "$OUT/data/done" ] || {
  rm -rf "$OUT/data"
  $L gen-store --count 1000 --data-dir "$OUT/data/store" --hashes "$OUT/data/hashes.txt"
  touch "$OUT/data/done"
}
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
tcp_mem_pages() { awk '/^TCP:/ { for (i = 1; i < NF; i++) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat; }
for n in $SIZES; do
  if [ $((n + 100)) -gt "$(ulimit -n)" ]; then
    echo "N=$n: skipped, needs $((n + 100)) fds per process; hard limit here is $(ulimit -Hn)"
    continue
  fi
  log=$OUT/serve-$n.log ready=$OUT/ready-$n
  rm -f "$ready"
  taskset -c 0 "$M" serve --data-dir "$OUT/data/store" --listen 127.0.0.1:0 --threads 1 --driver "${DRIVER:-auto}" \
    --connections-max 1000000 --connections-per-ip-max 1000000 >"$log" 2>&1 &
  pid=$!
  until grep -q '^ready ' "$log"; do sleep 0.1; done
  port=$(grep '^ready ' "$log" | sed -E 's/.*listen=[^ ]*:([0-9]+).*/\1/')
  sleep 0.5
  rss0=$(rss_kb $pid) mem0=$(tcp_mem_pages)
  taskset -c 1 "$L" --target "127.0.0.1:$port" --hashes "$OUT/data/hashes.txt" --mode idle \
    --connections "$n" --duration 60 --timeout 30 --ready-file "$ready" --json >"$OUT/loadgen-$n.json" &
  lg=$!
  for _ in $(seq 600); do [ -f "$ready" ] && break; sleep 0.1; done
  if [ ! -f "$ready" ]; then echo "N=$n: connections not all established in 60 s"; kill $lg $pid; continue; fi
  sleep 2
  rss1=$(rss_kb $pid) mem1=$(tcp_mem_pages) fds=$(ls /proc/$pid/fd | wc -l)
  awk -v n="$n" -v d="${DRIVER:-auto}" -v a="$rss0" -v b="$rss1" -v f="$fds" -v m0="$mem0" -v m1="$mem1" 'BEGIN {
    printf "N=%d driver=%s: server RSS %.1f MB -> %.1f MB: %.2f KiB per idle connection (user space); %d fds open; kernel TCP memory +%.1f MB (both ends)\n",
      n, d, a / 1024, b / 1024, (b - a) / n, f, (m1 - m0) * 4 / 1024 }' | tee -a "$OUT/results.txt"
  kill $lg 2>/dev/null || true; wait $lg 2>/dev/null || true
  kill $pid; wait $pid 2>/dev/null || true
done
