#!/usr/bin/env bash
# The public HTTP listener (`serve --http`) against nginx serving the same .torrent file
# from disk with sendfile, same run: wrk at 1, 64 and 256 connections, keep-alive and
# `Connection: close`, ROUNDS interleaved rounds; requests/s, p50, p99 and server CPU per
# request (utime+stime of the server's processes / requests). Both servers have one
# worker pinned to CPU 0, wrk runs pinned to CPU 1. Needs: wrk, nginx, time (Debian),
# python3. wrk's own CPU share is recorded too: a cell where wrk uses its whole CPU
# (keep-alive at 64 and 256 here: it copies ~2.5 GB/s of answers) measures the client, and
# there only CPU per request compares the servers.
#
#   flock /work/bench.lock bash benches/http_nginx.sh [OUT_DIR]
#
# Env: ROUNDS (3), SECONDS_PER_RUN (5), PIECES (2000: a 40 KiB info dict, the size of a
# typical torrent's; the .torrent is ~40 KiB), MAGNETAR (the binary; target/release's by
# default), BEFORE (optional: a baseline binary, e.g. main's, served the same way and
# measured in the same rounds as server "before"), MAGNETAR_DRIVER (passed to both
# magnetar servers: epoll measures the fallback driver), BEFORE_ENV (optional: VAR=value
# words set for the BEFORE server only, e.g. to measure a variant of the same binary),
# DRIVERS (optional, e.g. "io-uring epoll": one whole run per driver, one after the
# other, into OUT_DIR/<driver>; each sets MAGNETAR_DRIVER for both magnetar servers),
# PERF_CELL (optional, e.g. "close 1": profile each server over that one cell instead),
# CELLS (optional, e.g. "keepalive:1 close:1": measure only these cells, for a focused
# A/B; the default is all six).
#
# The full comparison, both drivers, in one command:
#   flock /work/bench.lock env ROUNDS=5 DRIVERS="io-uring epoll" bash benches/http_nginx.sh DIR
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/benches/results/http-nginx}
if [ -n "${DRIVERS:-}" ]; then
  for driver in $DRIVERS; do
    DRIVERS= MAGNETAR_DRIVER=$driver bash "$0" "$OUT/$driver"
  done
  exit 0
