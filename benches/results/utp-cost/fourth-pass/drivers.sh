#!/bin/bash
# 3 interleaved rounds: floor, magnetar io_uring uTP, magnetar epoll uTP, magnetar io_uring TCP; c = 1 8 64
P=$(cd "$(dirname "$0")/../../../.." && pwd)/benches/results/utp-cost/third-pass/probe.sh
for r in 1 2 3; do
  for c in 1 8 64; do
    C=$c bash $P floor
    C=$c bash $P mag
    C=$c bash $P mag --driver epoll
    C=$c T=tcp bash $P mag
  done
done
