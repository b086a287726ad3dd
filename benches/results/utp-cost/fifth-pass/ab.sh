#!/bin/bash
# ab3.sh N A B [C]: N interleaved rounds of floor, A, B at c=C (default 64); per-CPU-s lines
export REPO=${REPO:-$(cd "$(dirname "$0")/../../../.." && pwd)}
N=$1; A=$2; B=$3; C=${4:-64}
for r in $(seq $N); do
  C=$C bash $(dirname "$0")/../third-pass/probe.sh floor | grep -v '^   ' | sed 's/^/floor /'
  M=$A C=$C bash $(dirname "$0")/../third-pass/probe.sh mag | grep -v '^   ' | sed "s#^#$(basename $A) #"
  M=$B C=$C bash $(dirname "$0")/../third-pass/probe.sh mag | grep -v '^   ' | sed "s#^#$(basename $B) #"
done
