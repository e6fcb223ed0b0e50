#!/usr/bin/env bash
# Peak resident memory of the coordinator during FedE rounds: one simskip-server and three
# simskip-client processes on loopback (plain text: memory, not transport, is measured here),
# over a graph split in 3 by relation.
#
#   scripts/coordinator-rss.sh [BIN_DIR] [DATASET] [ROUNDS]
#
# BIN_DIR holds simskip, simskip-server and simskip-client (default: target/release, built
# first). DATASET defaults to ../shared/datasets/wordnet-40k. Prints the coordinator's and
# each client's peak RSS (from /usr/bin/time -v) and the run's wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release}
dataset=${2:-../shared/datasets/wordnet-40k}
rounds=${3:-1}
if [ "$bin" = target/release ]; then cargo build --release -p simskip --bins >&2; fi
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (Debian package 'time')" >&2; exit 2; }
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
"$bin/simskip" partition "$dataset" --clients 3 --by relation --seed 0 -o "$work/parts" >/dev/null
cat >"$work/server.toml" <<EOF
[server]
listen = "127.0.0.1:0"
address_file = "$work/address"
min_clients = 3
min_fit_clients = 3
out_dir = "$work/coordinator"
[server.auth]
mode = "insecure"
organisations = ["org-0", "org-1", "org-2"]
[[server.stages]]
name = "fede"
kind = "fede"
rounds = $rounds
[server.stages.transe]
epochs = 1
EOF
env -i PATH="$PATH" RUST_LOG=warn /usr/bin/time -v -o "$work/server.time" \
  "$bin/simskip-server" --config "$work/server.toml" 2>"$work/server.log" &
for _ in $(seq 200); do [ -s "$work/address" ] && break; sleep 0.1; done
[ -s "$work/address" ] || { cat "$work/server.log" >&2; exit 1; }
start=$(date +%s.%N)
i=0
for part in "$work"/parts/*/; do
  cat >"$work/client$i.toml" <<EOF
[client]
server = "http://$(cat "$work/address")"
name = "org-$i"
[client.auth]
mode = "insecure"
[data]
dir = "$part"
out_dir = "$work/out$i"
EOF
  env -i PATH="$PATH" RUST_LOG=warn RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 \
    /usr/bin/time -v -o "$work/client$i.time" \
    "$bin/simskip-client" --config "$work/client$i.toml" 2>"$work/client$i.log" &
  i=$((i + 1))
done
wait
end=$(date +%s.%N)
rss() { awk -F': ' '/Maximum resident set size/ {printf "%.1f MiB", $2 / 1024}' "$1"; }
echo "dataset: $dataset, 3 organisations by relation, $rounds FedE round(s)"
echo "coordinator peak RSS: $(rss "$work/server.time")"
for c in "$work"/client*.time; do echo "$(basename "$c" .time) peak RSS: $(rss "$c")"; done
echo "wall: $(echo "$end - $start" | bc) s"
