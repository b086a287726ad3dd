#!/bin/bash
for r in 1 2 3; do
 for T in tcp utp; do
 for c in 1 64; do
  T=$T C=$c M=${U19:-/tmp/u19}/magnetar.send ./probe.sh mag | head -1 | sed "s/^/send  $T r$r /"
  T=$T C=$c ./probe.sh mag | head -1 | sed "s/^/yield $T r$r /"
 done
 done
done
