#!/bin/bash
# Interleaved rounds of cgroup.sh for two binaries in one hold of the bench lock:
#   BEFORE=bin AFTER=bin L=loadgen D=data OUTS=dir ORDER="A B A B" flock /work/bench.lock rounds.sh
set -u
here=$(dirname "$0"); n=0
for who in ${ORDER:-A B A B}; do
  n=$((n + 1))
  case $who in A) bin=$AFTER; tag=after;; B) bin=$BEFORE; tag=before;; esac
  echo "== round $n: $tag ($bin) load $(cut -d' ' -f1-3 /proc/loadavg)"
  BIN=$bin OUT=$OUTS/$n-$tag "$here/cgroup.sh"
done
