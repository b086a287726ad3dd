#!/usr/bin/env bash
# Scale, one command: how long a server takes from process start to serving K torrents'
# metadata, how much memory it then holds, and the churn rate it sustains over all K, for
#   magnetar             magnetar serve --threads 1 over a store of K records
#   libtorrent           python3-libtorrent (benches/lt_seed.py, LT_SEED_MODE=metadata-only):
#                        K .torrent files added without seed mode (content absent)
#   libtorrent-seedmode  benches/lt_seed.py as benches/compare.sh runs it (seed mode,
#                        content absent): reproduces its slow start; not in the default set
#   magnetar-cold        magnetar after `sync; echo 3 > /proc/sys/vm/drop_caches` (a cold
#                        restart; root), not in the default set
#   magnetar-cgroup      magnetar-cold with the server in a CGROUP_MB memory cgroup (v1;
#                        root), not in the default set
# at each K of -k (synthetic v1 dicts from magnetar-loadgen gen-store, -z bytes each).
# Each server is pinned to CPU 0 (SERVER_CPU), the probe and magnetar-loadgen to CPU 1
# (LOADGEN_CPU). Per run (benches/scale_run.py), times from just before the server is spawned:
#   ready     its "ready" line (magnetar: store recovered, every record re-verified, and
#             listening; lt_seed.py: all K torrents added and listening)
#   serving   the last of a random sample of S = min(K, 1000) hashes answered a full BEP 9
#             fetch with the right SHA-1 (probe from t0 on, hashes not answered yet only)
#   RSS       VmRSS (and RssAnon) when all S had answered
#   churn     magnetar-loadgen --mode churn over all K hashes, 64 connections, -d seconds
# Each run is bounded by -t seconds (and by RSS_MAX_MB of private memory): a run that does
# not get there records how far it got (hashes answered, torrents added, when), is not
# repeated, and the server is not tried at larger K. A run that took over REPEAT_MAX_S to
# serve is not repeated either. Runs are interleaved (run 1 of every server, run 2, ...)
# and each waits for a quiet machine (as benches/compare.sh). Results: OUT/results.jsonl
# (one line per run or skip), OUT/data.jsonl (disk and generation time per K),
# OUT/summary.md (medians), OUT/scale.svg (time to serving and RSS vs K, log scales).
#
# Usage: benches/scale.sh [-k "1000 10000 100000 1000000"] [-t SECONDS] [-r RUNS] [-d SECONDS]
#                         [-z BYTES] [-s "magnetar libtorrent libtorrent-seedmode"] [-o OUT] [-q]
#   -k  torrent counts K (default "1000 10000 100000 1000000")
#   -t  bound per run, seconds (default 300)
#   -r  runs per server and K (default 3; medians reported)
#   -d  churn run length, seconds (default 5; after a 2 s warm-up)
#   -z  info dict size in bytes (default 8192: one BEP 9 piece; 1M of them is an 8 GB store)
#   -s  servers (default "magnetar libtorrent"; also magnetar-cold, magnetar-cgroup,
#       libtorrent-seedmode)
#   -o  output directory (default target/scale)
#   -q  quick check: K=1000, 1 run, 2 s churn, 60 s bound, no waiting for a quiet machine
# Environment: RSS_MAX_MB (6144), REPEAT_MAX_S (120), BUSY_MAX (0.25), WAIT_MAX_S (900),
# SERVER_CPU (0), LOADGEN_CPU (1), KEEP_DATA (0: data of K >= 100000 is deleted after use),
# CGROUP_MB (1024: the magnetar-cgroup limit).
# The 10M/30M store run of BENCHMARKS.md ("Store at 10M and 30M records"):
#   benches/scale.sh -k "1000 1000000 10000000 30000000" -z 300 -r 3 -t 600 \
#     -s "magnetar magnetar-cold magnetar-cgroup"
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# bench_setup, busy, wait_quiet
source "$ROOT/benches/lib.sh"

KS="1000 10000 100000 1000000" BOUND=300 RUNS=3 CHURN_S=5 SIZE=8192 OUT=target/scale QUICK=0
SERVERS="magnetar libtorrent"
usage() { sed -n '2,46p' "$0"; exit 2; }
while getopts "k:t:r:d:z:s:o:qh" opt; do
  case $opt in
    k) KS=$OPTARG ;; t) BOUND=$OPTARG ;; r) RUNS=$OPTARG ;; d) CHURN_S=$OPTARG ;;
    z) SIZE=$OPTARG ;; s) SERVERS=$OPTARG ;; o) OUT=$OPTARG ;; q) QUICK=1 ;;
    *) usage ;;
  esac
