#!/usr/bin/env bash
# The compose deployment in real containers: builds the release binaries and the image of
# deploy/Dockerfile.local, brings up deploy/docker-compose.yml plus deploy/docker-compose.local.yml
# (and a short-run override written here) with podman-compose, waits for every service to
# exit, checks each exit code and the outputs (metrics.jsonl records, each organisation's
# tables and gate decision), writes the HTML report, and always tears down.
#
# Needs root with podman (set up by ../shared/containers/podman-engine.sh when present).
# Where containers cannot run it prints "SKIPPED container-test: <reason>" and exits 0.
#   ./scripts/container-test.sh                 # from anywhere
# Environment: CONTAINER_TEST_TIMEOUT (seconds for the federation, default 1200),
# CONTAINER_TEST_KEEP=1 keeps the work folder for inspection.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TIMEOUT=${CONTAINER_TEST_TIMEOUT:-1200}
PROJECT=simskip-ct-$$
IMAGE=localhost/simskip:local
started=$(date +%s)
say() { echo "container-test: $*" >&2; }
skip() { echo "SKIPPED container-test: $*"; exit 0; }

[ "$(uname -s)" = Linux ] || skip "not Linux"
[ "$(id -u)" = 0 ] || skip "needs root for rootful podman (run as root, as CI does)"

# --- the engine -------------------------------------------------------------------------------
ENGINE=""
for candidate in "$ROOT/../shared/containers/podman-engine.sh" /work/shared/containers/podman-engine.sh; do
  [ -x "$candidate" ] && { ENGINE=$candidate; break; }
done
if command -v apt-get >/dev/null 2>&1; then
  # netavark (podman's network backend) needs iptables, which the engine script does not install.
  if ! command -v iptables >/dev/null 2>&1; then
    say "installing iptables"
    (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq iptables) >&2 ||
      skip "could not install iptables (needed by podman's network backend)"
  fi
fi
if [ -n "$ENGINE" ]; then
  engine_env=$("$ENGINE") || skip "podman cannot run containers here ($ENGINE failed; see above)"
  eval "$engine_env"
elif ! command -v podman >/dev/null 2>&1; then
  skip "podman is not installed and no podman-engine.sh was found"
fi
BASE=${SIMSKIP_BASE_IMAGE:-localhost/debian:bookworm-slim}
podman image exists "$BASE" || skip "base image $BASE is missing (podman-engine.sh builds it)"
if ! command -v podman-compose >/dev/null 2>&1; then
  say "installing podman-compose (PyPI)"
  timeout 300 python3 -m pip install -q podman-compose >&2 || skip "could not install podman-compose from PyPI"
  hash -r
fi
COMPOSE=(podman-compose)
command -v podman-compose >/dev/null 2>&1 || COMPOSE=(python3 -m podman_compose)