fi
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-5}
PIECES=${PIECES:-2000}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ulimit -n "$(ulimit -Hn)"
M=${MAGNETAR:-$ROOT/target/release/magnetar}
[ -x "$M" ] || cargo build --release -q --bin magnetar
B=${BEFORE:-}
W=$(mktemp -d /tmp/http-nginx.XXXXXX)
chmod 755 "$W"
cleanup() {
  [ -n "${MPID:-}" ] && kill "$MPID" 2>/dev/null || true
  [ -n "${BPID:-}" ] && kill "$BPID" 2>/dev/null || true
  [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$W"
}
trap cleanup EXIT

# A v1 info dict of PIECES pieces, as a .torrent, imported.
python3 - "$W/in.torrent" "$PIECES" <<'EOF'
import sys, hashlib
path, pieces = sys.argv[1], int(sys.argv[2])
ph = b"".join(hashlib.sha1(i.to_bytes(4, "big")).digest() for i in range(pieces))
info = b"d6:lengthi%de4:name9:bench.bin12:piece lengthi16384e6:pieces%d:" % (pieces * 16384, len(ph)) + ph + b"e"
open(path, "wb").write(b"d4:info" + info + b"e")
EOF
mkdir -p "$W/torrents" && mv "$W/in.torrent" "$W/torrents/"
"$M" --log error import --data-dir "$W/data" "$W/torrents" >/dev/null
HEX=$(python3 -c "
import sys,hashlib
d=open('$W/torrents/in.torrent','rb').read()
print(hashlib.sha1(d[7:-1]).hexdigest().upper())")

MPORT=18380; NPORT=18381
# A server left on these ports would take part of the connections (SO_REUSEPORT) and
# falsify both servers' numbers: refuse to run.
for port in $MPORT $NPORT 18382; do
  if [ -n "$(ss -Hltn "sport = :$port")" ]; then
    echo "port $port is in use (a stale server?): not measuring"; exit 1
  fi
done
# Every server in a session of its own, as nginx's daemon is (`daemon on` calls setsid):
# with autogroup scheduling (kernel.sched_autogroup_enabled, on by default) a session is
# a task group, and a server left in this script's session shares one group with wrk,
# whose busy CPU 1 takes most of the group's weight, so on CPU 0 the server got a
# fraction of nginx's share against any other load (a compile): fewer req/s and
# scheduler-sized p99s at the same CPU per request. setsid execs (a background job of a
# script is no group leader), so $! is still the server.
setsid taskset -c 0 "$M" --log error serve --data-dir "$W/data" --listen 127.0.0.1:0 --utp off \
  --admin off --no-dht --threads 1 --http "127.0.0.1:$MPORT" \
  --connections-per-ip-max 100000 > "$W/magnetar.out" &
MPID=$!
for _ in $(seq 100); do grep -q '^ready' "$W/magnetar.out" && break; sleep 0.1; done
grep -q '^ready' "$W/magnetar.out" || { echo "magnetar did not start"; exit 1; }

SERVERS="magnetar nginx"
if [ -n "$B" ]; then
  BPORT=18382
  "$B" --log error import --data-dir "$W/data-before" "$W/torrents" >/dev/null
  # shellcheck disable=SC2086
  setsid env ${BEFORE_ENV:-} taskset -c 0 "$B" --log error serve --data-dir "$W/data-before" --listen 127.0.0.1:0 \
    --utp off --admin off --no-dht --threads 1 --http "127.0.0.1:$BPORT" \
    --connections-per-ip-max 100000 > "$W/before.out" &
  BPID=$!
  for _ in $(seq 100); do grep -q '^ready' "$W/before.out" && break; sleep 0.1; done
  grep -q '^ready' "$W/before.out" || { echo "the BEFORE magnetar did not start"; exit 1; }
  SERVERS="magnetar before nginx"
fi

mkdir -p "$W/www/torrent"
curl -sf "http://127.0.0.1:$MPORT/torrent/$HEX.torrent" -o "$W/www/torrent/$HEX.torrent"
chmod -R a+rX "$W/www"
cat > "$W/nginx.conf" <<EOF
worker_processes 1;
daemon on;
pid $W/nginx.pid;
error_log $W/error.log;
events { worker_connections 8192; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 1000000;
  open_file_cache max=100;
  client_body_temp_path $W/tmp; proxy_temp_path $W/tmp; fastcgi_temp_path $W/tmp;
  uwsgi_temp_path $W/tmp; scgi_temp_path $W/tmp;
  types { application/x-bittorrent torrent; }
  server {
    listen 127.0.0.1:$NPORT;
    root $W/www;
    add_header Access-Control-Allow-Origin * always;
    add_header Cache-Control "public, max-age=86400";
  }
}
EOF
mkdir -p "$W/tmp"
taskset -c 0 nginx -c "$W/nginx.conf" -p "$W"
sleep 0.3
NPID=$(cat "$W/nginx.pid")
cmp <(curl -sf "http://127.0.0.1:$NPORT/torrent/$HEX.torrent") "$W/www/torrent/$HEX.torrent"

# utime+stime ticks of a process and its children (nginx: master + worker).
ticks() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$(( total + $(awk '{print $14 + $15}' "/proc/$p/stat") ))
  done
  echo "$total"
}

# PERF_CELL="MODE CONNS" (e.g. "close 1"): no rounds; instead each server is profiled
# (`perf record -g`, 4 kHz) over one wrk run of that cell, and OUT/perf-SERVER.txt gets the
# server's CPU per request by DSO and its top symbols (µs per request).
if [ -n "${PERF_CELL:-}" ]; then
  read -r mode conns <<< "$PERF_CELL"
  for server in $SERVERS; do
    case $server in
      magnetar) port=$MPORT; pid=$MPID ;;
      before) port=$BPORT; pid=$BPID ;;
      *) port=$NPORT; pid=$(pgrep -P "$NPID" | tail -1) ;;
    esac
    hdr=(); [ "$mode" = close ] && hdr=(-H "Connection: close")
    perf record -F 4000 -g -p "$pid" -o "$W/perf-$server.data" -- sleep "$SECS" > /dev/null 2>&1 &
    pp=$!
    out=$(taskset -c 1 wrk -t1 -c"$conns" -d"${SECS}s" --latency "${hdr[@]}" \
      "http://127.0.0.1:$port/torrent/$HEX.torrent")
    wait $pp
    reqs=$(echo "$out" | sed -nE 's/^ *([0-9]+) requests in.*/\1/p')
    {
      echo "$server $PERF_CELL: $reqs requests in ${SECS} s (1 sample = 250 us)"
      perf report -i "$W/perf-$server.data" --no-children --sort dso --stdio -n 2>/dev/null \
        | awk -v r="$reqs" '/^ +[0-9]/ { printf "  %7.2f us/req  %s\n", $2 * 250 / r, $3 }'
      perf report -i "$W/perf-$server.data" --no-children --sort sym --stdio -n 2>/dev/null \
        | awk -v r="$reqs" '/^ +[0-9]/ && k++ < 40 { $1 = ""; n = $2; $2 = ""; printf "  %7.2f us/req %s\n", n * 250 / r, $0 }'
    } > "$OUT/perf-$server.txt"
    sed -n '1,8p' "$OUT/perf-$server.txt"
  done
  exit 0
