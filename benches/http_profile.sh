# Profile of the public HTTP listener under wrk -c64 keep-alive (see BENCHMARKS.md, "Public HTTP
# listener"): flock /work/bench.lock bash benches/http_profile.sh
set -e
M=$(cd "$(dirname "$0")/.." && pwd)/target/release/magnetar
W=$(mktemp -d /tmp/http-prof.XXXXXX)
python3 - "$W/in.torrent" <<'PY'
import sys, hashlib
ph = b"".join(hashlib.sha1(i.to_bytes(4, "big")).digest() for i in range(2000))
info = b"d6:lengthi%de4:name9:bench.bin12:piece lengthi16384e6:pieces%d:" % (2000 * 16384, len(ph)) + ph + b"e"
open(sys.argv[1], "wb").write(b"d4:info" + info + b"e")
PY
mkdir -p $W/t && mv $W/in.torrent $W/t/
$M --log error import --data-dir $W/data $W/t >/dev/null
HEX=$(python3 -c "import hashlib;d=open('$W/t/in.torrent','rb').read();print(hashlib.sha1(d[7:-1]).hexdigest())")
taskset -c 0 $M --log error serve --data-dir $W/data --listen 127.0.0.1:0 --utp off --admin off --no-dht --threads 1 --http 127.0.0.1:18390 --connections-per-ip-max 100000 > $W/out &
P=$!
for i in $(seq 50); do grep -q ready $W/out && break; sleep 0.1; done
perf record -F 2000 -g -p $P -o $W/perf.data -- sleep 5 >/dev/null 2>&1 &
taskset -c 1 wrk -t1 -c64 -d5s http://127.0.0.1:18390/torrent/$HEX.torrent | grep Requests/sec
wait %2 2>/dev/null || sleep 1
sleep 1
perf report -i $W/perf.data --no-children --sort symbol --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -30
kill $P; rm -rf $W
