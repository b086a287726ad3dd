#!/bin/sh
# Experiment binary (not committed code): Store::lookup_resident with S3EXP =
# 0 as shipped; 1: Index::get (no residency check before the header read);
# 2: get_if with a `readable` that always says yes (the closure, no is_resident);
# 3: as shipped but without the second is_resident (the whole record's pages).
# lookup_hit_100k is the reference in every run. Two rounds of 0 1 2 3 3 2 1 0.
run() { echo "== exp$1 $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"; S3EXP=$1 /tmp/s3bin/bench-exp --bench 'store/lookup_(hit|resident_hit)_100k' --warm-up-time 2 --measurement-time 4 --noplot 2>/dev/null | grep -E "^store/|time:"; }
for r in 1 2; do for e in 0 1 2 3 3 2 1 0; do run $e; done; done
