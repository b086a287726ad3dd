#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the tests need (real
# clients and trackers from Debian), then runs unit, integration and interop tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
/usr/bin/python3 -c 'import libtorrent' 2>/dev/null || need+=(python3-libtorrent)
command -v opentracker >/dev/null 2>&1 || need+=(opentracker)
command -v aria2c >/dev/null 2>&1 || need+=(aria2)
command -v transmission-cli >/dev/null 2>&1 || need+=(transmission-cli)
[ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need+=(iproute2) # network namespaces (Transmission)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# webtorrent (npm) for the encryption interop tests, pinned by package-lock.json.
# --ignore-scripts: ip-set@3.0.0 (a dependency) has a broken `preinstall` that refuses npm,
# and utp-native loads the prebuilt binaries it ships without an install script.
if [ ! -d tests/interop/webtorrent/node_modules ]; then
  (cd tests/interop/webtorrent && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi

# Garage (S3-compatible object store, AGPL) is the real S3 server of the shared-tier tests,
# run as a separate process, never linked. Looked up as tests/common/garage.rs does:
# $GARAGE_BIN, else `garage` on PATH, else $CARGO_HOME/bin/garage (~/.cargo/bin). There is
# no Debian package, so the first run builds it from source: 10 min (real 9m57s) on this
# 2-core VM, sharing it with another compile.
if [ -n "${GARAGE_BIN:-}" ]; then
  [ -x "$GARAGE_BIN" ] || { echo "GARAGE_BIN=$GARAGE_BIN is not executable" >&2; exit 1; }
elif ! command -v garage >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/garage" ]; then
  echo "installing: garage 2.5.0 (cargo install: builds from source, ~10 min on 2 cores)"
  start=$(date +%s)
  cargo install garage --version 2.5.0 --locked --no-default-features --features bundled-libs,lmdb
  took=$(($(date +%s) - start))
  echo "garage built in $((took / 60)) min $((took % 60)) s"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
# Both passes run whatever the first one gives; the script fails at the end if either did.
failed=()
# Pass 1: the default driver (io_uring where the kernel allows it: the worker's own ring).
echo "== pass 1: every test on the default driver"
cargo nextest run --workspace --no-fail-fast "$@" || failed+=("pass 1 (default driver): exit $?")
# Pass 2: every test that runs `magnetar serve` again on the epoll fallback (the server
# reads MAGNETAR_DRIVER; a test that names --driver itself keeps its choice). Unit tests
# do not depend on the driver and run once. MAGNETAR_TEST_EPOLL_PASS=0 skips this pass.
if [ "${MAGNETAR_TEST_EPOLL_PASS:-1}" = 1 ]; then
  echo "== pass 2: the integration tests again with MAGNETAR_DRIVER=epoll"
  MAGNETAR_DRIVER=epoll cargo nextest run --workspace --no-fail-fast -E 'kind(test)' "$@" ||
    failed+=("pass 2 (MAGNETAR_DRIVER=epoll): exit $?")
fi
if [ ${#failed[@]} -gt 0 ]; then
  for f in "${failed[@]}"; do
    echo "FAILED: $f" >&2
  done
  exit 1
fi
echo "== all passes succeeded"
