#!/usr/bin/env bash
# TransE at scale: epoch time and peak resident memory on a synthetic graph of 1,000,000
# entities and 5,000,000 triples (generated from a seed by the example), with 1 and 2 threads.
#
#   scripts/transe-scale.sh [EXTRA EXAMPLE FLAGS...]   e.g. --epochs 5 --threads 1,2
#
# Prints the example's per-epoch times, then the peak RSS of the whole process from
# /usr/bin/time -v (the largest trainer alive at once: one per thread count, in turn).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (Debian package 'time')" >&2; exit 2; }
cargo build --release -p simskip-kge --example transe_scale >&2
bin="${CARGO_TARGET_DIR:-target}/release/examples/transe_scale"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
/usr/bin/time -v -o "$log" "$bin" "$@"
grep -E "Maximum resident set size|Elapsed \(wall clock\)|User time|System time" "$log"
