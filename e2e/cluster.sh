#!/usr/bin/env bash
# Berth's local test cluster: a real Kubernetes control plane on loopback and on
# a bridge this script creates, and N worker nodes, each a kubelet + kube-proxy
# + containerd in its own network and mount namespace and cgroup root.
#
#   e2e/cluster.sh up            install what is missing, build, start (idempotent)
#   e2e/cluster.sh down          stop exactly what `up` started, remove mounts/netns
#   e2e/cluster.sh status        what runs
#   e2e/cluster.sh berth-image DIR   pack node-agent + coordinator from DIR, push
#   e2e/cluster.sh restart-containerd N [DOWN_SECONDS]   stop node N's containerd,
#                                wait (default 5 s), start it again (an upgrade)
#   e2e/cluster.sh env           print the file the tests read
#
# State lives in $BERTH_E2E_DIR (default /var/lib/berth-e2e), built tools in
# $BERTH_CACHE (default /var/cache/berth), both outside the checkout.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
D=${BERTH_E2E_DIR:-/var/lib/berth-e2e}
CACHE=${BERTH_CACHE:-/var/cache/berth}
BIN=$CACHE/bin
NODES=${BERTH_NODES:-2}
BR=berth0
BR_IP=172.31.250.1
REG=$BR_IP:5000          # plain registry
REG_AUTH=$BR_IP:5001     # htpasswd registry
# Ports the tests start registries of their own on (plain HTTP to the nodes),
# e.g. a source registry a backup test stops.
SCRATCH_PORTS="5002 5003 5004 5005 5006 5007 5008 5009"
AUTH_USER=berth
AUTH_PASSWORD=berth-e2e-secret
SVC_CIDR=10.96.0.0/16
DNS_IP=10.96.0.10
KUBE_VERSION=v1.34.4
COREDNS_VERSION=1.14.7
BERTH_IMAGE=ghcr.io/berth-dev/berth:0.1.0   # what manifests/ names; mirrored to $REG
export KUBECONFIG=$D/admin.kubeconfig
export PATH=$BIN:$PATH:/usr/local/go/bin:/usr/local/sbin:/usr/sbin:/sbin

log() { printf '[cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
node_name() { echo "berth-node-$1"; }
node_ip() { echo "172.31.250.$((10 + $1))"; }

# wait_for SECONDS DESCRIPTION COMMAND...: polls until COMMAND succeeds.
wait_for() {
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "timed out after ${secs}s waiting for $what (logs: $D/logs)"
    sleep 0.2
  done
}

# running PID: the process exists and is not a zombie (whose parent has not
# reaped it yet: it is gone for every purpose here).
running() { kill -0 "$1" 2>/dev/null && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]; }
alive() { local p; p=$(cat "$D/pids/$1.pid" 2>/dev/null) && running "$p"; }

# start NAME COMMAND...: runs COMMAND in the background unless NAME already runs.
start() {
  local name=$1; shift
  if alive "$name"; then return 0; fi
  nohup "$@" >"$D/logs/$name.log" 2>&1 &
  echo $! >"$D/pids/$name.pid"
}

stop() {
  local name=$1 p
  p=$(cat "$D/pids/$name.pid" 2>/dev/null) || return 0
  if kill "$p" 2>/dev/null; then
    for _ in $(seq 100); do running "$p" || break; sleep 0.1; done
    running "$p" && { log "$name ($p) did not stop; killing"; kill -9 "$p" 2>/dev/null || true; }
  fi
  rm -f "$D/pids/$name.pid"
}

# ---------------------------------------------------------------- install, build
deps() {
  local want=(containerd runc containernetworking-plugins etcd-server docker-registry iproute2
    iptables conntrack openssl protobuf-compiler busybox-static umoci skopeo apache2-utils curl jq
    util-linux ca-certificates systemd dbus mmdebstrap)
  local missing=()
  for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # The packaged daemons must not hold the paths the nodes use.
  for s in containerd docker-registry etcd; do
    if command -v systemctl >/dev/null && systemctl is-active -q "$s" 2>/dev/null; then systemctl stop "$s"; fi
  done
}

