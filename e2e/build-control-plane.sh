#!/usr/bin/env bash
# Builds the real Kubernetes control plane used by the e2e tests (kube-apiserver,
# etcd and kubectl) from the upstream Go modules pinned in e2e/controlplane/, and
# prints the folder holding them as the LAST line of stdout. Progress goes to stderr.
#
#   - If KUBEBUILDER_ASSETS is set and holds kube-apiserver and etcd, that folder
#     is used as is (the envtest convention; kubectl is optional there).
#   - Otherwise the binaries live in a per-user cache keyed by version:
#       ${XDG_CACHE_HOME:-$HOME/.cache}/cutover-e2e/k8s-<version>-etcd-<version>/
#     Binaries already there are not rebuilt, so only the first run on a machine
#     pays for the build (several minutes on 2 cores).
#
# Idempotent and safe to run concurrently: builds are serialised with flock and
# each binary is built under a temporary name and renamed into place atomically.
#
#   e2e/build-control-plane.sh           kube-apiserver, etcd, kubectl
#   e2e/build-control-plane.sh --node    also kubelet, kube-controller-manager and
#                                        kube-scheduler, for the real node (e2e/real-node.sh);
#                                        always from the cache, whatever KUBEBUILDER_ASSETS says
set -euo pipefail

node=false
if [[ "${1:-}" == "--node" ]]; then
    node=true
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kube_mod="$here/controlplane/kube"
etcd_mod="$here/controlplane/etcd"

log() { printf 'build-control-plane: %s\n' "$*" >&2; }

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]] && ! $node; then
    if [[ -x "$KUBEBUILDER_ASSETS/kube-apiserver" && -x "$KUBEBUILDER_ASSETS/etcd" ]]; then
        log "using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
        printf '%s\n' "$KUBEBUILDER_ASSETS"
        exit 0
    fi
    log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks kube-apiserver or etcd; building instead"
fi

# The versions are the ones the go.mod files require (single source of truth);
# read without running go, so a warm cache needs no Go toolchain at all.
required_version() { # <go.mod> <module path>
    awk -v m="$2" '{ sub(/^require[ \t]+/, "") } $1 == m && $2 ~ /^v/ { print $2; exit }' "$1"
}
k8s_version="$(required_version "$kube_mod/go.mod" k8s.io/kubernetes)"
etcd_version="$(required_version "$etcd_mod/go.mod" go.etcd.io/etcd/server/v3)"
if [[ -z "$k8s_version" || -z "$etcd_version" ]]; then
    log "cannot read the k8s.io/kubernetes or etcd version from $kube_mod/go.mod / $etcd_mod/go.mod"
    exit 1
fi

dir="${XDG_CACHE_HOME:-$HOME/.cache}/cutover-e2e/k8s-${k8s_version}-etcd-${etcd_version}"
mkdir -p "$dir"

have_all() {
    [[ -x "$dir/kube-apiserver" && -x "$dir/etcd" && -x "$dir/kubectl" ]] || return 1
    if $node; then
        [[ -x "$dir/kubelet" && -x "$dir/kube-controller-manager" && -x "$dir/kube-scheduler" ]] || return 1
    fi
}

if ! have_all; then
    # Serialise concurrent builds (e.g. several test binaries starting at once).
    exec 9>"$dir/.lock"
    if ! flock -n 9; then
        log "another build into $dir is running; waiting for it"
        flock 9
    fi
fi

if ! have_all; then
    command -v go >/dev/null || { log "Go is needed to build the control plane (found no 'go' in PATH)"; exit 1; }
    export CGO_ENABLED=0

    # build <module dir> <package> <output name> [extra -ldflags]
    build() {
        local mod="$1" pkg="$2" name="$3" extra="${4:-}"
        if [[ -x "$dir/$name" ]]; then
            log "$name: already built"
            return
        fi
        local tmp="$dir/.$name.tmp.$$"
        log "$name: building $pkg (this takes a few minutes on a cold Go cache)"
        local start=$SECONDS
        (cd "$mod" && go build -trimpath -ldflags="-s -w $extra" -o "$tmp" "$pkg") || {
            rm -f "$tmp"
            log "$name: build failed"
            return 1
        }
        mv -f "$tmp" "$dir/$name"
        log "$name: built in $((SECONDS - start))s"
    }

    # Version stamps, as kubernetes' hack/lib/version.sh sets them, so that
    # `kube-apiserver --version`, /version and `kubectl version` report the real
    # version (kubectl's skew warning compares them).
    ver="${k8s_version#v}"
    major="${ver%%.*}"
    minor="${ver#*.}"
    minor="${minor%%.*}"
    build_date="$(cd "$kube_mod" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
    kube_ldflags=""
    for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
        kube_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        kube_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit= -X $pkg.buildDate=$build_date"
    done

    build "$etcd_mod" . etcd
    build "$kube_mod" k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver "$kube_ldflags"
    build "$kube_mod" k8s.io/kubernetes/cmd/kubectl kubectl "$kube_ldflags"
    if $node; then
        build "$kube_mod" k8s.io/kubernetes/cmd/kube-scheduler kube-scheduler "$kube_ldflags"
        build "$kube_mod" k8s.io/kubernetes/cmd/kube-controller-manager kube-controller-manager "$kube_ldflags"
        build "$kube_mod" k8s.io/kubernetes/cmd/kubelet kubelet "$kube_ldflags"
    fi
fi

log "control plane binaries in $dir"
printf '%s\n' "$dir"
