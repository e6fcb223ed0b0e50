#!/usr/bin/env bash
# The whole test suite on a fresh machine: builds everything (dependencies optimised even in
# the test profile, see Cargo.toml) and runs every test, the multi-process federation tests and,
# when run as root with iproute2, the network-namespace deployment test included.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && ! command -v ip >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # The deployment test needs `ip netns`; everything else runs without it.
  (apt-get update -qq && apt-get install -y -qq iproute2) >/dev/null 2>&1 || echo "note: could not install iproute2; the namespace test will skip"
fi
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast -- --test-threads=2
