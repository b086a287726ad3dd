#!/bin/bash
# ab.sh: interleaved rounds, base vs new vs floor, per concurrency
for r in 1 2 3; do
 for c in 1 8 64; do
  C=$c M=${U19:-/tmp/u19}/magnetar.base ./probe.sh mag | head -1 | sed "s/^/base r$r /"
  C=$c ./probe.sh mag | head -1 | sed "s/^/new  r$r /"
  C=$c ./probe.sh floor | head -1 | sed "s/^/flr  r$r /"
 done
done
