#!/bin/sh
# Store::open at 10M in process (magnetar-loadgen recover), 3 warm runs then one with the
# page cache dropped, all in one hold of the bench lock.
# Usage: L=target/release/magnetar-loadgen D=<store dir> flock /work/bench.lock sh recover-now.sh
set -eu
for r in 1 2 3; do
    echo "== warm $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    /usr/bin/time -f 'wall %e s user %U s sys %S s maxrss %M KB' "$L" recover --data-dir "$D" --runs 1 2>&1
done
sync; echo 3 > /proc/sys/vm/drop_caches
echo "== cold (caches dropped) $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
/usr/bin/time -f 'wall %e s user %U s sys %S s maxrss %M KB' "$L" recover --data-dir "$D" --runs 1 2>&1
