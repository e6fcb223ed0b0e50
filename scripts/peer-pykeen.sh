#!/usr/bin/env bash
# Paired comparison with a peer: PyKEEN TransE and the product's TransE on UMLS, same
# settings (the product's TransEConfig::default(): d 128, L1, margin 1, 1 negative, batch 256,
# Adam lr .01, 100 epochs, unit-norm entities), same seeds, one thread each, run alternately
# (PyKEEN seed s, then ours seed s) so that load drifts hit both alike. Prints every run and
# the medians of filtered test MRR, Hits@10 (both sides, realistic rank) and training time.
#
#   scripts/peer-pykeen.sh [SEEDS]          (default 5: seeds 0..4)
#
# Installs PyKEEN 1.11.1 with pip into a virtual environment (PEER_VENV, default
# target/peer-venv). PyPI's torch wheel for Linux pulls CUDA libraries: about 3 GB to
# download and unpack, even on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-5}
venv=${PEER_VENV:-target/peer-venv}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import pykeen" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "pykeen==1.11.1"
fi
cargo build --release -p simskip-kge --example transe_quality >&2
ours="${CARGO_TARGET_DIR:-target}/release/examples/transe_quality"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for s in $(seq 0 $((seeds - 1))); do
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$venv/bin/python" scripts/peer_pykeen_umls.py data/umls "$s" | tee -a "$out"
  "$ours" --data data/umls --seeds 1 --first-seed "$s" --threads 1 --dim 128 --norm l1 \
    --loss margin:1 --negatives 1 --batch 256 --lr 0.01 --epochs 100 --normalize true | grep '^JSON' \
    | sed -e 's/^JSON \[//' -e 's/\]$//' -e "s/^{/{\"peer\":\"simskip\",\"seed\":$s,/" | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for peer in ("pykeen", "simskip"):
    r = [x for x in runs if x["peer"] == peer]
    med = lambda k: statistics.median(x[k] for x in r)
    rng = lambda k: (min(x[k] for x in r), max(x[k] for x in r))
    print(f"{peer:8} n={len(r)}  MRR median {med('mrr'):.4f} (range {rng('mrr')[0]:.4f}-{rng('mrr')[1]:.4f})"
          f"  H@10 {med('h10'):.4f} ({rng('h10')[0]:.4f}-{rng('h10')[1]:.4f})"
          f"  training {med('wall_s'):.2f} s wall ({rng('wall_s')[0]:.2f}-{rng('wall_s')[1]:.2f}), {med('cpu_s'):.2f} s CPU")
p = [x for x in runs if x["peer"] == "pykeen"]
o = [x for x in runs if x["peer"] == "simskip"]
ratios = [a["cpu_s"] / b["cpu_s"] for a, b in zip(p, o)]
print(f"training CPU time ratio pykeen/simskip, paired by seed: median {statistics.median(ratios):.1f}x (range {min(ratios):.1f}-{max(ratios):.1f})")
PY
