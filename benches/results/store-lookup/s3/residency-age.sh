#!/bin/sh
# new0 (RESIDENCY_AGE 1 s) vs age (100000 s: bits never cleared, no mincore after the first pass), ABBA x2
run() { echo "== $1 $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"; "$2" --bench 'store/lookup_(hit|resident_hit)_100k' --warm-up-time 2 --measurement-time 4 --noplot 2>/dev/null | grep -E "^store/|time:"; }
for r in 1 2; do run new /tmp/s3bin/bench-new0; run new2 /tmp/s3bin/bench-age; run new2 /tmp/s3bin/bench-age; run new /tmp/s3bin/bench-new0; done
