#!/bin/bash
# seq.sh: strace the server's sends at c=$C (default 8) for 2 s; prints a few peers' message
# sequences (bytes per message, G = a GSO message) and messages per fetch by kind. Data set:
# third-pass/README.md. Under strace the rates are low: read the shapes, not the speed.
REPO=${REPO:-$(cd "$(dirname "$0")/../../../.." && pwd)}
M=${M:-$REPO/target/release/magnetar}; L=${L:-$REPO/target/release/magnetar-loadgen}
cd ${U19:-/tmp/u19}
taskset -c 0 $M serve --data-dir data/store --listen 127.0.0.1:0 --admin off --threads 1 > srv.log 2>&1 & PID=$!
for i in $(seq 100); do grep -q '^ready' srv.log && break; sleep 0.1; done
PORT=$(grep '^ready ' srv.log | sed -E 's/.*listen=[^ ]*:([0-9]+).*/\1/')
(timeout 3 strace -f -p $PID -e trace=sendmmsg,sendmsg,sendto -s 0 -v -o st.txt 2>/dev/null &) ; sleep 0.5
out=$(taskset -c 1 $L --target 127.0.0.1:$PORT --hashes data/hashes.txt --transport utp --connections ${C:-8} --duration 2 --threads 1 --json 2>/dev/null | tail -1)
sleep 1; kill $PID; wait $PID 2>/dev/null
F=$(echo "$out" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r.get("fetches") or int(r["fetches_per_sec"]*2))')
python3 - $F <<'PY'
import re,collections,sys
F=int(sys.argv[1]); msgs=[]
for line in open('st.txt'):
    if 'resumed' in line: continue
    for part in line.split('{msg_hdr=')[1:] if 'sendmmsg' in line else ([line] if 'sendmsg(' in line else []):
        m=re.search(r'htons\((\d+)\)',part)
        if not m: continue
        lens=[int(x) for x in re.findall(r'iov_len=(\d+)', part)]
        msgs.append((int(m.group(1)),sum(lens),'UDP_SEGMENT' in part or 'msg_controllen=24' in part))
byport=collections.defaultdict(list)
for p,b,g in msgs: byport[p].append((b,'G' if g else ''))
for p in list(byport)[3:7]: print(p, byport[p][:14])
h=collections.Counter('gso' if g else ('hdr20' if b==20 else ('full' if b>=1400 else 'small')) for p,b,g in msgs)
print('fetches', F, 'msgs', len(msgs), {k: round(v/F,2) for k,v in h.items()}, 'per fetch', round(len(msgs)/F,2))
PY
