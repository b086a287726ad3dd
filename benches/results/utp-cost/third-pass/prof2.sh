#!/bin/bash
# prof2.sh WHICH (mag|floor): perf record 5 s at c=64 (LGARGS: loadgen flags); prints fetches and
# samples per 1000 fetches by symbol; then `python3 ../seventh-pass/breakdown.py perf-WHICH.data FETCHES KEYS`.
W=$1; shift
REPO=${REPO:-$(cd "$(dirname "$0")/../../../.." && pwd)}
M=${M:-${REPO:-.}/target/release/magnetar}; L=${REPO:-.}/target/release/magnetar-loadgen
cd ${U19:-/tmp/u19}
case $W in
  floor) taskset -c 0 ./floor_utp data/floor.bin 127.0.0.1 0 > srv.log 2>&1 & ;;
  mag) taskset -c 0 $M serve "$@" --data-dir data/store --listen 127.0.0.1:0 --admin off --threads 1 --connections-max 1000000 --connections-per-ip-max 1000000 > srv.log 2>&1 & ;;
esac
PID=$!
for i in $(seq 100); do grep -q '^ready' srv.log && break; sleep 0.1; done
PORT=$(grep '^ready ' srv.log | sed -E 's/.*listen=[^ ]*:([0-9]+).*/\1/')
taskset -c 1 $L --target 127.0.0.1:$PORT --hashes data/hashes.txt --transport utp --connections 64 --duration 2 --threads 1 ${LGARGS:-} >/dev/null 2>&1
perf record -F 4000 -g -p $PID -o perf-$W.data -- sleep 5 2>/dev/null >/dev/null &
PP=$!
out=$(taskset -c 1 $L --target 127.0.0.1:$PORT --hashes data/hashes.txt --transport utp --connections 64 --duration 5 --threads 1 ${LGARGS:-} --json 2>/dev/null | tail -1)
wait $PP
kill $PID; wait $PID 2>/dev/null
F=$(echo "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(int(r["fetches_per_sec"]*5))')
echo "$W fetches=$F"
perf report -i perf-$W.data --no-children --sort dso --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -5
perf report -i perf-$W.data --no-children --sort sym --stdio -n 2>/dev/null | grep -E '^ +[0-9]' | awk -v f=$F '{ printf "%8.1f  %s\n", $2*1000/f, $0 }' | head -${TOP:-40}
