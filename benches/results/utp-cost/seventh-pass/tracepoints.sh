#!/bin/bash
# tracepoints.sh WHICH (mag|floor): per-fetch counts of net:net_dev_queue (messages the server
# sends), sched wake-ups and IPIs in the server's context at c=$C (LGARGS: loadgen flags).
W=$1; shift
REPO=${REPO:-$(cd "$(dirname "$0")/../../../.." && pwd)}
M=${M:-$REPO/target/release/magnetar}; L=${L:-$REPO/target/release/magnetar-loadgen}
cd ${U19:-/tmp/u19}
case $W in
  floor) taskset -c 0 ./${FLOOR:-floor_utp} data/floor.bin 127.0.0.1 0 > srv.log 2>&1 & ;;
  mag) taskset -c 0 $M serve "$@" --data-dir data/store --listen 127.0.0.1:0 --admin 127.0.0.1:17881 --threads 1 --connections-max 1000000 --connections-per-ip-max 1000000 > srv.log 2>&1 & ;;
esac
PID=$!
for i in $(seq 100); do grep -q '^ready' srv.log && break; sleep 0.1; done
PORT=$(grep '^ready ' srv.log | sed -E 's/.*listen=[^ ]*:([0-9]+).*/\1/')
taskset -c 1 $L --target 127.0.0.1:$PORT --hashes data/hashes.txt --transport utp --connections ${C:-64} --duration 1 --threads 1 >/dev/null 2>&1
timeout -s INT $((${D:-4}+1)) perf stat -x, -e net:net_dev_queue,sched:sched_wakeup,sched:sched_waking,irq_vectors:call_function_single_entry,irq_vectors:reschedule_entry -p $PID -o tp.txt 2>/dev/null &
PP=$!
out=$(taskset -c 1 $L --target 127.0.0.1:$PORT --hashes data/hashes.txt --transport utp --connections ${C:-64} --duration ${D:-4} --threads 1 ${LGARGS:-} --json 2>/dev/null | tail -1)
wait $PP
kill $PID; wait $PID 2>/dev/null
F=$(echo "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r.get("fetches") or int(r["fetches_per_sec"]*'${D:-4}'))')
echo "$W c=${C:-64} fetches=$F"
awk -F, -v f=$F 'NF>3 && $1+0>0 { printf "   %-40s %8.2f /fetch\n", $3, $1/f }' tp.txt