done
[ "$#" -ge "$OPTIND" ] && usage
if [ "$QUICK" = 1 ]; then KS=1000 RUNS=1 CHURN_S=2 BOUND=60; fi
for s in $SERVERS; do
  case $s in magnetar|magnetar-cold|magnetar-cgroup|libtorrent|libtorrent-seedmode) ;;
    *) echo "unknown server $s"; usage ;; esac
done
for n in $KS $BOUND $RUNS $SIZE; do
  if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then echo "not a positive integer: $n"; usage; fi
done
if ! [[ $CHURN_S =~ ^[0-9]+(\.[0-9]+)?$ ]]; then echo "bad -d: $CHURN_S"; usage; fi

RSS_MAX_MB=${RSS_MAX_MB:-6144}
REPEAT_MAX_S=${REPEAT_MAX_S:-120}
BUSY_MAX=${BUSY_MAX:-0.25}
WAIT_MAX_S=${WAIT_MAX_S:-900}
WAITED_S=0
SERVER_CPU=${SERVER_CPU:-0}
LOADGEN_CPU=${LOADGEN_CPU:-1}
KEEP_DATA=${KEEP_DATA:-0}
CGROUP_MB=${CGROUP_MB:-1024}
PY=/usr/bin/python3
STARTED=$(date +%s)

bench_setup
case " $SERVERS " in *" libtorrent"*)
  $PY -c 'import libtorrent' 2>/dev/null ||
    { echo "python3-libtorrent missing (bash scripts/test.sh installs it)"; exit 1; } ;;
esac


# Free bytes on the file system of OUT.
free_bytes() { df -PB1 "$OUT" | awk 'NR == 2 { print $4 }'; }
# Disk margin left for everyone else after our data (bytes).
DISK_MARGIN=$(( ${DISK_MARGIN_GB:-10} * 1000000000 ))

# gen K WHAT: generates, once, the store (WHAT=store) or the .torrent files (WHAT=torrents)
# of K dicts in $OUT/data-kK, plus hashes.txt and sample.txt. Returns 1 (and sets
# GEN_REASON) when the disk is too small. The same (seed, size, index) gives the same dict,
# so a store and .torrent files generated apart hold the same torrents (checked).
GEN_REASON=""
gen() {
  local k=$1 what=$2 d=$OUT/data-k$1
  [ -f "$d/$what.done" ] && return 0
  mkdir -p "$d"
  local need=$(( k * (SIZE + 200) )) free; free=$(free_bytes)
  if [ $(( need + DISK_MARGIN )) -gt "$free" ]; then
    GEN_REASON="not attempted: $what of K=$k needs ~$((need / 1000000)) MB of disk, $((free / 1000000)) MB free (margin ${DISK_MARGIN_GB:-10} GB)"
    return 1
  fi
  echo "== generating $what: $k dicts of $SIZE bytes in $d"
  rm -rf "${d:?}/$what"
  local t0 t1 flag=(--data-dir "$d/store")
  [ "$what" = torrents ] && flag=(--torrents "$d/torrents")
  t0=$(date +%s.%N)
  $L gen-store --count "$k" --size "$SIZE" "${flag[@]}" --hashes "$d/hashes-$what.txt"
  t1=$(date +%s.%N)
  if [ -f "$d/hashes.txt" ]; then
    cmp -s "$d/hashes.txt" "$d/hashes-$what.txt" || { echo "hash lists differ in $d"; exit 1; }
    rm "$d/hashes-$what.txt"
  else
    mv "$d/hashes-$what.txt" "$d/hashes.txt"
    $PY -c "
import random, sys
h = open('$d/hashes.txt').read().split()
print('\n'.join(random.Random($k).sample(h, min($k, 1000))))" >"$d/sample.txt"
  fi
  local bytes; bytes=$(du -sb "$d/$what" | cut -f1)
  echo "{\"k\": $k, \"what\": \"$what\", \"bytes\": $bytes, \"files\": $(find "$d/$what" -type f | wc -l), \"gen_s\": $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'), \"size\": $SIZE}" >>"$OUT/data.jsonl"
  touch "$d/$what.done"
}

data_of() { case $1 in magnetar*) echo store ;; *) echo torrents ;; esac; }

# skip SERVER K REASON: a results line for a run not made.
skip() {
  echo "   $1 K=$2: $3"
  $PY -c 'import json, sys; print(json.dumps({"server": sys.argv[1], "k": int(sys.argv[2]), "skipped": sys.argv[3]}))' \
    "$1" "$2" "$3" >>"$OUT/results.jsonl"
}

