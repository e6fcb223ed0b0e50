#!/usr/bin/env bash
# The whole test suite on a fresh machine: builds everything (dependencies optimised even in
# the test profile, see Cargo.toml) and runs every test, the multi-process federation tests,
# the report page in headless Chromium and, when run as root with iproute2, the
# network-namespace deployment test included. The deployment in real containers is
# scripts/container-test.sh (CI runs both).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && ! command -v ip >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # The deployment test needs `ip netns`; everything else runs without it.
  (apt-get update -qq && apt-get install -y -qq iproute2) >/dev/null 2>&1 || echo "note: could not install iproute2; the namespace test will skip"
fi
if [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # The report test loads the HTML run report in headless Chromium (about a minute to install).
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "note: could not install chromium; the report browser test will skip"
fi
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast -- --test-threads=2
