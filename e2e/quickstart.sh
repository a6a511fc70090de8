#!/usr/bin/env bash
# Quick start, on a fresh machine as root: brings up the local two-node
# cluster, installs Berth with `kubectl apply -f manifests`, pulls a sample
# image on one node with the agent's command line, shows with grpcurl what
# the coordinator knows of every node, and caches two images on every node
# with an ImageCache, then runs a container through the Docker API (the
# docker CLI against docker-shim). The cluster stays up;
# `e2e/cluster.sh down` removes it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=${BERTH_E2E_DIR:-/var/lib/berth-e2e}
say() { printf '\n\033[1m$ %s\033[0m\n' "$*" >&2; }

"$ROOT/e2e/cluster.sh" up
"$ROOT/e2e/install-berth.sh"
set -a; . "$D/env"; set +a
export PATH=$BERTH_BIN:$PATH

node=${BERTH_NODES%% *}
agent=$(kubectl -n berth-system get pods -l app.kubernetes.io/name=berth-node-agent \
  --field-selector spec.nodeName="$node" -o jsonpath='{.items[0].metadata.name}')
say kubectl -n berth-system exec "$agent" -- node-agent images pull "$BERTH_REGISTRY/test/a:1"
kubectl -n berth-system exec "$agent" -- node-agent images pull "$BERTH_REGISTRY/test/a:1"
say kubectl -n berth-system exec "$agent" -- node-agent images ls
kubectl -n berth-system exec "$agent" -- node-agent images ls

# A ServiceAccount that may read the API (ClusterRole berth-viewer), and grpcurl
# over TLS with the coordinator's CA and that account's token.
kubectl -n berth-system create serviceaccount berth-viewer --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl create clusterrolebinding berth-viewer --clusterrole=berth-viewer \
  --serviceaccount=berth-system:berth-viewer --dry-run=client -o yaml | kubectl apply -f - >/dev/null
CA="<(kubectl -n berth-system get cm berth-ca -o jsonpath='{.data.ca\\.crt}')"
TOKEN='"authorization: Bearer $(kubectl -n berth-system create token berth-viewer)"'
token=$(kubectl -n berth-system create token berth-viewer)
api() {
  grpcurl -cacert <(kubectl -n berth-system get cm berth-ca -o jsonpath='{.data.ca\.crt}') \
    -servername berth-coordinator.berth-system.svc -H "authorization: Bearer $token" "$@"
}

kubectl -n berth-system port-forward --address 127.0.0.1 svc/berth-coordinator 17070:7070 >/dev/null 2>&1 &
pf=$!
trap 'kill $pf 2>/dev/null' EXIT
until api 127.0.0.1:17070 list >/dev/null 2>&1; do sleep 0.2; done
sleep 3 # the agent reports image changes within its 2 s poll
say grpcurl -cacert "$CA" -servername berth-coordinator.berth-system.svc 127.0.0.1:17070 list
api 127.0.0.1:17070 list
say grpcurl -cacert "$CA" -servername berth-coordinator.berth-system.svc -H "$TOKEN" 127.0.0.1:17070 berth.v1.Inventory/ListNodes
api 127.0.0.1:17070 berth.v1.Inventory/ListNodes
for n in $BERTH_NODES; do
  say grpcurl -cacert "$CA" -servername berth-coordinator.berth-system.svc -H "$TOKEN" -d "{\"node\": \"$n\"}" 127.0.0.1:17070 berth.v1.Inventory/ListNodeImages
  api -d "{\"node\": \"$n\"}" 127.0.0.1:17070 berth.v1.Inventory/ListNodeImages |
    jq -r '.node as $n | .images[] | "\($n)  \(.repoTags[0] // .id)  \(.sizeBytes) bytes\(if .inUse then "  (in use)" else "" end)"'
done
say "kubectl apply -f - (an ImageCache of test/b:1 and test/c:1 on every node)"
kubectl apply -f - <<EOF
apiVersion: berth.dev/v1alpha1
kind: ImageCache
metadata: {name: sample, namespace: default}
spec:
  images: [{ref: "$BERTH_REGISTRY/test/b:1"}, {ref: "$BERTH_REGISTRY/test/c:1"}]
  deletionPolicy: RemoveFromNodes
EOF
kubectl wait --for=jsonpath='{.status.phase}'=Ready imagecache/sample --timeout=120s >/dev/null
say kubectl get imagecaches
kubectl get imagecaches
say grpcurl -cacert "$CA" -servername berth-coordinator.berth-system.svc -H "$TOKEN" -d \''{"namespace": "default", "name": "sample"}'\' 127.0.0.1:17070 berth.v1.Inventory/GetImageCache
api -d '{"namespace": "default", "name": "sample"}' 127.0.0.1:17070 berth.v1.Inventory/GetImageCache |
  jq -r '.nodes[] | .node as $n | .images[] | "\($n)  \(.ref)  \(.state)"'
# The Docker API: a namespace where the coordinator may run containers, an
# account that may use them there, a shim on this machine reaching the
# coordinator through the port-forward, and the docker CLI pointed at it.
ns=docker-demo
kubectl create namespace $ns --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n $ns create rolebinding berth-container-runner --clusterrole=berth-container-runner \
  --serviceaccount=berth-system:berth-coordinator --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n $ns create serviceaccount docker --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n $ns create role docker --verb=create,get,list,delete --resource=pods,services \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n $ns create role docker-streams --verb=get,create --resource=pods/log,pods/exec,pods/attach,pods/portforward \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
for r in docker docker-streams; do
  kubectl -n $ns create rolebinding $r --role=$r --serviceaccount=$ns:docker \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
done
shim_dir=$(mktemp -d)
kubectl -n berth-system get cm berth-ca -o jsonpath='{.data.ca\.crt}' >"$shim_dir/ca.crt"
kubectl -n $ns create token docker >"$shim_dir/token"
say docker-shim --coordinator https://127.0.0.1:17070 --ca-file berth-ca.crt --token-file docker.token --namespace $ns --listen 127.0.0.1:12475 '&'
"${CARGO_TARGET_DIR:-/var/cache/berth/target}/debug/docker-shim" --coordinator https://127.0.0.1:17070 \
  --ca-file "$shim_dir/ca.crt" --token-file "$shim_dir/token" --namespace $ns \
  --listen 127.0.0.1:12475 2>"$shim_dir/shim.log" &
shim=$!
trap 'kill $pf $shim 2>/dev/null; rm -rf "$shim_dir"' EXIT
until curl -sf http://127.0.0.1:12475/_ping >/dev/null; do sleep 0.1; done
export DOCKER_HOST=tcp://127.0.0.1:12475
say docker run --rm --entrypoint sh "$BERTH_REGISTRY/busybox:1.36" -c "'echo out; echo err >&2; exit 3'"
set +e
docker run --rm --entrypoint sh "$BERTH_REGISTRY/busybox:1.36" -c 'echo out; echo err >&2; exit 3'
code=$?
set -e
echo "(exit code $code)"
[ "$code" = 3 ] || { cat "$shim_dir/shim.log" >&2; exit 1; }

printf '\nBerth is running. export KUBECONFIG=%s; e2e/cluster.sh down removes the cluster.\n' "$KUBECONFIG"