# go_build NAME MODULE_DIR [PACKAGE [LDFLAGS]]: builds once per content of the module dir.
go_build() {
  local name=$1 dir=$HERE/tools/$2 pkg=${3:-.} ldflags=${4:-} stamp
  stamp=$( (cat "$dir"/go.mod "$dir"/*.go "$dir"/go.sum 2>/dev/null; echo "$ldflags") | sha256sum | cut -c1-16)
  if [ -x "$BIN/$name" ] && [ "$(cat "$BIN/.$name.stamp" 2>/dev/null)" = "$stamp" ]; then return 0; fi
  log "building $name into $BIN (the first build of kube takes ~10 min on 2 cores)"
  mkdir -p "$BIN"
  (cd "$dir" && CGO_ENABLED=0 go build -buildvcs=false -trimpath -ldflags "$ldflags" -o "$BIN/$name.new" "$pkg") || die "go build of $name failed"
  mv "$BIN/$name.new" "$BIN/$name"
  echo "$stamp" >"$BIN/.$name.stamp"
}

build() {
  command -v go >/dev/null || die "go is required to build Kubernetes ($KUBE_VERSION)"
  local v=k8s.io/component-base/version minor=${KUBE_VERSION#v1.}
  minor=${minor%%.*}
  go_build kube kube . "-s -w -X $v.gitVersion=$KUBE_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean \
-X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
    ln -sf kube "$BIN/$c"
  done
  go_build coredns coredns
  go_build pause pause
  go_build grpcurl grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl
  docker_cli
  testcontainers_python
}

# testcontainers-python from PyPI in a venv of its own, for the Docker API
# tests: $BIN/tc-python/bin/python.
TC_PYTHON_VERSION=4.15.0
testcontainers_python() {
  local venv=$BIN/tc-python
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.stamp" 2>/dev/null)" = "$TC_PYTHON_VERSION" ]; then return 0; fi
  log "installing testcontainers-python $TC_PYTHON_VERSION from PyPI"
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv failed"
  "$venv/bin/pip" install -q "testcontainers==$TC_PYTHON_VERSION" || die "pip could not install testcontainers"
  echo "$TC_PYTHON_VERSION" >"$venv/.stamp"
}

# The docker CLI from Debian's docker.io package, unpacked without installing
# (the package would also install and start a Docker engine; Berth is the
# engine here).
docker_cli() {
  local version
  version=$(apt-cache policy docker.io | awk '/Candidate:/ {print $2}')
  [ -n "$version" ] && [ "$version" != "(none)" ] || die "apt has no docker.io package (run apt-get update?)"
  if [ -x "$BIN/docker" ] && [ "$(cat "$BIN/.docker.stamp" 2>/dev/null)" = "$version" ]; then return 0; fi
  log "unpacking the docker CLI $version from Debian's docker.io"
  local tmp
  tmp=$(mktemp -d) && chmod 755 "$tmp"
  (cd "$tmp" && apt-get download -qq "docker.io=$version" && dpkg-deb -x docker.io_*.deb x) || die "could not download docker.io"
  install -m 0755 "$tmp/x/usr/bin/docker" "$BIN/docker"
  rm -rf "$tmp"
  echo "$version" >"$BIN/.docker.stamp"
}

# ---------------------------------------------------------------- PKI
pki() {
  [ -f "$D/pki/.done" ] && return 0
  log "creating PKI"
  mkdir -p "$D/pki" && cd "$D/pki"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj /CN=berth-e2e-ca 2>/dev/null
  cert() {
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
    printf '%s\n' "$3" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 3650 -extfile "$1.ext" 2>/dev/null
  }
  cert apiserver /CN=kube-apiserver "subjectAltName=IP:127.0.0.1,IP:$BR_IP,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
  cert admin "/O=system:masters/CN=admin" extendedKeyUsage=clientAuth
  cert kcm /CN=system:kube-controller-manager extendedKeyUsage=clientAuth
  cert sched /CN=system:kube-scheduler extendedKeyUsage=clientAuth
  cert proxy /CN=system:kube-proxy extendedKeyUsage=clientAuth
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" extendedKeyUsage=clientAuth
  local users=(admin kcm sched proxy)
  for i in $(seq "$NODES"); do
    cert "kubelet$i" "/O=system:nodes/CN=system:node:$(node_name "$i")" "subjectAltName=IP:$(node_ip "$i")
extendedKeyUsage=clientAuth,serverAuth"
    users+=("kubelet$i")
  done
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  for u in "${users[@]}"; do
    cat >"$D/$u.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: berth-e2e
  cluster: {server: "https://$BR_IP:6443", certificate-authority: $D/pki/ca.crt}
users:
- name: $u
  user: {client-certificate: $D/pki/$u.crt, client-key: $D/pki/$u.key}
contexts:
- name: berth-e2e
  context: {cluster: berth-e2e, user: $u}
current-context: berth-e2e
EOF
  done
  touch .done
  cd - >/dev/null
}

# ---------------------------------------------------------------- network
net() {
  if ! ip link show $BR >/dev/null 2>&1; then
    ip link add $BR type bridge
    ip addr add $BR_IP/24 dev $BR
  fi
  ip link set $BR up
  for i in $(seq "$NODES"); do
    local n; n=$(node_name "$i")
    if [ ! -e "/run/netns/$n" ]; then
      ip netns add "$n"
      ip link add "bv$i" type veth peer name eth0 netns "$n"
      ip link set "bv$i" master $BR up
      ip -n "$n" addr add "$(node_ip "$i")/24" dev eth0
      ip -n "$n" link set eth0 up
      ip -n "$n" link set lo up
      ip -n "$n" route add default via $BR_IP
      ip netns exec "$n" sysctl -qw net.ipv4.ip_forward=1
      for j in $(seq "$NODES"); do
        [ "$j" = "$i" ] || ip -n "$n" route add "10.244.$j.0/24" via "$(node_ip "$j")"
      done
    fi
    ip route replace "10.244.$i.0/24" via "$(node_ip "$i")"
  done
}

# ---------------------------------------------------------------- control plane
registries() {
  mkdir -p "$D/registry/plain" "$D/registry/auth"
  [ -f "$D/registry/htpasswd" ] || htpasswd -Bbc "$D/registry/htpasswd" "$AUTH_USER" "$AUTH_PASSWORD" 2>/dev/null
  local name addr dir extra
  for name in plain auth; do
    if [ $name = plain ]; then addr=$REG; extra=""; else addr=$REG_AUTH; extra="auth:
  htpasswd:
    realm: berth-e2e
    path: $D/registry/htpasswd"; fi
    dir=$D/registry/$name
    cat >"$dir.yml" <<EOF
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $dir}
  delete: {enabled: true}
http: {addr: "$addr"}
$extra
EOF
    start "registry-$name" /usr/bin/docker-registry serve "$dir.yml"
  done
  wait_for 20 "registry $REG" curl -sf "http://$REG/v2/"
  wait_for 20 "registry $REG_AUTH" curl -s -o /dev/null -w '%{http_code}' "http://$REG_AUTH/v2/"
}

# The apiserver's audit log records every request of Berth's coordinator
# (only those), so benchmarks count its writes, TokenReviews and
# SubjectAccessReviews where they land, not with Berth's own counters.
audit_policy() {
  cat >"$D/audit-policy.yaml" <<EOF
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: ["system:serviceaccount:berth-system:berth-coordinator"]
- level: None
EOF
}

control_plane() {
  local P=$D/pki
  audit_policy
  start etcd etcd --name berth-e2e --data-dir "$D/etcd" \
    --listen-client-urls http://127.0.0.1:23790 --advertise-client-urls http://127.0.0.1:23790 \
    --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster berth-e2e=http://127.0.0.1:23800 --listen-metrics-urls http://127.0.0.1:23810
  wait_for 30 etcd curl -sf http://127.0.0.1:23790/health
  start kube-apiserver "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:23790 \
    --bind-address=$BR_IP --advertise-address=$BR_IP --secure-port=6443 \
    --service-cluster-ip-range=$SVC_CIDR \
    --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" --client-ca-file="$P/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" --kubelet-client-key="$P/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$P/ca.crt" \
    --kubelet-preferred-address-types=InternalIP \
    --authorization-mode=Node,RBAC --allow-privileged=true \
    --enable-admission-plugins=NodeRestriction \
    --audit-policy-file="$D/audit-policy.yaml" --audit-log-path="$D/logs/audit.log" \
    --audit-log-format=json --audit-log-maxsize=200 --audit-log-maxbackup=1
  wait_for 90 kube-apiserver kubectl get --raw /readyz
  start kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig="$D/kcm.kubeconfig" \
    --authentication-kubeconfig="$D/kcm.kubeconfig" --authorization-kubeconfig="$D/kcm.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10357 --leader-elect=false \
    --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" --use-service-account-credentials=true \
    --cluster-signing-cert-file="$P/ca.crt" --cluster-signing-key-file="$P/ca.key" \
    --service-cluster-ip-range=$SVC_CIDR
  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$D/sched.kubeconfig" \
    --authentication-kubeconfig="$D/sched.kubeconfig" --authorization-kubeconfig="$D/sched.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10359 --leader-elect=false
}

# ---------------------------------------------------------------- nodes
node_config() {
  local i=$1 n N ip
  n=$(node_name "$i"); N=$D/nodes/$n; ip=$(node_ip "$i")
  mkdir -p "$N"/{run,root,opt,kubelet,pods-logs,containers-logs,netns,cni-net,cni-ipam,cni-cache,cgtmp,certs.d,berth}
  local host
  local scratch=() p
  for p in $SCRATCH_PORTS; do scratch+=("$BR_IP:$p"); done
  for host in $REG $REG_AUTH "${scratch[@]}"; do
    mkdir -p "$N/certs.d/$host"
    printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$host" "$host" >"$N/certs.d/$host/hosts.toml"
  done
  # Berth's published image name resolves to the local registry, so that
  # `kubectl apply -f manifests` works here unchanged.
  mkdir -p "$N/certs.d/ghcr.io"
  printf 'server = "https://ghcr.io"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' "$REG" >"$N/certs.d/ghcr.io/hosts.toml"
  cat >"$N/containerd.toml" <<EOF
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$N/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$REG/pause:3.10"
  stream_server_address = "$ip"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "/run/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$N/cni-net"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$N/certs.d"
EOF
  cat >"$N/cni-net/10-berth.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "berth-pods", "plugins": [
 {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
  "ipam": {"type": "host-local", "dataDir": "$N/cni-ipam", "ranges": [[{"subnet": "10.244.$i.0/24"}]],
           "routes": [{"dst": "0.0.0.0/0"}]}},
 {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  cat >"$N/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $D/pki/kubelet$i.crt
tlsPrivateKeyFile: $D/pki/kubelet$i.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $D/pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /$n
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
clusterDomain: cluster.local
clusterDNS: [$DNS_IP]
resolvConf: /etc/resolv.conf
serializeImagePulls: false
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
  cat >"$N/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $D/proxy.kubeconfig}
hostnameOverride: $n
bindAddress: $ip
clusterCIDR: 10.244.0.0/16
mode: iptables
iptables: {masqueradeAll: true}
conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
EOF
  local c
  for c in /sys/fs/cgroup/*/; do
    case $c in */unified/) continue ;; esac
    mkdir -p "$c$n"
  done
  if [ -d /sys/fs/cgroup/cpuset ]; then
    cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$n/cpuset.cpus"
    cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$n/cpuset.mems"
  fi
}

# Runs inside `nsenter --net=/run/netns/NODE unshare -m --propagation private`:
# gives the node its own /run/containerd, /var/lib/containerd, /run/netns,
# /var/lib/berth, log and CNI dirs and a
# sysfs of its network namespace, then starts containerd, kubelet, kube-proxy.
node_inner() {
  local i=$1 n N ip
  n=$(node_name "$i"); N=$D/nodes/$n; ip=$(node_ip "$i")
  mkdir -p /run/containerd /run/netns /var/log/pods /var/log/containers /var/lib/cni /var/lib/berth \
    /var/lib/containerd
  mount --bind "$N/run" /run/containerd
  mount --bind "$N/netns" /run/netns
  mount --bind "$N/pods-logs" /var/log/pods
  mount --bind "$N/containers-logs" /var/log/containers
  mount --bind "$N/cni-cache" /var/lib/cni
  mount --bind "$N/berth" /var/lib/berth
  mount --bind "$N/root" /var/lib/containerd
  mount --rbind /sys/fs/cgroup "$N/cgtmp"
  mount -t sysfs sysfs /sys
  mount --rbind "$N/cgtmp" /sys/fs/cgroup
  umount -l "$N/cgtmp"
  start "containerd-$i" /usr/bin/containerd --config "$N/containerd.toml"
  wait_for 30 "containerd on $n" test -S /run/containerd/containerd.sock
  start "kubelet-$i" "$BIN/kubelet" --config="$N/kubelet.yaml" --kubeconfig="$D/kubelet$i.kubeconfig" \
    --root-dir="$N/kubelet" --hostname-override="$n" --node-ip="$ip" -v=1
  start "kube-proxy-$i" "$BIN/kube-proxy" --config="$N/kube-proxy.yaml"
}

nodes() {
  for i in $(seq "$NODES"); do
    local n; n=$(node_name "$i")
    if alive "containerd-$i" && alive "kubelet-$i" && alive "kube-proxy-$i"; then continue; fi
    # A half-started node is restarted whole.
    stop_node "$i"
    node_config "$i"
    log "starting node $n"
    nsenter --net="/run/netns/$n" unshare -m --propagation private "$HERE/cluster.sh" node-inner "$i"
    readlink "/proc/$(cat "$D/pids/containerd-$i.pid")/ns/mnt" >"$D/pids/mntns-$i"
  done
}

# restart_containerd N [DOWN_SECONDS]: what a runtime upgrade does to node N.
# Stops its containerd (SIGTERM, waits for it to exit), waits DOWN_SECONDS,
# and starts it again with the node's config in the node's network and mount
# namespaces (entered through its kubelet, which lives in both), appending to
# the same log. Pods keep running meanwhile: their shims are processes of
# their own, and containerd reconnects to them (sockets under the node's
# /run/containerd) when it starts.
restart_containerd() {
  local i=${1:?usage: cluster.sh restart-containerd N [DOWN_SECONDS]} down=${2:-5}
  local n N S kp
  n=$(node_name "$i"); N=$D/nodes/$n; S=$N/run/containerd.sock
  alive "kubelet-$i" || die "node $n is not running (no kubelet-$i)"
  alive "containerd-$i" || die "containerd of $n is not running"
  kp=$(cat "$D/pids/kubelet-$i.pid")
  log "stopping containerd on $n for ${down}s"
  stop "containerd-$i"
  sleep "$down"
  # Appends, so the log keeps the run before the restart.
  nohup nsenter -t "$kp" -m -n /usr/bin/containerd --config "$N/containerd.toml" \
    >>"$D/logs/containerd-$i.log" 2>&1 &
  echo $! >"$D/pids/containerd-$i.pid"
  wait_for 30 "containerd on $n to answer again" ctr -a "$S" version
  [ "$(readlink "/proc/$(cat "$D/pids/containerd-$i.pid")/ns/mnt")" = "$(cat "$D/pids/mntns-$i")" ] ||
    die "the restarted containerd of $n is not in the node's mount namespace"
  log "containerd on $n is back (pid $(cat "$D/pids/containerd-$i.pid"))"
}

stop_node() {
  local i=$1 n S
  n=$(node_name "$i"); S=$D/nodes/$n/run/containerd.sock
  stop "kube-proxy-$i"
  stop "kubelet-$i"
  if [ -S "$S" ] && alive "containerd-$i"; then
    local t
    for t in $(ctr -a "$S" -n k8s.io tasks ls -q 2>/dev/null); do ctr -a "$S" -n k8s.io tasks kill -s KILL "$t" >/dev/null 2>&1 || true; done
    sleep 0.5
    for t in $(ctr -a "$S" -n k8s.io containers ls -q 2>/dev/null); do
      ctr -a "$S" -n k8s.io tasks delete "$t" >/dev/null 2>&1 || true
    done
  fi
  stop "containerd-$i"
  # Whatever is left in the node's mount namespace (shims, containers) goes too.
  if [ -f "$D/pids/mntns-$i" ]; then
    local m p
    m=$(cat "$D/pids/mntns-$i")
    for p in /proc/[0-9]*; do
      [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$m" ] && kill -9 "${p#/proc/}" 2>/dev/null || true
    done
    rm -f "$D/pids/mntns-$i"
  fi
  # Pod network namespaces are bind mounts under the node's netns dir.
  local f
  for f in "$D/nodes/$n/netns"/*; do [ -e "$f" ] && { umount "$f" 2>/dev/null || true; rm -f "$f"; }; done
  local c
  for c in /sys/fs/cgroup/*/"$n"; do
    [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

# ---------------------------------------------------------------- images
# pack NAME TAG POPULATE ENTRYPOINT...: an OCI image whose rootfs POPULATE fills,
# pushed to the plain registry as NAME:TAG.
pack() {
  local name=$1 tag=$2 populate=$3; shift 3
  local L=$D/images/layout B=$D/images/bundle-$name
  mkdir -p "$D/images"
  [ -d "$L" ] || umoci init --layout "$L"
  umoci rm --image "$L:$name" 2>/dev/null || true
  umoci new --image "$L:$name"
  rm -rf "$B"
  umoci unpack --image "$L:$name" "$B" >/dev/null
  "$populate" "$B/rootfs"
  umoci repack --image "$L:$name" "$B"
  local args=(--architecture amd64 --os linux)
  local e; for e in "$@"; do args+=(--config.entrypoint "$e"); done
  umoci config --image "$L:$name" "${args[@]}" --config.env PATH=/usr/local/bin:/bin:/usr/bin
  skopeo copy -q --dest-tls-verify=false "oci:$L:$name" "docker://$REG/$name:$tag"
  rm -rf "$B"
}

rootfs_pause() { install -m 0755 "$BIN/pause" "$1/pause"; }
rootfs_coredns() { install -m 0755 "$BIN/coredns" "$1/coredns"; }
rootfs_busybox() {
  mkdir -p "$1/bin" "$1/tmp" "$1/etc"
  install -m 0755 /bin/busybox "$1/bin/busybox"
  "$1/bin/busybox" --list | while read -r a; do [ "$a" = busybox ] || ln -sf busybox "$1/bin/$a"; done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$1/etc/passwd"
  echo 'root:x:0:' >"$1/etc/group"
  echo "${BUSYBOX_MARK:-}" >"$1/etc/berth-test-image"
}

images() {
  [ -f "$D/images/.done" ] && return 0
  log "packing the pause, CoreDNS and test images"
  pack pause 3.10 rootfs_pause /pause
  pack coredns $COREDNS_VERSION rootfs_coredns /coredns
  pack busybox 1.36 rootfs_busybox /bin/sh
  # Small distinct test images (different content, so different IDs).
  local t
  for t in a b c d e f g; do
    BUSYBOX_MARK=$t pack "test/$t" 1 rootfs_busybox /bin/sh
  done
  # A private image, only in the htpasswd registry.
  skopeo copy -q --src-tls-verify=false --dest-tls-verify=false --dest-creds "$AUTH_USER:$AUTH_PASSWORD" \
    "docker://$REG/test/a:1" "docker://$REG_AUTH/private/a:1"
  touch "$D/images/.done"
}

# berth-image DIR: packs DIR/node-agent and DIR/coordinator with the shared
# libraries they link, pushes them, and writes the image's by-digest name to
# $D/berth-image (so a rebuilt image is rolled out even where the tag is cached).
berth_image() {
  local dir=${1:?usage: cluster.sh berth-image DIR}
  [ -x "$dir/node-agent" ] && [ -x "$dir/coordinator" ] || die "$dir has no node-agent and coordinator binaries"
  BERTH_BIN_DIR=$dir
  rootfs_berth() {
    mkdir -p "$1/usr/local/bin" "$1/etc" "$1/tmp"
    install -m 0755 "$BERTH_BIN_DIR/node-agent" "$BERTH_BIN_DIR/coordinator" "$1/usr/local/bin/"
    local lib
    for lib in $(ldd "$BERTH_BIN_DIR/node-agent" "$BERTH_BIN_DIR/coordinator" | grep -oE '/[^ ]+\.so[^ ]*' | sort -u); do
      mkdir -p "$1$(dirname "$lib")"
      cp -L "$lib" "$1$lib"
    done
    # CA certificates, for registries over HTTPS.
    mkdir -p "$1/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/"
    echo 'root:x:0:0:root:/:/sbin/nologin' >"$1/etc/passwd"
    echo 'hosts: files dns' >"$1/etc/nsswitch.conf"
  }
  local repo=${BERTH_IMAGE#*/} ; repo=${repo%:*}
  local tag=${BERTH_IMAGE##*:}
  pack "$repo" "$tag" rootfs_berth /usr/local/bin/node-agent
  local digest
  digest=$(skopeo inspect --tls-verify=false --format '{{.Digest}}' "docker://$REG/$repo:$tag")
  echo "${BERTH_IMAGE%:*}@$digest" >"$D/berth-image"
  log "pushed $REG/$repo:$tag = $digest (served as $BERTH_IMAGE)"
}

# ---------------------------------------------------------------- DNS, env
dns() {
  sed -e "s|@IMAGE@|$REG/coredns:$COREDNS_VERSION|" -e "s|@DNS_IP@|$DNS_IP|" "$HERE/cluster/coredns.yaml" |
    kubectl apply -f - >/dev/null
}

write_env() {
  {
    echo "KUBECONFIG=$KUBECONFIG"
    echo "BERTH_REGISTRY=$REG"
    echo "BERTH_AUTH_REGISTRY=$REG_AUTH"
    echo "BERTH_AUTH_USER=$AUTH_USER"
    echo "BERTH_AUTH_PASSWORD=$AUTH_PASSWORD"
    echo "BERTH_SCRATCH_PORTS=\"$SCRATCH_PORTS\""
    echo "BERTH_REGISTRY_IP=$BR_IP"
    echo "BERTH_BIN=$BIN"
    echo "BERTH_E2E_DIR=$D"
    echo "BERTH_AUDIT_LOG=$D/logs/audit.log"
    local nodes=() i
    for i in $(seq "$NODES"); do nodes+=("$(node_name "$i")"); done
    echo "BERTH_NODES=\"${nodes[*]}\""
  } >"$D/env"
}

nodes_registered() { [ "$(kubectl get nodes --no-headers 2>/dev/null | wc -l)" -ge "$NODES" ]; }

up() {
  [ "$(id -u)" = 0 ] || die "run as root: the cluster needs network namespaces, mounts and cgroups"
  local t0=$SECONDS
  mkdir -p "$D/logs" "$D/pids"
  deps
  build
  pki
  net
  registries
  control_plane
  images
  nodes
  wait_for 120 "every node to register" nodes_registered
  kubectl wait --for=condition=Ready node --all --timeout=120s >/dev/null || die "nodes not Ready (logs: $D/logs)"
  wait_for 60 "the default ServiceAccount" kubectl get serviceaccount default
  dns
  kubectl -n kube-system rollout status deploy/coredns --timeout=180s >/dev/null || die "CoreDNS did not start"
  write_env
  log "cluster up in $((SECONDS - t0))s: $(kubectl get nodes --no-headers | awk '{printf "%s(%s) ", $1, $2}')"
  log "export KUBECONFIG=$KUBECONFIG"
}

down() {
  local i
  for i in $(seq "$NODES"); do stop_node "$i"; done
  for n in kube-scheduler kube-controller-manager kube-apiserver etcd registry-plain registry-auth; do stop "$n"; done
  for i in $(seq "$NODES"); do
    ip netns del "$(node_name "$i")" 2>/dev/null || true
    ip route del "10.244.$i.0/24" 2>/dev/null || true
  done
  ip link del $BR 2>/dev/null || true
  # Fresh state next time; keep the PKI-independent caches (images are rebuilt).
  rm -rf "$D/etcd" "$D/nodes" "$D/images" "$D/registry" "$D/env"
  local left; left=$(grep -c "$D" /proc/mounts || true)
  log "down (mounts left under $D: $left)"
}

status() {
  local f
  for f in "$D"/pids/*.pid; do
    [ -e "$f" ] || continue
    local n; n=$(basename "$f" .pid)
    if alive "$n"; then echo "running  $n ($(cat "$f"))"; else echo "dead     $n"; fi
  done
  kubectl get nodes -o wide 2>/dev/null || true
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  build) build ;;
  deps) deps ;;
  env) cat "$D/env" ;;
  berth-image) shift; berth_image "$@" ;;
  restart-containerd) shift; restart_containerd "$@" ;;
  node-inner) shift; node_inner "$@" ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
