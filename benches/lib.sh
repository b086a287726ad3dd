# Sourced by benches/compare.sh and benches/scale.sh: their common setup, and waiting for
# a quiet machine before a measured run. Uses (and updates) the caller's ROOT, OUT, QUICK,
# BUSY_MAX, WAIT_MAX_S and WAITED_S; sets M and L.

# fd limit raised to the hard limit, OUT made absolute, release builds of the server and
# the load generator (M, L).
bench_setup() {
  ulimit -n "$(ulimit -Hn)"
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  echo "== build"
  cargo build --release -q -p magnetar -p magnetar-loadgen
  # Where cargo put them (CARGO_TARGET_DIR, as cargo reads it, else the repository's target/).
  local target=${CARGO_TARGET_DIR:-$ROOT/target}
  M=$target/release/magnetar
  # LOADGEN=path measures with another load generator build (before/after of the client).
  L=${LOADGEN:-$target/release/magnetar-loadgen}
}

# Share of all CPUs busy over 2 s (everything: other users and anything left of ours).
busy() {
  local a b
  read -ra a < <(head -1 /proc/stat); sleep 2; read -ra b < <(head -1 /proc/stat)
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  awk -v i="$idle" -v t="$total" 'BEGIN { printf "%.2f", (t > 0) ? 1 - i / t : 0 }'
}

# Waits (60 s at a time, WAIT_MAX_S in all over the whole script) until the machine is
# quieter than BUSY_MAX; returns 1 when it measures anyway (the run is flagged). Leaves its
# last sample in BUSY_LAST (unset in quick mode, which takes none).
wait_quiet() {
  [ "$QUICK" = 1 ] && return 0
  local b
  while :; do
    b=$(busy); BUSY_LAST=$b
    if awk -v b="$b" -v m="$BUSY_MAX" 'BEGIN { exit !(b <= m) }'; then return 0; fi
    if [ "$WAITED_S" -ge "$WAIT_MAX_S" ]; then
      echo "   machine busy ($b of all CPUs; loadavg $(cut -d' ' -f1-3 /proc/loadavg)); waited ${WAITED_S}s in all: measuring anyway (flagged)"
      return 1
    fi
    echo "   machine busy ($b of all CPUs; loadavg $(cut -d' ' -f1-3 /proc/loadavg)); waiting 60 s"
    sleep 60; WAITED_S=$((WAITED_S + 60))
  done
}
