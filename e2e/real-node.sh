#!/usr/bin/env bash
# A real single-node Kubernetes for the e2e tests, on this machine, from Debian's containerd,
# runc and CNI plugins and the control plane's own pinned Go module (e2e/controlplane/kube):
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a kubelet. Pods, Jobs, init
# containers and Deployments really run; images are imported into containerd (no registry).
#
#   e2e/real-node.sh run [--image TAR]... [--] COMMAND [ARGS...]
#       Starts the node, imports each docker-archive TAR, runs COMMAND with the environment
#       below, then stops everything and undoes every change to the host, whatever COMMAND's
#       outcome (and on Ctrl-C / SIGTERM). Exits with COMMAND's status.
#   e2e/real-node.sh clean
#       Undoes what a run that was SIGKILLed left behind (every run does this first, too).
#
# COMMAND sees:
#   KUBECONFIG             admin kubeconfig (system:masters)
#   CUTOVER_NODE_API       the API server's URL (https://GATEWAY:PORT)
#   CUTOVER_NODE_KUBECTL   the kubectl built with the control plane
#   CUTOVER_NODE_NAME      the node's name
#   CUTOVER_NODE_GATEWAY   the pod bridge's own address (pods reach the host there)
#   CUTOVER_NODE_DIR       the bed's folder (logs: *.log)
#
# Only one node runs on a machine at a time: runs are serialised with a lock file (a second run
# waits for the first). Needs root (containerd, mounts, cgroups, network namespaces).
#
# Network: every component listens on loopback, except the API server and the kubelet's API, on
# the pod bridge's own address (the gateway, the node's InternalIP): pods reach the API server
# there (no kube-proxy runs: a pod talking to the API server is given KUBERNETES_SERVICE_HOST and
# _PORT naming it), the API server reaches the kubelet there for logs and exec. Pods sit
# on a bridge of their own (cutover0, 10.88.0.0/24) with no masquerading: they reach the host
# at the bridge's address and nothing beyond. The kubelet is told not to make its iptables
# chains (makeIPTablesUtilChains: false) — its KUBE-FIREWALL chain drops loopback traffic that
# does not come from loopback — and the bed checks that none appeared.
#
# Host changes, each undone by `stop`: the bridge, network namespaces under /run/netns (and the
# bind mount containerd makes of /run/netns), /run/containerd, /var/lib/cni, /var/lib/kubelet,
# /var/log/containers and /var/log/pods (when they did not exist before), net.ipv4.ip_forward,
# the kubepods and k8s.io cgroups in every cgroup v1 hierarchy, mounts under the bed's folder,
# and any KUBE-* iptables chain. What existed before the run is recorded and left alone.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# iptables, runc and friends live in sbin, which a non-login root shell may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
root="$(cd "$here/.." && pwd)"

NODE_NAME=cutover-e2e-node
BRIDGE=cutover0
SUBNET=10.88.0.0/24
GATEWAY=10.88.0.1
SERVICE_RANGE=10.0.0.0/24
PAUSE_IMAGE=cutover.local/pause:e2e
STATE="${CUTOVER_NODE_STATE:-/var/tmp/cutover-e2e-node}"
LOCK=/run/lock/cutover-e2e-node.lock
START_TIMEOUT=120