: >"$OUT/results.jsonl"
: >"$OUT/data.jsonl"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo ?)"
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.1f GB", $2 / 1e6 }' /proc/meminfo) RAM"
  case " $SERVERS " in *" libtorrent"*) echo "libtorrent: $($PY -c 'import libtorrent; print(libtorrent.__version__)')" ;; esac
  echo "cgroup_mb=$CGROUP_MB k=\"$KS\" size=$SIZE bound=${BOUND}s runs=$RUNS churn=${CHURN_S}s servers=\"$SERVERS\" server_cpu=$SERVER_CPU loadgen_cpu=$LOADGEN_CPU rss_max_mb=$RSS_MAX_MB repeat_max_s=$REPEAT_MAX_S wait_max_s=$WAIT_MAX_S busy_max=$BUSY_MAX quick=$QUICK"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt"

# Why a server is no longer tried (set when one of its runs did not get to serving).
declare -A GAVE_UP=()
for k in $KS; do
  echo "== K=$k"
  active=()
  for s in $SERVERS; do
    if [ -n "${GAVE_UP[$s]:-}" ]; then skip "$s" "$k" "${GAVE_UP[$s]}"; continue; fi
    if ! gen "$k" "$(data_of "$s")"; then skip "$s" "$k" "$GEN_REASON"; continue; fi
    active+=("$s")
  done
  declare -A FINISHED=()
  for run in $(seq "$RUNS"); do
    for s in "${active[@]}"; do
      [ -n "${FINISHED[$s]:-}" ] && continue
      flagged=0
      wait_quiet || flagged=1
      load=$(cut -d' ' -f1 /proc/loadavg); busy_at=$(busy)
      line=$(taskset -c "$LOADGEN_CPU" $PY benches/scale_run.py --server "$s" --k "$k" --run "$run" \
        --data "$OUT/data-k$k" --bound "$BOUND" --server-cpu "$SERVER_CPU" --churn-s "$CHURN_S" \
        --magnetar "$M" --loadgen "$L" --rss-max-mb "$RSS_MAX_MB" --cgroup-mb "$CGROUP_MB" --log "$OUT/server-$s-k$k-run$run.log")
      line=$(echo "$line" | $PY -c "
import json, sys
r = json.load(sys.stdin)
r.update(loadavg1=$load, busy=$busy_at, busy_flagged=bool($flagged), size=$SIZE)
print(json.dumps(r, sort_keys=True))")
      echo "$line" >>"$OUT/results.jsonl"
      verdict=$(echo "$line" | $PY -c "
import json, sys
r = json.load(sys.stdin)
f = lambda v, fmt: (fmt % v) if v is not None else '-'
mb = lambda kb: f(kb and kb / 1024, '%.0f MB')
if r['served_all']:
    print('ok   run %d: ready %s, serving %s, RSS %s (anon %s), churn %s fetches/s (%s errors)' % (
        r['run'], f(r['ready_s'], '%.2f s'), f(r['serving_s'], '%.2f s'), mb(r['rss_kb']),
        mb(r['rss_anon_kb']), f(r.get('churn_fetches_per_sec'), '%.0f'), r.get('churn_errors', '-')))
    print('slow' if r['serving_s'] > $REPEAT_MAX_S else 'fast')
else:
    why = ('private memory over %d MB at %.0f s' % (r['rss_max_mb'], r['stopped_rss_over_max_at_s'])
           if r.get('stopped_rss_over_max_at_s') is not None
           else 'exited (code %s)' % r.get('server_exit_code') if r['server_exited']
           else 'not serving after %.0f s' % r['stopped_at_s'])
    print('FAIL run %d: %s (%d of %d answered, %s torrents added, %s queued by lt_seed.py; RSS %s)' % (
        r['run'], why, r['answered'], r['sample'], r['torrents_added'], r.get('torrents_queued') or '?',
        mb(r['rss_kb'])))
    print('fail ' + why)")
      echo "   $s K=$k $(echo "$verdict" | head -1)"
      case $(echo "$verdict" | tail -1) in
        fail*) FINISHED[$s]=1
               GAVE_UP[$s]="not attempted: K=$k did not get to serving ($(echo "$verdict" | tail -1 | cut -d' ' -f2-))" ;;
        slow) FINISHED[$s]=1 ;;
      esac
    done
  done
  unset FINISHED
  if [ "$KEEP_DATA" != 1 ] && [ "$k" -ge 100000 ]; then rm -rf "${OUT:?}/data-k$k"; fi
done

echo "wall: $(( $(date +%s) - STARTED )) s (of which ${WAITED_S} s waiting for a quiet machine)" | tee -a "$OUT/machine.txt"
$PY benches/scale_summary.py "$OUT"
