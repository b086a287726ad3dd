#!/usr/bin/env bash
# Runs every cargo-fuzz target for a set time (SECURITY.md "Fuzzing").
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]     default: 60 s each, all targets
#
# Environment: FUZZ_JOBS (parallel libFuzzer jobs per target, default 1), FUZZ_SANITIZER
# (address, the default, or none: faster, catches panics and overflows but not memory errors),
# FUZZ_MERGE=1 (afterwards, minimise each corpus in place with `cargo fuzz cmin`).
#
# Only a stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets it take the -Z flags cargo-fuzz
# passes. New corpus entries land in fuzz/corpus/<target>/, crashes in
# fuzz/artifacts/<target>/. A crash that is fixed goes to fuzz/regressions/<target>/, which
# `cargo test --test fuzz_regressions` replays on stable in CI along with the corpus.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(wire_decoder info_dict magnet store_recovery utp_connection mse_responder mse_session)
jobs="${FUZZ_JOBS:-1}"
sanitizer="${FUZZ_SANITIZER:-address}"

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi

cargo fuzz build -O --sanitizer "$sanitizer"

status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "== $t: ${seconds}s, $jobs job(s), sanitizer $sanitizer"
  log="artifacts/$t/last-run.log"
  # -max_len: the store target needs whole segments (several records); the others are
  # message-sized. -rss_limit_mb: every target's inputs are bounded, so more is a leak.
  max_len=4096
  leaks=1
  if [ "$t" = store_recovery ]; then
    max_len=16384
    # LeakSanitizer reports glibc's per-thread destructor list (__cxa_thread_atexit_impl)
    # of the recovery threads as a leak; -rss_limit_mb still catches real growth.
    leaks=0
  fi
  parallel=()
  [ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")
  if ! cargo fuzz run -O --sanitizer "$sanitizer" "$t" "corpus/$t" -- \
      -max_total_time="$seconds" -max_len="$max_len" -rss_limit_mb=2048 \
      -detect_leaks="$leaks" -print_final_stats=1 "${parallel[@]}" >"$log" 2>&1; then
    status=1
    echo "!! $t found a crash: see $log and fuzz/artifacts/$t/"
  fi
  # With FUZZ_JOBS > 1 each job logs to fuzz-N.log; gather what there is.
  cat "$log" fuzz-*.log 2>/dev/null | grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|SUMMARY|==[0-9]+== ERROR|thread .* panicked)' | sort | uniq -c || true
  rm -f fuzz-*.log
  if [ "${FUZZ_MERGE:-0}" = 1 ]; then
    cargo fuzz cmin -O --sanitizer "$sanitizer" "$t" "corpus/$t" >/dev/null 2>&1
    echo "   corpus minimised: $(ls "corpus/$t" | wc -l) files, $(du -sh "corpus/$t" | cut -f1)"
  fi
done
exit "$status"
