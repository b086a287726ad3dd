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

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --no-fail-fast "$@"
