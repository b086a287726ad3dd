#!/bin/bash
# probe.sh WHICH [extra server args]: one server on CPU 0, loadgen uTP c=$C on CPU 1 for $D s;
# prints fetches, server CPU-s, per-fetch syscalls by name and metrics deltas.
# FLOOR=<binary in $U19> runs a floor variant (e.g. built with another GSO_SEGMENTS_MAX).
# LGARGS=<loadgen flags> are added to the load generator (e.g. --uring-interrupting).
set -u
REPO=${REPO:-$(cd "$(dirname "$0")/../../../.." && pwd)}
W=$1; shift
C=${C:-64}; D=${D:-4}
M=${M:-${REPO:-.}/target/release/magnetar}; L=${L:-${REPO:-.}/target/release/magnetar-loadgen}
cd ${U19:-/tmp/u19}
ADMIN=127.0.0.1:17881
case $W in
  floor) taskset -c 0 ./${FLOOR:-floor_utp} data/floor.bin 127.0.0.1 0 > srv.log 2>&1 & ;;
  mag) taskset -c 0 $M serve "$@" --data-dir data/store --listen 127.0.0.1:0 --admin $ADMIN --threads 1 --connections-max 1000000 --connections-per-ip-max 1000000 > srv.log 2>&1 & ;;
esac
PID=$!
for i in $(seq 100); do grep -q '^ready' srv.log && break; sleep 0.1; done
PORT=$(grep '^ready ' srv.log | sed -E 's/.*listen=[^ ]*:([0-9]+).*/\1/')
taskset -c 1 $L --target 127.0.0.1:$PORT --hashes data/hashes.txt --transport ${T:-utp} --connections $C --duration 2 --threads 1 ${LGARGS:-} >/dev/null 2>&1
m0=$(curl -s http://$ADMIN/metrics 2>/dev/null | grep -E '^magnetar_utp_(datagrams|gso|packets|acks)' )
c0=$(awk '{print $14+$15}' /proc/$PID/stat); u0=$(awk '{print $14}' /proc/$PID/stat)
if [ -n "${TRACE:-}" ]; then
  timeout -s INT $((D+1)) perf stat -e 'syscalls:sys_enter_*' -p $PID -o perf.txt 2>/dev/null &
  PP=$!
fi
out=$(taskset -c 1 $L --target 127.0.0.1:$PORT --hashes data/hashes.txt --transport ${T:-utp} --connections $C --duration $D --threads 1 ${LGARGS:-} --json 2>/dev/null | tail -1)
c1=$(awk '{print $14+$15}' /proc/$PID/stat); u1=$(awk '{print $14}' /proc/$PID/stat)
[ -n "${TRACE:-}" ] && wait $PP
m1=$(curl -s http://$ADMIN/metrics 2>/dev/null | grep -E '^magnetar_utp_(datagrams|gso|packets|acks)')
kill $PID; wait $PID 2>/dev/null
F=$(echo "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["fetches"] if "fetches" in r else int(r["fetches_per_sec"]*'$D'))')
echo "$W $* c=$C fetches=$F cpu_s=$(echo "($c1-$c0)/100" | bc -l | cut -c1-5) per_cpu_s=$(echo "$F/(($c1-$c0)/100)" | bc -l | cut -d. -f1) p50=$(echo "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["p50_us"])') user_us=$(echo "($u1-$u0)*10000/$F" | bc -l | cut -c1-5) all_us=$(echo "($c1-$c0)*10000/$F" | bc -l | cut -c1-5)"
if [ -n "${TRACE:-}" ]; then
  awk -v f=$F '/syscalls:sys_enter/ { gsub(",","",$1); if ($1+0 > 0) printf "   %-40s %8.2f /fetch\n", $2, $1/f }' perf.txt | sort -k2 -nr | head -8
fi
paste <(echo "$m0") <(echo "$m1") | awk -v f=$F 'NF>=4 { printf "   %-45s %8.2f /fetch\n", $1, ($4-$2)/f }'
