#!/bin/sh
# Store::open at 10M in process (magnetar-loadgen recover --runs 1), base (three passes over
# the checkpoint's tables) vs new (one pass), ABBA rounds, warm page cache, in one hold of
# the bench lock.
# Usage: BASE=<loadgen of base> NEW=<loadgen of new> D=<store dir> ROUNDS=3 \
#        flock /work/bench.lock sh recover-abba.sh
set -eu
for r in $(seq "${ROUNDS:-3}"); do
  for which in base new new base; do
    if [ $which = base ]; then L=$BASE; else L=$NEW; fi
    printf '%s round %s load %s: ' $which $r "$(cut -d' ' -f1 /proc/loadavg)"
    /usr/bin/time -f 'wall %e s user %U s sys %S s maxrss %M KB' "$L" recover --data-dir "$D" --runs 1 2>&1 | tr '\n' ' '
    echo
  done
done