fi

RES=$OUT/runs.tsv
echo "start $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg) driver ${MAGNETAR_DRIVER:-default} before_env ${BEFORE_ENV:-none}" > "$OUT/load.txt"
for p in $MPID ${BPID:-} $(pgrep -P "$NPID") $$; do
  echo "autogroup $(cat "/proc/$p/comm") $(cat "/proc/$p/autogroup" 2>/dev/null)" >> "$OUT/load.txt"
done
echo -e "round\tserver\tmode\tconns\treq_per_s\tp50_ms\tp99_ms\tcpu_us_per_req\twrk_cpu" > "$RES"
HZ=$(getconf CLK_TCK)
for round in $(seq "$ROUNDS"); do
  for conns in 1 64 256; do
    for mode in keepalive close; do
      case " ${CELLS:-$mode:$conns} " in *" $mode:$conns "*) ;; *) continue ;; esac
      for server in $SERVERS; do
        case $server in
          magnetar) port=$MPORT; pid=$MPID ;;
          before) port=$BPORT; pid=$BPID ;;
          *) port=$NPORT; pid=$NPID ;;
        esac
        hdr=(); [ $mode = close ] && hdr=(-H "Connection: close")
        before=$(ticks "$pid")
        out=$(/usr/bin/time -f "%U %S" -o "$W/wrk.time" taskset -c 1 wrk -t1 -c"$conns" \
          -d"${SECS}s" --latency "${hdr[@]}" "http://127.0.0.1:$port/torrent/$HEX.torrent")
        after=$(ticks "$pid")
        python3 - "$round" "$server" "$mode" "$conns" "$((after - before))" "$HZ" "$out" \
          "$(cat "$W/wrk.time")" "$SECS" >> "$RES" <<'EOF'
