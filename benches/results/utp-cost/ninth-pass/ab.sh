#!/bin/bash
# ab.sh: probe rounds (third-pass/probe.sh) of the UDP floor, the build before ($BASE) and the
# build after ($NEW), in an order that rotates each round, at C connections for D seconds.
# Usage: BASE=<magnetar> NEW=<magnetar> L=<loadgen> C=64 D=5 ROUNDS=4 bash ab.sh
# (the probe's data set in /tmp/u19, see BENCHMARKS.md "uTP cost").
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROUNDS=${ROUNDS:-4}
order=(floor base new)
for r in $(seq 0 $((ROUNDS - 1))); do
  for k in 0 1 2; do
    w=${order[$(((r + k) % 3))]}
    case $w in
      floor) out=$(bash "$HERE/../third-pass/probe.sh" floor | head -1) ;;
      base) out=$(M=$BASE bash "$HERE/../third-pass/probe.sh" mag | head -1) ;;
      new) out=$(M=$NEW bash "$HERE/../third-pass/probe.sh" mag | head -1) ;;
    esac
    echo "round=$((r + 1)) $w ${out#* }"
  done
done