log() { printf 'real-node: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# ------------------------------------------------------------------------------------------
# Cleaning up: idempotent, safe to run on a half-started or killed bed, never fails.

# Kills the processes whose pid files are in the bed (started by this script).
kill_bed_processes() {
    local pidfile pid
    for name in kubelet kube-scheduler kube-controller-manager containerd kube-apiserver etcd; do
        pidfile="$STATE/$name.pid"
        [[ -f "$pidfile" ]] || continue
        pid="$(cat "$pidfile")"
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null &&
            [[ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" == *"/$name" ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            local deadline=$((SECONDS + 15))
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
    # The containerd shims of our pods outlive containerd: they are the ones serving our socket.
    local sock="$STATE/containerd/containerd.sock"
    for pid in $(pgrep -f -- "containerd-shim-runc-v2 .*-address $sock" 2>/dev/null || true); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    # Containers whose shim is gone: runc's state for the k8s.io namespace, which is ours
    # only when /run/containerd did not exist before the bed (no other containerd here).
    local runc_root=/run/containerd/runc/k8s.io
    if [[ -d "$runc_root" ]] && ! had "dir:/run/containerd" && command -v runc >/dev/null; then
        for id in $(runc --root "$runc_root" list -q 2>/dev/null || true); do
            runc --root "$runc_root" kill "$id" KILL 2>/dev/null || true
            runc --root "$runc_root" delete --force "$id" 2>/dev/null || true
        done
    fi
}

remove_cgroups() {
    local h name
    for h in /sys/fs/cgroup/*/; do
        for name in kubepods k8s.io; do
            [[ -d "$h$name" ]] || continue
            grep -qx "cgroup:$h$name" "$STATE/host.before" 2>/dev/null && continue
            find "$h$name" -depth -type d -exec rmdir {} \; 2>/dev/null || true
        done
    done
}

remove_iptables_chains() {
    local ipt table chain
    for ipt in iptables ip6tables; do
        command -v "$ipt" >/dev/null || continue
        for table in filter nat mangle; do
            for chain in $("$ipt" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ { print $2 }'); do
                grep -qx "iptables:$ipt:$table:$chain" "$STATE/host.before" 2>/dev/null && continue
                # Every jump to it first, then the chain.
                "$ipt" -t "$table" -S 2>/dev/null | awk -v c="$chain" '$1 == "-A" && / -j / { for (i = 1; i <= NF; i++) if ($i == "-j" && $(i+1) == c) print }' |
                    while read -r rule; do
                        # shellcheck disable=SC2086
                        "$ipt" -t "$table" ${rule/-A/-D} 2>/dev/null || true
                    done
                "$ipt" -t "$table" -F "$chain" 2>/dev/null || true
                "$ipt" -t "$table" -X "$chain" 2>/dev/null || true
                log "removed the iptables chain $chain ($ipt, $table)"
            done
        done
    done
}

had() { grep -qx "$1" "$STATE/host.before" 2>/dev/null; }

# Best effort from top to bottom: a step that finds nothing to undo must not stop the others.
clean() { (
    set +e +o pipefail
    clean_steps
); }

clean_steps() {
    [[ -d "$STATE" ]] || return 0
    log "stopping the node and undoing its host changes"
    kill_bed_processes
    # Mounts under the bed (the kubelet's root dir and pod volumes, overlay snapshots).
    findmnt -rn -o TARGET 2>/dev/null | grep -F "$STATE" | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
    # Network namespaces made for our pods.
    if [[ -d /run/netns ]]; then
        for ns in /run/netns/cni-*; do
            [[ -e "$ns" ]] || continue
            had "netns:$ns" && continue
            umount -l "$ns" 2>/dev/null || true
            rm -f "$ns"
        done
        if ! had "mount:/run/netns" && mountpoint -q /run/netns; then
            umount -l /run/netns 2>/dev/null || true
        fi
        if ! had "dir:/run/netns"; then
            rmdir /run/netns 2>/dev/null || true
        fi
    fi
    ip link del "$BRIDGE" 2>/dev/null || true
    local d
    for d in /run/containerd /var/lib/cni /var/lib/kubelet /var/log/containers /var/log/pods; do
        [[ -e "$d" ]] || continue
        if ! had "dir:$d"; then
            findmnt -rn -o TARGET | grep -F "$d" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
            rm -rf "$d"
        fi
    done
    remove_cgroups
    remove_iptables_chains
    local forward
    forward="$(sed -n 's/^sysctl:net.ipv4.ip_forward=//p' "$STATE/host.before" 2>/dev/null || true)"
    if [[ -n "$forward" ]]; then
        sysctl -qw "net.ipv4.ip_forward=$forward" || true
    fi
    rm -rf "$STATE"
}

# Records what exists before the bed changes anything, so `clean` leaves it alone.
record_host() { (
    set +e +o pipefail
    record_host_steps
); }

record_host_steps() {
    local f="$STATE/host.before"
    : >"$f"
    local d
    for d in /run/netns /run/containerd /var/lib/cni /var/lib/kubelet /var/log/containers /var/log/pods; do
        [[ -e "$d" ]] && echo "dir:$d" >>"$f"
    done
    mountpoint -q /run/netns 2>/dev/null && echo "mount:/run/netns" >>"$f"
    for ns in /run/netns/*; do [[ -e "$ns" ]] && echo "netns:$ns" >>"$f"; done
    for h in /sys/fs/cgroup/*/; do
        for name in kubepods k8s.io; do [[ -d "$h$name" ]] && echo "cgroup:$h$name" >>"$f"; done
    done
    for ipt in iptables ip6tables; do
        command -v "$ipt" >/dev/null || continue
        for table in filter nat mangle; do
            "$ipt" -t "$table" -S 2>/dev/null | awk -v p="iptables:$ipt:$table:" '$1 == "-N" && $2 ~ /^KUBE-/ { print p $2 }' >>"$f"
        done
    done
    echo "sysctl:net.ipv4.ip_forward=$(sysctl -n net.ipv4.ip_forward)" >>"$f"
}

# ------------------------------------------------------------------------------------------
# Starting

free_port() {
    local py=python3
    [[ -x /usr/bin/python3 ]] && py=/usr/bin/python3
    "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start NAME COMMAND... : in the background, its own process group, output to NAME.log.
start() {
    local name="$1"
    shift
    # Not holding the lock (fd 9): a run that is SIGKILLed frees it, so `clean` can follow.
    setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null 9>&- &
    echo $! >"$STATE/$name.pid"
}

alive_or_die() {
    local name="$1" pid
    pid="$(cat "$STATE/$name.pid")"
    if ! kill -0 "$pid" 2>/dev/null; then
        log "$name exited; the end of its log:"
        tail -n 30 "$STATE/$name.log" >&2
        exit 1
    fi
}

# wait_for WHAT SECONDS COMMAND... : polls COMMAND until it succeeds, or fails with WHAT.
wait_for() {
    local what="$1" timeout="$2"
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        for p in "$STATE"/*.pid; do alive_or_die "$(basename "$p" .pid)"; done
        ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what"
        sleep 0.2
    done
}

# cert NAME CN O SANS : a key pair and a certificate signed by the bed's CA.
cert() {
    local name="$1" cn="$2" org="$3" sans="$4" pki="$STATE/pki"
    local subj="/CN=$cn"
    [[ -n "$org" ]] && subj="/O=$org/CN=$cn"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/$name.key" 2>/dev/null
    openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        if [[ -n "$sans" ]]; then
            echo "extendedKeyUsage=serverAuth,clientAuth"
            echo "subjectAltName=$sans"
        else
            echo "extendedKeyUsage=clientAuth"
        fi
    } >"$pki/$name.ext"
    openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
        -days 2 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
}

kubeconfig() { # NAME USER
    local name="$1" user="$2" pki="$STATE/pki"
    cat >"$STATE/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: cutover-e2e-node
  cluster: {server: "$API", certificate-authority: "$pki/ca.crt"}
users:
- name: $user
  user: {client-certificate: "$pki/$user.crt", client-key: "$pki/$user.key"}
contexts:
- name: cutover-e2e-node
  context: {cluster: cutover-e2e-node, user: $user, namespace: default}
current-context: cutover-e2e-node
EOF
}

up() {
    [[ "$(id -u)" -eq 0 ]] || die "the real node needs root"
    for tool in containerd ctr runc openssl ip iptables findmnt setsid python3 gcc; do
        command -v "$tool" >/dev/null || die "$tool is missing (hack/install-deps.sh installs the node's packages)"
    done
    [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local ]] || die "the CNI plugins are missing (containernetworking-plugins)"
    [[ "$(stat -fc %T /sys/fs/cgroup)" == tmpfs ]] || die "the bed expects cgroup v1 (kubelet cgroupDriver cgroupfs)"

    local bin
    bin="$("$here/build-control-plane.sh" --node | tail -n1)"
    for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do
        [[ -x "$bin/$b" ]] || die "$bin lacks $b"
    done
    KUBECTL="$bin/kubectl"

    mkdir -p "$STATE"/{pki,etcd,containerd,cni,cni-ipam,kubelet,pod-logs,images}
    record_host
    local t0=$SECONDS

    # Certificates: a CA; the API server's serving certificate; clients for the admin
    # (system:masters), the node (system:nodes), the controller-manager and the scheduler, and
    # the API server's client certificate towards the kubelet.
    local pki="$STATE/pki"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=cutover-e2e-node-ca" -days 2 \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
        -out "$pki/ca.crt" 2>/dev/null
    cert apiserver kube-apiserver "" "IP:127.0.0.1,IP:$GATEWAY,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    cert admin cutover-e2e-admin system:masters ""
    cert node "system:node:$NODE_NAME" system:nodes ""
    cert controller-manager system:kube-controller-manager "" ""
    cert scheduler system:kube-scheduler "" ""
    cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters ""
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/service-account.key" 2>/dev/null
    openssl pkey -in "$pki/service-account.key" -pubout -out "$pki/service-account.pub" 2>/dev/null

    # The pod bridge, made here rather than by the first pod so the API server and the
    # kubelet can serve on it.
    ip link add "$BRIDGE" type bridge
    ip addr add "$GATEWAY/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up

    # etcd on loopback, the API server on the bridge's address.
    local etcd_port etcd_peer api_port
    etcd_port="$(free_port)"
    etcd_peer="$(free_port)"
    api_port="$(free_port)"
    API="https://$GATEWAY:$api_port"
    start etcd "$bin/etcd" --name=default --data-dir="$STATE/etcd" \
        --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
        --listen-peer-urls="http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
        --initial-cluster="default=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync=true
    start kube-apiserver "$bin/kube-apiserver" \
        --etcd-servers="http://127.0.0.1:$etcd_port" \
        --bind-address="$GATEWAY" --advertise-address="$GATEWAY" --secure-port="$api_port" \
        --cert-dir="$pki" --client-ca-file="$pki/ca.crt" \
        --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
        --service-account-key-file="$pki/service-account.pub" \
        --service-account-signing-key-file="$pki/service-account.key" \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
        --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
        --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types=InternalIP,Hostname \
        --service-cluster-ip-range="$SERVICE_RANGE" --allow-privileged=true \
        --endpoint-reconciler-type=none
    kubeconfig admin admin
    kubeconfig node node
    kubeconfig controller-manager controller-manager
    kubeconfig scheduler scheduler
    export KUBECONFIG="$STATE/admin.kubeconfig"
    wait_for "the API server's /readyz" "$START_TIMEOUT" "$KUBECTL" get --raw /readyz

    # containerd with its own root, state and socket (containerd 1.6 still uses /run/containerd
    # for its shims and runc state; `clean` removes it).
    local cd="$STATE/containerd"
    cat >"$cd/config.toml" <<EOF
version = 2
root = "$cd/root"
state = "$cd/state"
[grpc]
  address = "$cd/containerd.sock"
[ttrpc]
  address = "$cd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$cd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Root may not lower oom_score_adj here (no CAP_SYS_RESOURCE): without this every sandbox
  # fails with "can't get final child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_tcp_service = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni"
    max_conf_num = 1
EOF
    cat >"$STATE/cni/10-cutover-e2e.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "cutover-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$SUBNET", "gateway": "$GATEWAY"}]],
        "dataDir": "$STATE/cni-ipam"
      }
    }
  ]
}
EOF
    start containerd containerd --config "$cd/config.toml"
    wait_for "containerd's socket" 30 ctr --address "$cd/containerd.sock" version

    # Images: the pause container, built here, and those the caller brings.
    gcc -static -O2 -o "$STATE/images/pause" "$here/node/pause.c"
    "$root/hack/build-image.sh" --binary "$STATE/images/pause" --name pause --tag "$PAUSE_IMAGE" \
        --output "$STATE/images/pause.tar" >/dev/null
    for tar in "$STATE/images/pause.tar" "${IMAGES[@]}"; do
        ctr --address "$cd/containerd.sock" -n k8s.io images import "$tar" >/dev/null ||
            die "ctr images import $tar failed"
        log "imported $(basename "$tar")"
    done

    # The controllers and the scheduler; no HTTPS endpoints of their own (--secure-port=0).
    start kube-controller-manager "$bin/kube-controller-manager" \
        --kubeconfig="$STATE/controller-manager.kubeconfig" \
        --use-service-account-credentials=true \
        --service-account-private-key-file="$pki/service-account.key" \
        --root-ca-file="$pki/ca.crt" \
        --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
        --leader-elect=false --secure-port=0 --controllers='*'
    start kube-scheduler "$bin/kube-scheduler" \
        --kubeconfig="$STATE/scheduler.kubeconfig" --leader-elect=false --secure-port=0

    # The kubelet: its API on the bridge address (its InternalIP), health on loopback.
    local kubelet_port healthz_port
    kubelet_port="$(free_port)"
    healthz_port="$(free_port)"
    cat >"$STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "$GATEWAY"
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: "127.0.0.1"
healthzPort: $healthz_port
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: "unix://$cd/containerd.sock"
podLogsDir: "$STATE/pod-logs"
# No KUBE-FIREWALL (it drops loopback traffic not from loopback), no canary chains.
makeIPTablesUtilChains: false
clusterDomain: cluster.local
resolvConf: ""
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
rotateCertificates: false
EOF
    start kubelet "$bin/kubelet" --config="$STATE/kubelet.yaml" --kubeconfig="$STATE/node.kubeconfig" \
        --root-dir="$STATE/kubelet" --cert-dir="$STATE/kubelet/pki" \
        --hostname-override="$NODE_NAME" --node-ip="$GATEWAY"
    wait_for "node $NODE_NAME to register" "$START_TIMEOUT" "$KUBECTL" get node "$NODE_NAME"
    "$KUBECTL" wait --for=condition=Ready "node/$NODE_NAME" --timeout="${START_TIMEOUT}s" >/dev/null
    # The default ServiceAccount, which every pod needs, comes from the controller-manager.
    wait_for "the default ServiceAccount" "$START_TIMEOUT" "$KUBECTL" get serviceaccount default -n default

    if iptables -t filter -S KUBE-FIREWALL >/dev/null 2>&1 && ! had "iptables:iptables:filter:KUBE-FIREWALL"; then
        log "KUBE-FIREWALL appeared although the kubelet was told not to make it; removing it"
        remove_iptables_chains
    fi
    log "node $NODE_NAME Ready in $((SECONDS - t0))s (API $API, bed $STATE)"
}

# ------------------------------------------------------------------------------------------

cmd="${1:-}"
shift || true
case "$cmd" in
    clean)
        [[ "$(id -u)" -eq 0 ]] || die "cleaning the real node needs root"
        exec 9>"$LOCK"
        flock -w 1800 9 || die "another real node holds $LOCK"
        clean
        ;;
    run)
        IMAGES=()
        while [[ $# -gt 0 ]]; do
            case "$1" in
                --image) IMAGES+=("$(readlink -f "$2")"); shift 2 ;;
                --) shift; break ;;
                *) break ;;
            esac
        done
        [[ $# -gt 0 ]] || die "usage: $0 run [--image TAR]... [--] COMMAND [ARGS...]"
        exec 9>"$LOCK"
        if ! flock -n 9; then
            log "another real node runs on this machine; waiting for it (lock $LOCK)"
            flock -w 1800 9 || die "gave up waiting for $LOCK"
        fi
        clean
        trap 'clean' EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
        up
        export CUTOVER_NODE_API="$API" CUTOVER_NODE_KUBECTL="$KUBECTL" CUTOVER_NODE_NAME="$NODE_NAME"
        export CUTOVER_NODE_GATEWAY="$GATEWAY" CUTOVER_NODE_DIR="$STATE"
        status=0
        "$@" || status=$?
        if [[ $status -ne 0 ]]; then
            log "the command failed ($status); pods and events:"
            "$KUBECTL" get pods -A -o wide >&2 || true
            "$KUBECTL" get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 >&2 || true
        fi
        # Pods first, through the API, so the kubelet stops them and CNI releases their
        # addresses; the controllers go first so that nothing makes new ones.
        for name in kube-controller-manager kube-scheduler; do
            kill -TERM "$(cat "$STATE/$name.pid")" 2>/dev/null || true
        done
        "$KUBECTL" delete pods --all -A --grace-period=1 --wait=false >/dev/null 2>&1 || true
        deadline=$((SECONDS + 60))
        while [[ -n "$("$KUBECTL" get pods -A -o name 2>/dev/null)" ]] && ((SECONDS < deadline)); do
            "$KUBECTL" delete pods --all -A --grace-period=1 --wait=false >/dev/null 2>&1 || true
            sleep 0.5
        done
        exit "$status"
        ;;
    *)
        die "usage: $0 run [--image TAR]... [--] COMMAND [ARGS...] | $0 clean"
        ;;
esac