import re, sys
rnd, server, mode, conns, dt, hz, out, wrk_time, secs = sys.argv[1:]
def ms(tag):
    m = re.search(r"^\s*%s\s+([\d.]+)(us|ms|s)\s*$" % re.escape(tag), out, re.M)
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v * 1000 if u == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
reqs = int(re.search(r"(\d+) requests in", out).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
assert not errs, f"{server}: non-2xx answers: {errs.group(1)}"
cpu_us = int(dt) / int(hz) * 1e6 / max(reqs, 1)
wrk_cpu = sum(float(x) for x in wrk_time.split()) / float(secs)
print(f"{rnd}\t{server}\t{mode}\t{conns}\t{rps:.0f}\t{ms('50%'):.3f}\t{ms('99%'):.3f}\t{cpu_us:.1f}\t{wrk_cpu:.2f}")
EOF
        tail -1 "$RES"
      done
    done
  done
done

python3 - "$RES" > "$OUT/summary.md" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = lambda k, f: statistics.median(float(r[f]) for r in rows if (r["server"], r["mode"], r["conns"]) == k)
before = any(r["server"] == "before" for r in rows)
print("| mode | conns | magnetar req/s | nginx req/s | ratio | magnetar p50/p99 ms | nginx p50/p99 ms | magnetar CPU µs/req | nginx CPU µs/req | CPU ratio |"
      + (" before req/s | before ratio | before p50/p99 ms | before CPU µs/req | before CPU ratio |" if before else ""))
print("|---" * (10 + 5 * before) + "|")
for mode in ("keepalive", "close"):
    for conns in ("1", "64", "256"):
        m, n, b = ("magnetar", mode, conns), ("nginx", mode, conns), ("before", mode, conns)
        if not any((r["server"], r["mode"], r["conns"]) == m for r in rows):
            continue  # a cell left out by CELLS
        line = (f"| {mode} | {conns} | {med(m,'req_per_s'):.0f} | {med(n,'req_per_s'):.0f} | {med(m,'req_per_s')/med(n,'req_per_s'):.2f} "
                f"| {med(m,'p50_ms'):.3f} / {med(m,'p99_ms'):.3f} | {med(n,'p50_ms'):.3f} / {med(n,'p99_ms'):.3f} "
                f"| {med(m,'cpu_us_per_req'):.1f} | {med(n,'cpu_us_per_req'):.1f} | {med(m,'cpu_us_per_req')/med(n,'cpu_us_per_req'):.2f} |")
        if before:
            line += (f" {med(b,'req_per_s'):.0f} | {med(b,'req_per_s')/med(n,'req_per_s'):.2f} "
                     f"| {med(b,'p50_ms'):.3f} / {med(b,'p99_ms'):.3f} | {med(b,'cpu_us_per_req'):.1f} "
                     f"| {med(b,'cpu_us_per_req')/med(n,'cpu_us_per_req'):.2f} |")
        print(line)
import collections
# Paired ratios: each round measures magnetar and nginx back to back in the same cell, so a
# ratio per round cancels what moved between rounds (load on the machine); the median of
# those is the comparison least moved by the noise. Beside the ratio of medians above.
by = collections.defaultdict(dict)
for r in rows:
    by[(r["mode"], r["conns"], r["round"])][r["server"]] = r
print()
print("Paired: the median over rounds of magnetar / nginx in the same round (rounds where magnetar does at least as well).")
print()
print("| mode | conns | req/s | CPU per request | p99 | wrk's CPU share, magnetar / nginx runs |")
print("|---|---|---|---|---|---|")
for mode in ("keepalive", "close"):
    for conns in ("1", "64", "256"):
        rs = [v for k, v in by.items() if k[:2] == (mode, conns) and "magnetar" in v and "nginx" in v]
        if not rs:
            continue
        def cell(f, better):
            ratios = [float(r["magnetar"][f]) / float(r["nginx"][f]) for r in rs]
            wins = sum((x >= 1) if better == "higher" else (x <= 1) for x in ratios)
            return f"{statistics.median(ratios):.2f} ({wins}/{len(rs)})"
        wrk = lambda srv: statistics.median(float(r[srv]["wrk_cpu"]) for r in rs)
        print(f"| {mode} | {conns} | {cell('req_per_s', 'higher')} | {cell('cpu_us_per_req', 'lower')} | {cell('p99_ms', 'lower')} "
              f"| {wrk('magnetar'):.2f} / {wrk('nginx'):.2f} |")
EOF
echo "end $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/load.txt"
cat "$OUT/load.txt" "$OUT/summary.md"
