#!/bin/sh
# Store lookup micro-benchmark, base vs new, interleaved in one hold of the bench lock.
# BASE / NEW: the `store` criterion bench binaries of the two commits (cargo bench --bench
# store --no-run prints their paths). ROUNDS rounds of base, new, new, base (ABBA, so a
# drift in machine load hits both sides alike). Output: one line per result.
# NEW2 (optional): a third binary (a variant of new); then each round is base, new, new2,
# new2, new, base.
# Usage: BASE=... NEW=... [NEW2=...] ROUNDS=3 flock /work/bench.lock sh run.sh > raw.txt
set -eu
ROUNDS=${ROUNDS:-3}
run() {
    echo "== $1 $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)"
    "$2" --bench 'store/' --warm-up-time 2 --measurement-time 5 --noplot 2>/dev/null \
        | grep -E "^store/|time:"
}
for r in $(seq "$ROUNDS"); do
    if [ -n "${NEW2:-}" ]; then
        run base "$BASE"; run new "$NEW"; run new2 "$NEW2"; run new2 "$NEW2"; run new "$NEW"; run base "$BASE"
    else
        run base "$BASE"; run new "$NEW"; run new "$NEW"; run base "$BASE"
    fi
done
