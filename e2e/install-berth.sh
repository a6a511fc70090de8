#!/usr/bin/env bash
# Builds Berth, packs its image into the local cluster's registry and installs
# it with `kubectl apply -f manifests`, then waits for every pod. Used by the
# quick start and the test run; needs `e2e/cluster.sh up` first.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=${BERTH_E2E_DIR:-/var/lib/berth-e2e}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/berth/target}
# shellcheck disable=SC1091
set -a; . "$D/env"; set +a
export PATH=$BERTH_BIN:$HOME/.cargo/bin:$PATH
say() { printf '\n\033[1m$ %s\033[0m\n' "$*" >&2; }

cd "$ROOT"
say cargo build --bins
cargo build --bins --quiet
"$ROOT/e2e/cluster.sh" berth-image "$CARGO_TARGET_DIR/debug"
say kubectl apply -f manifests
kubectl apply -f manifests
# Run exactly this build: the tag may be cached on the nodes from an earlier one.
image=$(cat "$D/berth-image")
# The local registries (and the tests' own, on the scratch ports) speak plain
# HTTP: the nodes' containerd knows; the coordinator, resolving tracked tags
# and handing out copies, must be told.
plain=$BERTH_REGISTRY,$BERTH_AUTH_REGISTRY
for p in ${BERTH_SCRATCH_PORTS:-}; do plain+=",$BERTH_REGISTRY_IP:$p"; done
kubectl -n berth-system set env deploy/berth-coordinator "BERTH_INSECURE_REGISTRIES=$plain" >/dev/null
kubectl -n berth-system set env ds/berth-debloater "BERTH_INSECURE_REGISTRIES=$plain" >/dev/null
# The harness's kubelets never collect images (imageGCHighThresholdPercent
# 100), and the disk guard counts use as they do, root-reserved blocks as
# used (on these VMs that alone is over half the disk): refuse pulls only
# near a full disk here, not at the 85 % default.
kubectl -n berth-system set env ds/berth-node-agent BERTH_DISK_THRESHOLD=97 >/dev/null
kubectl -n berth-system set image deploy/berth-coordinator "coordinator=$image" >/dev/null
kubectl -n berth-system set image ds/berth-node-agent "node-agent=$image" >/dev/null
kubectl -n berth-system set image ds/berth-debloater "debloater=$image" >/dev/null
kubectl -n berth-system rollout status deploy/berth-coordinator --timeout=180s
# The rollout is done when the new pods are available, but an old pod may
# still be terminating and still hold the Lease (and the Service's leader
# label). Wait until only current pods remain and one of them leads, so a
# port-forward to the Service reaches a coordinator that stays.
for _ in $(seq 600); do
  leaving=$(kubectl -n berth-system get pods -l app.kubernetes.io/name=berth-coordinator \
    -o jsonpath='{.items[?(@.metadata.deletionTimestamp)].metadata.name}')
  holder=$(kubectl -n berth-system get lease berth-coordinator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
  leader=$(kubectl -n berth-system get pods -l app.kubernetes.io/name=berth-coordinator,berth.dev/leader=true \
    -o jsonpath='{.items[*].metadata.name}')
  if [ -z "$leaving" ] && [ -n "$holder" ] && [ "$leader" = "$holder" ]; then break; fi
  sleep 0.5
done
[ -z "$leaving" ] && [ -n "$holder" ] && [ "$leader" = "$holder" ] ||
  { echo "no settled coordinator leader after 5 min (leaving: $leaving; lease: $holder; labelled: $leader)" >&2; exit 1; }
kubectl -n berth-system rollout status ds/berth-node-agent --timeout=180s