# --- binaries and image -----------------------------------------------------------------------
say "building the release binaries"
(cd "$ROOT" && cargo build --release -p simskip --bins)
# Where cargo put them: CARGO_TARGET_DIR when set (relative to the checkout, as cargo reads it).
case "${CARGO_TARGET_DIR:-}" in
  "") BIN="$ROOT/target/release" ;;
  /*) BIN="$CARGO_TARGET_DIR/release" ;;
  *) BIN="$ROOT/$CARGO_TARGET_DIR/release" ;;
esac
WORK=$(mktemp -d /var/tmp/simskip-container-test.XXXXXX)
cleanup() {
  status=$?
  say "tearing down"
  if [ -f "$WORK/deploy/docker-compose.yml" ]; then
    (cd "$WORK/deploy" && timeout 120 "${COMPOSE[@]}" -p "$PROJECT" "${FILES[@]}" down -t 5 >/dev/null 2>&1) || true
  fi
  # Containers of this project that compose left behind, by label.
  ids=$(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null || true)
  [ -z "$ids" ] || podman rm -f $ids >/dev/null 2>&1 || true
  podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
  if [ "${CONTAINER_TEST_KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
  say "finished in $(( $(date +%s) - started )) s with status $status"
  exit $status
}
FILES=()
trap cleanup EXIT
trap 'exit 130' INT TERM

CONTEXT="$WORK/context"
mkdir -p "$CONTEXT/target/release" "$CONTEXT/deploy"
cp "$BIN"/{simskip,simskip-server,simskip-client} "$CONTEXT/target/release/"
cp -r "$ROOT/deploy/config" "$ROOT/deploy/entrypoint.sh" "$CONTEXT/deploy/"
say "building $IMAGE FROM $BASE"
timeout 600 podman build -q --build-arg "BASE=$BASE" -f "$ROOT/deploy/Dockerfile.local" -t "$IMAGE" "$CONTEXT" >/dev/null

# --- the deployment: the project's compose files, in a work folder --------------------------
mkdir -p "$WORK/deploy"
cp "$ROOT/deploy/docker-compose.yml" "$ROOT/deploy/docker-compose.local.yml" "$WORK/deploy/"
# Each organisation's private folder, as the compose volumes expect; the output folders are
# left for compose to create (as root), which the image's entrypoint must cope with.
"$BIN/simskip" partition "$ROOT/data/wordnet-5k" --clients 3 --out "$WORK/parts" >/dev/null
orgs=(org-a org-b org-c)
for k in 0 1 2; do
  mkdir -p "$WORK/deploy/orgs/${orgs[$k]}"
  mv "$WORK/parts/client-$k" "$WORK/deploy/orgs/${orgs[$k]}/data"
done
# The federation's certificates, as the compose file's header says to make them.
"$BIN/simskip" certs --out "$WORK/deploy/tls" --coordinator-host coordinator \
  --org org-a --org org-b --org org-c --days 2 >/dev/null
"$BIN/simskip" secret --out "$WORK/deploy/tls/org-a/federation.secret" >/dev/null
cp -p "$WORK/deploy/tls/org-a/federation.secret" "$WORK/deploy/tls/org-b/"
cp -p "$WORK/deploy/tls/org-a/federation.secret" "$WORK/deploy/tls/org-c/"
# A short federation: 2 FedE rounds, 1 SimSkip round, a small model and probe; the safe
# settings of deploy/config/server.toml (mTLS, blinded keys, shared-only rows, both stages
# summed under secure aggregation: FedE per entity, SimSkip as one weighted sum).
cat > "$WORK/deploy/quick-server.toml" <<'TOML'
[server]
listen = "0.0.0.0:50051"
min_clients = 3
min_fit_clients = 3
round_timeout_secs = 600.0
done_grace_secs = 5.0
out_dir = "/out"

[server.auth]
mode = "mtls"
tls_dir = "/tls"
organisations = ["org-a", "org-b", "org-c"]

[[server.stages]]
name = "fede"
kind = "fede"
rounds = 2
eval_every = 1
dim = 32
[server.stages.transe]
epochs = 1
negatives = 16
lr = 0.01
[server.stages.aggregation]
min_holders = 2
[server.stages.secure_aggregation]
frac_bits = 24

[[server.stages]]
name = "simskip"
kind = "fedavg"
rounds = 1
dim = 32
[server.stages.simskip]
epochs = 1
[server.stages.secure_aggregation]
frac_bits = 24
TOML
cat > "$WORK/deploy/docker-compose.quick.yml" <<'YAML'
# Written by scripts/container-test.sh: a short run.
services:
  coordinator:
    volumes: ["./quick-server.toml:/etc/simskip/server.toml:ro"]
  org-a: &quick-client
    environment: { SIMSKIP_EVAL__PROBE__EPOCHS: "20", CANDLE_NUM_THREADS: "1", RAYON_NUM_THREADS: "1" }
  org-b: *quick-client
  org-c: *quick-client
YAML
FILES=(-f docker-compose.yml -f docker-compose.local.yml -f docker-compose.quick.yml)
cd "$WORK/deploy"
say "starting the deployment (project $PROJECT)"
timeout 300 "${COMPOSE[@]}" -p "$PROJECT" "${FILES[@]}" up -d --no-build >"$WORK/compose-up.log" 2>&1 ||
  { cat "$WORK/compose-up.log" >&2; exit 1; }
run_started=$(date +%s)

# Every service's container, by compose label.
declare -A container
for svc in coordinator "${orgs[@]}"; do
  id=$(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$svc")
  [ -n "$id" ] || { echo "no container for service $svc" >&2; podman ps -a >&2; exit 1; }
  container[$svc]=$id
done
# Published ports: there must be none.
for svc in "${!container[@]}"; do
  ports=$(podman port "${container[$svc]}" 2>/dev/null || true)
  [ -z "$ports" ] || { echo "service $svc publishes ports: $ports" >&2; exit 1; }
done

dump_logs() {
  for svc in coordinator "${orgs[@]}"; do
    echo "--- $svc (last 20 lines) ---" >&2
    podman logs --tail 20 "${container[$svc]}" >&2 2>&1 || true
  done
}
say "waiting for the federation (at most $TIMEOUT s)"
failed=0
for svc in "${orgs[@]}" coordinator; do
  left=$(( TIMEOUT - ( $(date +%s) - run_started ) ))
  [ $left -gt 0 ] || left=1
  if ! code=$(timeout "$left" podman wait "${container[$svc]}"); then
    echo "service $svc did not finish within $TIMEOUT s" >&2; dump_logs; exit 1
  fi
  say "$svc exited with $code"
  [ "$code" = 0 ] || failed=1
done
[ $failed = 0 ] || { echo "a service failed" >&2; dump_logs; exit 1; }
say "federation took $(( $(date +%s) - run_started )) s"

# --- outputs -------------------------------------------------------------------------------
metrics="$WORK/deploy/orgs/coordinator/out/metrics.jsonl"
[ -s "$metrics" ] || { echo "no $metrics" >&2; exit 1; }
count() { grep -c "\"stage\":\"$1\".*\"kind\":\"$2\"\|\"kind\":\"$2\".*\"stage\":\"$1\"" "$metrics" || true; }
check_count() {
  local n; n=$(count "$1" "$2")
  [ "$n" = "$3" ] || { echo "metrics.jsonl: $n '$1' $2 records, expected $3" >&2; cat "$metrics" >&2; exit 1; }
}
check_count fede fit 2
check_count fede evaluate 2
check_count simskip fit 1
check_count simskip evaluate 1
grep -q '"aggregated":true' "$metrics" || { echo "no aggregated round in $metrics" >&2; exit 1; }
# Every FIT round (FedE per entity, SimSkip) was summed under secure aggregation by all three
# organisations.
python3 - "$metrics" <<'PY' || { cat "$metrics" >&2; exit 1; }
import json, sys
fits = [r for r in map(json.loads, open(sys.argv[1])) if r["kind"] == "fit"]
assert len(fits) == 3, fits
for r in fits:
    assert r["aggregated"] and r["num_clients"] == 3, r
    assert r.get("note") == "secure aggregation: the sum of 3 organisations", r
PY
for org in "${orgs[@]}"; do
  out="$WORK/deploy/orgs/$org/out"
  for f in fede/entities.npy simskip/entities.npy simskip/gate.json; do
    [ -s "$out/$f" ] || { echo "$org wrote no $f" >&2; ls -lR "$out" >&2; exit 1; }
  done
  owner=$(stat -c %u "$out/simskip/entities.npy")
  [ "$owner" = 10001 ] || { echo "$org's outputs belong to uid $owner, not 10001" >&2; exit 1; }
  grep -q "\"$org\"" "$metrics" || { echo "$org appears in no round record" >&2; exit 1; }
done
# The report reads every record as typed data, so a malformed line fails here.
"$BIN/simskip" report "$WORK/deploy/orgs/coordinator/out" \
  --org "org-a=$WORK/deploy/orgs/org-a/out" --org "org-b=$WORK/deploy/orgs/org-b/out" \
  --org "org-c=$WORK/deploy/orgs/org-c/out" --out "$WORK/report.html" >/dev/null
grep -c '<svg' "$WORK/report.html" >/dev/null
# Blinded keys: the coordinator's FedE row keys are HMACs, none of them an entity name.
keys="$WORK/deploy/orgs/coordinator/out/fede/entities.txt"
[ -s "$keys" ] || { echo "no $keys" >&2; exit 1; }
if grep -qv '^[0-9a-f]\{64\}$' "$keys"; then
  echo "the coordinator saw entity names: $(grep -v '^[0-9a-f]\{64\}$' "$keys" | head -3)" >&2; exit 1
fi
# Mutual TLS: the coordinator's settings ask for it, and an organisation whose settings ask for
# it (deploy/config/client.toml) cannot register with anything else, so the records above show
# three organisations admitted by certificate. Check that both sides were configured so.
grep -q '^mode = "mtls"' "$WORK/deploy/quick-server.toml" ||
  { echo "the coordinator's settings do not ask for mutual TLS" >&2; exit 1; }
grep -q '^mode = "mtls"' "$ROOT/deploy/config/client.toml" ||
  { echo "the organisations' settings do not ask for mutual TLS" >&2; exit 1; }
echo "container-test: PASSED ($(wc -l <"$metrics") round records, 3 organisations; $(( $(date +%s) - started )) s in all)"
